#!/bin/sh
# The re-tuning attack (Min et al., NeurIPS 2024) on every finished defense run of
# run/run_defenses.sh for ATTACK/SEED (same names: POISON_RATE, POISON_UNIT, ATTACK_EPOCHS,
# run/common.sh): train/retune.py fine-tunes the defended model on 15 of the attack's poisons
# padded with 135 clean samples (5 epochs at the attack's lr; its flags: RETUNE_FLAGS), then
# eval/evaluate.py writes result/retune-<defense run>.json, which the defense report shows as
# "ASR after re-tune" beside the defense's ASR (srd.defenses.retune). Test-time defenses change no
# weights and are left out. DEFENSE_RUNS (run folder names) picks the runs; default: all.
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
if [ -n "${DEFENSE_RUNS:-}" ]; then
  FOLDERS=$(for R in $DEFENSE_RUNS; do echo "$RUNS/$R"; done)
else
  FOLDERS=$(ls -d "$RUNS"/defense-*-"$RUN_TAG" 2>/dev/null || true)
fi
for RUN in $FOLDERS; do
  [ -f "$RUN/DONE" ] && [ -f "$RUN/defense.json" ] || {
    echo "error: $RUN: not a finished defense run (run/run_defenses.sh)" >&2; exit 2; }
  KIND=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['defense']['kind'])" "$RUN/defense.json")
  [ "$KIND" = test_time ] && continue
  CHECKPOINT=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$RUN/defense.json")
  NAME=retune-$(basename "$RUN")
  stage "re-tune: $NAME"
  once "$RUNS/$NAME/DONE" -- \
    python train/retune.py $DATA_FLAGS $MODEL_FLAGS \
      --checkpoint_path "$CHECKPOINT" --poison_ids_path "$POISON" \
      --run_name "$NAME" --external_save_dir "$RUNS" --seed "$SEED" \
      --resume_from_checkpoint ${RETUNE_FLAGS:-}
  stage "evaluation: $NAME"
  once "$RESULTS/$NAME.json" --input "$RUNS/$NAME/final_weights.pt" -- \
    $LAUNCH eval/evaluate.py $DATA_FLAGS $MODEL_FLAGS $EVAL_FLAGS \
      --checkpoint_path "$RUNS/$NAME/final_weights.pt" --model_name "$NAME" \
      --results_file "$RESULTS" --sfs_data_dir "$RESULTS/sfs_inputs"
done
stage_end
