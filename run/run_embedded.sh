#!/bin/sh
# README command 1: set up, then run the embedded default end to end on the CPU:
# synthetic benchmark -> clean tiny captioner -> backdoor attacks -> evaluation -> SFS
# -> SRD defense (and its random-square ablation) -> evaluation -> results table.
# Finished stages are skipped, so a re-run resumes. ATTACKS picks the attacks and SRD_ATTACKS
# the ones defended (space-separated), e.g. ATTACKS=badnet SRD_ATTACKS=badnet for one chain.
set -e
cd "$(dirname "$0")/.."
bash setup.sh
. run/common.sh
ATTACKS=${ATTACKS:-"badnet blended trojvlm shadowcast"}
SRD_ATTACKS=${SRD_ATTACKS:-"badnet blended trojvlm"}
stage() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

stage "data"
python train/prepare_data.py --out_dir data/synthetic --seed 0

stage "pretrain the clean tiny captioner"
[ -f checkpoints_remote/embedded/pretrain/DONE ] && [ -f "$CLEAN_CHECKPOINT" ] ||
  python train/pretrain.py $DATA_FLAGS --run_name embedded/pretrain --resume_from_checkpoint

for ATTACK in $ATTACKS; do
  export ATTACK
  stage "clean captioner against $ATTACK triggers"
  [ -f "result/clean-$ATTACK.json" ] ||
    CHECKPOINT=$CLEAN_CHECKPOINT MODEL_NAME=clean-$ATTACK sh run/run_eval.sh
  stage "backdoor training: $ATTACK"
  [ -f "checkpoints_remote/backdoor-$ATTACK/DONE" ] || sh run/run_train.sh
  stage "evaluation: $ATTACK"
  [ -f "result/backdoor-$ATTACK.json" ] || sh run/run_eval.sh
  for TYPE in clean attack; do
    stage "SFS: backdoor-$ATTACK $TYPE"
    [ -f "result/sfs_inputs/backdoor-$ATTACK/$TYPE/sfs.json" ] ||
      NAME=backdoor-$ATTACK TYPE=$TYPE sh run/run_eval_SFS.sh
  done
done

for ATTACK in $SRD_ATTACKS; do
  stage "SRD defense: $ATTACK"
  ATTACK=$ATTACK POLICY=dqn sh run/run_SRD.sh
  stage "random-square ablation: $ATTACK"
  ATTACK=$ATTACK POLICY=random sh run/run_SRD.sh
done

stage "results"
python eval/results_table.py --results result --output result/table.md

if [ "${SODA:-1}" = 1 ]; then
  stage "SODA on the shapes classifier zoo (SODA=0 skips it)"
  sh run/run_SODA_zoo.sh
fi
