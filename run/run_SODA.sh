#!/bin/sh
# SODA on one shapes classifier (MODEL, a train/soda_train.py run folder):
#   causality_analysis -> detect -> (if a backdoor is flagged) gen_trigger -> remove,
#   then the baselines on the same defender data and budget (clean fine-tune, DFR).
# ORACLE=1 also runs gen_trigger + remove given the planted (source, target) pair (from the
# model's config.json), into $MODEL/soda-oracle, to separate removal from detection.
# Finished stages are skipped when made by the same command from the same inputs (once, in
# run/common.sh; anything else stops the script), so a re-run resumes. Thresholds are the same
# for every model.
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
L=$(python -m srd.soda "$MODEL" "$LAYER")  # -1: the last hidden layer; names the CA output
COMMON="--in_model $MODEL --data_dir $DATA --ana_layer $L"
INPUTS="--input $MODEL/model.safetensors --input $DATA/shapes.json"  # what the folders stand for
GEN="--num_sample 100 --lr 0.1 --reg 0.9 --epoch 300 --early_stop_th 0.99"
DEFENCE="--clean_portion 0.05 --epoch 6 --lr 0.005 --batch_size 64"

analyse() {  # DIR: causality analysis of layer L into DIR
  once "$1/causality_layer$L.npz" $INPUTS -- \
    python eval/soda_causality.py $COMMON --output_dir "$1" --num_sample 256
}
reconstruct_and_remove() {  # DIR then the pair flags (none: detect.json's first detection)
  DIR=$1
  shift
  PAIR_INPUT=""
  [ $# = 0 ] && PAIR_INPUT="--input $DIR/detect.json"
  once "$DIR/advsample.npz" $INPUTS $PAIR_INPUT -- \
    python train/soda_gen_trigger.py $COMMON --output_dir "$DIR" $GEN "$@"
  once "$DIR/remove/DONE" $INPUTS $PAIR_INPUT --input "$DIR/causality_layer$L.npz" \
    --input "$DIR/advsample.npz" -- \
    python train/soda_remove.py $COMMON --output_dir "$DIR" $DEFENCE --top 0.3 --reg 0.01 "$@"
}

stage "causality_analysis: $MODEL (layer $L)"
analyse "$MODEL/$OUT"
stage "detect"
once "$MODEL/$OUT/detect.json" $INPUTS --input "$MODEL/$OUT/causality_layer$L.npz" -- \
  python eval/soda_detect.py $COMMON --output_dir "$MODEL/$OUT" --confidence "$CONF" \
    --confidence2 "$CONF2" --num_sample 256
if python -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['detections'] else 1)" \
    "$MODEL/$OUT/detect.json"; then
  stage "gen_trigger + remove (detected pair)"
  reconstruct_and_remove "$MODEL/$OUT"
else
  stage "nothing flagged: SODA leaves the model unchanged"
fi
BASELINES=${BASELINES:-auto}  # auto, none, or a list of train/soda_baseline.py methods
[ "$BASELINES" = none ] && BASELINES=""
if [ "$BASELINES" = auto ]; then  # only where there is a planted backdoor to measure
  python -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get('semantic') else 1)" \
    "$MODEL/config.json" && BASELINES="finetune dfr" || BASELINES=""
fi
for METHOD in $BASELINES; do
  stage "baseline $METHOD"
  once "$MODEL/$OUT/$METHOD/DONE" $INPUTS -- \
    python train/soda_baseline.py $COMMON --output_dir "$MODEL/$OUT" $DEFENCE --method $METHOD
done
if [ "$ORACLE" = 1 ]; then
  PAIR=$(python -c "import json,sys; s=json.load(open(sys.argv[1])).get('semantic'); \
print('' if not s else '--potential_source %d --poison_target %d' % (s['source'], s['target']))" \
    "$MODEL/config.json")
  if [ -n "$PAIR" ]; then
    stage "oracle pair: $PAIR"
    analyse "$MODEL/$OUT-oracle"
    reconstruct_and_remove "$MODEL/$OUT-oracle" $PAIR
  fi
fi
stage "SODA done: $MODEL/$OUT"
