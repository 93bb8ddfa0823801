#!/bin/sh
# README command 1: set up, then run the embedded default end to end on the CPU:
# synthetic benchmark -> tiny CLIP + clean tiny captioner (released; RETRAIN=1 trains them)
# -> backdoor attack -> evaluation
# -> SFS -> SRD defense and its random-square ablation -> evaluation -> results table.
#
# By default one attack (ATTACKS=badnet) goes through the whole chain; FULL=1 runs the full
# matrix (all four attacks, SRD on each). ATTACKS / SRD_ATTACKS pick them by hand
# (space-separated). Finished stages are skipped when made by the same command from the same
# inputs, and stop the script otherwise (once, run/common.sh), so a re-run resumes. Each stage
# prints its wall time and the running total.
set -e
cd "$(dirname "$0")/.."
[ "${SRD_SKIP_SETUP:-0}" = 1 ] || bash setup.sh
. run/common.sh
if [ "${FULL:-0}" = 1 ]; then
  ATTACKS=${ATTACKS:-"badnet blended trojvlm concept_relabel"}
else
  ATTACKS=${ATTACKS:-badnet}
fi
SRD_ATTACKS=${SRD_ATTACKS-$ATTACKS}  # set but empty: no SRD stage (bench_chain.py --no_srd)

stage "data"
python train/prepare_data.py --out_dir data/synthetic --seed 0

# The tiny CLIP and the clean captioner are the same for every attack and replicate: installed
# from release/embedded/ (made by the two commands below; files checked against its manifest),
# or trained from scratch with RETRAIN=1 (~20 min here).
if [ "${RETRAIN:-0}" = 1 ]; then
  stage "pretrain the tiny CLIP (the captioner's frozen vision tower)"
  once checkpoints_remote/embedded/clip/DONE -- \
    python train/pretrain_clip.py $DATA_FLAGS --run_name embedded/clip

  stage "pretrain the clean tiny captioner"
  once checkpoints_remote/embedded/pretrain/DONE \
    --input checkpoints_remote/embedded/clip/clip.safetensors -- \
    python train/pretrain.py $DATA_FLAGS --run_name embedded/pretrain --resume_from_checkpoint
else
  stage "install the released tiny CLIP and clean captioner (RETRAIN=1 trains them)"
  python train/release.py --action install
fi

for ATTACK in $ATTACKS; do
  export ATTACK
  stage "clean captioner against $ATTACK triggers"
  CHECKPOINT=$CLEAN_CHECKPOINT MODEL_NAME=clean-$ATTACK sh run/run_eval.sh
  stage "backdoor training: $ATTACK"
  sh run/run_train.sh
  stage "evaluation: $ATTACK"
  sh run/run_eval.sh
  for TYPE in clean attack; do
    stage "SFS: backdoor-$ATTACK $TYPE"
    NAME=backdoor-$ATTACK TYPE=$TYPE sh run/run_eval_SFS.sh
  done
done

# SRD and its random-square ablation are independent: one after the other, or side by side
# with JOBS=2 (run/common.sh).
for ATTACK in $SRD_ATTACKS; do
  stage "SRD defense and its random-square ablation: $ATTACK"
  ATTACK=$ATTACK sh run/run_eval.sh  # the backdoored model's results, read by both jobs
  job "srd-$ATTACK$SUFFIX" env ATTACK="$ATTACK" POLICY=dqn sh run/run_SRD.sh
  job "srd-random-$ATTACK$SUFFIX" env ATTACK="$ATTACK" POLICY=random sh run/run_SRD.sh
  wait_jobs
done

stage "results"
python eval/results_table.py --results result --output result/table.md

# SODA's zoo (9 classifiers, ~30 min here) runs with the full matrix or SODA=1.
if [ "${SODA:-${FULL:-0}}" = 1 ]; then
  stage "SODA on the shapes classifier zoo"
  sh run/run_SODA_zoo.sh
fi

# PAR beside SRD on the tiny CLIP (BadNet and Blended-Stripes, ~6 min each here) with the full
# matrix or PAR=1.
if [ "${PAR:-${FULL:-0}}" = 1 ]; then
  for ATTACK in badnet blended_stripes; do
    stage "PAR on the tiny CLIP: $ATTACK"
    ATTACK=$ATTACK sh run/run_PAR.sh
  done
fi
stage_end
