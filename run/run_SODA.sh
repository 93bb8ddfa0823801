#!/bin/sh
# SODA on one shapes classifier (MODEL, a train/soda_train.py run folder):
#   causality_analysis -> detect -> (if a backdoor is flagged) gen_trigger -> remove,
#   then the baselines on the same defender data and budget (clean fine-tune, DFR).
# ORACLE=1 also runs gen_trigger + remove given the planted (source, target) pair (from the
# model's config.json), into $MODEL/soda-oracle, to separate removal from detection.
# Finished outputs are skipped, so a re-run resumes. Thresholds are the same for every model.
# Embedded departures from the reference defaults: gen_trigger --epoch 300 (reference 2000).
. "$(dirname "$0")/common.sh"
set -e
MODEL=${MODEL:?set MODEL to a model run folder (train/soda_train.py)}
DATA=${DATA:-data/shapes}
OUT=${OUT:-soda}
LAYER=${LAYER:--1}
CONF=${CONF:-3}
CONF2=${CONF2:-2}
ORACLE=${ORACLE:-0}
stage() { echo "=== $* ($(date +%H:%M:%S))"; }
COMMON="--in_model $MODEL --data_dir $DATA --ana_layer $LAYER"
GEN="--num_sample 100 --lr 0.1 --reg 0.9 --epoch 300 --early_stop_th 0.99"
DEFENCE="--clean_portion 0.05 --epoch 6 --lr 0.005 --batch_size 64"

stage "causality_analysis: $MODEL (layer $LAYER)"
ls "$MODEL/$OUT"/causality_layer*.npz >/dev/null 2>&1 ||
  python eval/soda_causality.py $COMMON --output_dir "$MODEL/$OUT" --num_sample 256
stage "detect"
[ -f "$MODEL/$OUT/detect.json" ] ||
  python eval/soda_detect.py $COMMON --output_dir "$MODEL/$OUT" --confidence "$CONF" \
    --confidence2 "$CONF2" --num_sample 256
if python -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['detections'] else 1)" \
    "$MODEL/$OUT/detect.json"; then
  stage "gen_trigger (detected pair)"
  [ -f "$MODEL/$OUT/advsample.npz" ] ||
    python train/soda_gen_trigger.py $COMMON --output_dir "$MODEL/$OUT" $GEN
  stage "remove (detected pair)"
  [ -f "$MODEL/$OUT/remove/DONE" ] ||
    python train/soda_remove.py $COMMON --output_dir "$MODEL/$OUT" $DEFENCE --top 0.3 --reg 0.01
else
  stage "nothing flagged: SODA leaves the model unchanged"
fi
BASELINES=${BASELINES:-auto}
if [ "$BASELINES" = auto ]; then  # only where there is a planted backdoor to measure
  python -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get('semantic') else 1)" \
    "$MODEL/config.json" && BASELINES="finetune dfr" || BASELINES=""
fi
for METHOD in $BASELINES; do
  stage "baseline $METHOD"
  [ -f "$MODEL/$OUT/$METHOD/DONE" ] ||
    python train/soda_baseline.py $COMMON --output_dir "$MODEL/$OUT" $DEFENCE --method $METHOD
done
if [ "$ORACLE" = 1 ]; then
  PAIR=$(python -c "import json,sys; s=json.load(open(sys.argv[1])).get('semantic'); \
print('' if not s else '--potential_source %d --poison_target %d' % (s['source'], s['target']))" \
    "$MODEL/config.json")
  if [ -n "$PAIR" ]; then
    ODIR="$MODEL/$OUT-oracle"
    stage "oracle pair: $PAIR"
    ls "$ODIR"/causality_layer*.npz >/dev/null 2>&1 ||
      python eval/soda_causality.py $COMMON --output_dir "$ODIR" --num_sample 256
    [ -f "$ODIR/advsample.npz" ] ||
      python train/soda_gen_trigger.py $COMMON --output_dir "$ODIR" $GEN $PAIR
    [ -f "$ODIR/remove/DONE" ] ||
      python train/soda_remove.py $COMMON --output_dir "$ODIR" $DEFENCE --top 0.3 --reg 0.01 $PAIR
  fi
fi
stage "SODA done: $MODEL/$OUT"
