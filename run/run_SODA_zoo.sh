#!/bin/sh
# The SODA zoo: SEEDS x {clean, semantic_bg, semantic_size} shapes classifiers, each through
# run/run_SODA.sh (detected pair; the planted pair as the oracle row; fine-tune and DFR
# baselines), plus detection at the data-dependent layer 3 (a ReLU MLP head), then the report
# result/soda/soda_report.md + result/soda/soda_zoo.json (a folder of their own: result/*.json are
# the captioner's evaluation results, which eval/results_table.py reads). Finished steps are
# skipped on a re-run when made by the same command from the same inputs (once, run/common.sh);
# anything else stops the script.
# The second benchmark, whose classes share no part (srd/soda/distinct.py; docs/soda.md):
#   BENCHMARK=distinct DATA=<folder> ZOO=<folder> ATTACKS="clean distinct_colour distinct_bg" \
#     REPORT=<folder> sh run/run_SODA_zoo.sh
# BENCHMARK is passed to train/soda_data.py --benchmark (unset: its default, the shapes set);
# REPORT is the folder of the report, its JSON and figure (unset: result/soda and img/);
# BASELINES and ORACLE (default 1) are passed to run/run_SODA.sh.
. "$(dirname "$0")/common.sh"
set -e
SEEDS=${SEEDS:-"0 1 2"}
ATTACKS=${ATTACKS:-"clean semantic_bg semantic_size"}
DATA=${DATA:-data/shapes}
ZOO=${ZOO:-checkpoints_remote/soda/zoo}
ORACLE=${ORACLE:-1}
export DATA
BENCH_FLAG=""
[ -n "${BENCHMARK:-}" ] && BENCH_FLAG="--benchmark $BENCHMARK"
REPORT_FLAGS=""
if [ -n "${REPORT:-}" ]; then
  REPORT_FLAGS="--out_json $REPORT/soda_zoo.json --out_md $REPORT/soda_report.md \
    --figure $REPORT/soda_target_z.png"
fi
TITLE=${TITLE:-SODA on the shapes classifier zoo}
echo "=== data ($(date +%H:%M:%S))"
once "$DATA/shapes.json" -- python train/soda_data.py --data_dir "$DATA" --seed 0 $BENCH_FLAG
START=$(date +%s)
MODELS=""
for SEED in $SEEDS; do
  for ATTACK in $ATTACKS; do
    M="$ZOO/soda-$ATTACK-s$SEED"
    echo "=== train $M ($(date +%H:%M:%S))"
    once "$M/DONE" --input "$DATA/shapes.json" -- \
      python train/soda_train.py --data_dir "$DATA" --external_save_dir "$ZOO" \
        --bd_attack_type "$ATTACK" --seed "$SEED"
    MODEL="$M" ORACLE=$ORACLE sh run/run_SODA.sh
    echo "=== layer 3 detection ($(date +%H:%M:%S))"
    L3="--in_model $M --data_dir $DATA --ana_layer 3 --output_dir $M/soda-layer3"
    IN3="--input $M/model.safetensors --input $DATA/shapes.json"
    once "$M/soda-layer3/causality_layer3.npz" $IN3 -- \
      python eval/soda_causality.py $L3 --num_sample 256
    once "$M/soda-layer3/detect.json" $IN3 --input "$M/soda-layer3/causality_layer3.npz" -- \
      python eval/soda_detect.py $L3 --confidence 3 --confidence2 2 --num_sample 256
    MODELS="$MODELS $M"
  done
done
END=$(date +%s)
COUNT=$(echo $MODELS | wc -w)
CORES=$(getconf _NPROCESSORS_ONLN)  # (nproc would say 1 under OMP_NUM_THREADS=1)
python eval/soda_report.py --models $MODELS --detect_dirs soda soda-layer3 $REPORT_FLAGS \
  --title "$TITLE" --note "Zoo wall time $((END - START)) s for $COUNT models in this run ($CORES cores, load \
$(cut -d' ' -f1 /proc/loadavg) at the end; steps finished earlier were skipped)."
