#!/bin/sh
# The re-tuning attack (Min et al., NeurIPS 2024) on every finished defense run of
# run/run_defenses.sh for ATTACK/SEED (same names: POISON_RATE, POISON_UNIT, ATTACK_EPOCHS,
# run/common.sh): train/retune.py fine-tunes the defended model on 15 of the attack's poisons
# padded with 135 clean samples (5 epochs at the attack's lr; its flags: RETUNE_FLAGS), then
# eval/evaluate.py writes result/retune-<defense run>.json, which the defense report shows as
# "ASR after re-tune" beside the defense's ASR (srd.defenses.retune). Test-time defenses change no
# weights and are left out. DEFENSE_RUNS (run folder names) picks the runs; default: all, those of
# the retrain-from-clean protocol (PROTOCOL=retrain, retrain-*) too.
# CLEAN=1 runs the control instead: the same re-tune of the clean captioner the attack started
# from (result/retune-clean-<attack tag>-s<seed>.json): what the set implants on its own.
#   ATTACK=badnet POISON_UNIT=image sh run/run_retune.sh
. "$(dirname "$0")/common.sh"
set -e
ATTACK=${ATTACK:-badnet}
RUNS=${RUNS:-checkpoints_remote}
RESULTS=${RESULTS:-result}
RUN_TAG=$ATTACK$ATTACK_TAG-s$SEED
POISON=$RUNS/backdoor-$ATTACK$SUFFIX/poison_ids.json
EVAL_FLAGS="--bd_attack_type ${ATTACK_SPEC:-$ATTACK} --batch_size 32 --num_beams 3 --max_new_tokens 20"
[ -f "$POISON" ] || { echo "error: $POISON: run the attack stage first (run/run_train.sh)" >&2; exit 2; }
retune_and_evaluate() {  # NAME CHECKPOINT
  stage "re-tune: $1"
  once "$RUNS/$1/DONE" -- \
    python train/retune.py $DATA_FLAGS $MODEL_FLAGS \
      --checkpoint_path "$2" --poison_ids_path "$POISON" \
      --run_name "$1" --external_save_dir "$RUNS" --seed "$SEED" \
      --resume_from_checkpoint ${RETUNE_FLAGS:-}
  stage "evaluation: $1"
  once "$RESULTS/$1.json" --input "$RUNS/$1/final_weights.pt" -- \
    $LAUNCH eval/evaluate.py $DATA_FLAGS $MODEL_FLAGS $EVAL_FLAGS \
      --checkpoint_path "$RUNS/$1/final_weights.pt" --model_name "$1" \
      --results_file "$RESULTS" --sfs_data_dir "$RESULTS/sfs_inputs"
}
if [ "${CLEAN:-0}" = 1 ]; then  # the control: the same set on the captioner never backdoored
  retune_and_evaluate "retune-clean-$RUN_TAG" "$CLEAN_CHECKPOINT"
  stage_end
  exit 0
fi
if [ -n "${DEFENSE_RUNS:-}" ]; then
  FOLDERS=$(for R in $DEFENSE_RUNS; do echo "$RUNS/$R"; done)
else
  FOLDERS=$(ls -d "$RUNS"/defense-*-"$RUN_TAG" "$RUNS"/retrain-*-"$RUN_TAG" 2>/dev/null || true)
fi
for RUN in $FOLDERS; do
  [ -f "$RUN/DONE" ] && [ -f "$RUN/defense.json" ] || {
    echo "error: $RUN: not a finished defense run (run/run_defenses.sh)" >&2; exit 2; }
  KIND=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['defense']['kind'])" "$RUN/defense.json")
  [ "$KIND" = test_time ] && continue
  CHECKPOINT=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$RUN/defense.json")
  retune_and_evaluate "retune-$(basename "$RUN")" "$CHECKPOINT"
done
stage_end
