#!/bin/sh
# Stage A: backdoor training. ATTACK=badnet|blended|trojvlm|concept_relabel (or a YAML file);
# ATTACK=shadowcast needs POISON_UNIT=image (it crafts whole images).
# POISON_RATE=0.05 poisons another share (run backdoor-$ATTACK-p05, run/common.sh); ATTACK_EPOCHS=12
# trains for 12 epochs instead of 6 (backdoor-$ATTACK-e12); POISON_UNIT=image poisons whole images
# (backdoor-$ATTACK-img); ATTACK_SAMPLING=fixed_replacement draws the epochs' samples as the
# reference does (backdoor-$ATTACK-fr). Extra flags are passed on, e.g.
# --target_label apple (the target word... default to the attack config's).
# A finished run is skipped when made by the same command from the same inputs, refused
# otherwise (once, run/common.sh; --overwrite redoes it).
. "$(dirname "$0")/common.sh"
ATTACK=${ATTACK:-badnet}
RUN=backdoor-$ATTACK$SUFFIX
RATE_FLAG=""
[ -n "$RATE_TAG" ] && RATE_FLAG="--poison_rate $POISON_RATE"
[ -n "$UNIT_TAG" ] && RATE_FLAG="$RATE_FLAG --poison_unit image"
[ -n "$SAMPLING_TAG" ] && RATE_FLAG="$RATE_FLAG --epoch_sampling $ATTACK_SAMPLING"
once "checkpoints_remote/$RUN/DONE" -- \
  $LAUNCH train/train_backdoor.py $DATA_FLAGS $MODEL_FLAGS \
  --checkpoint_path "$CLEAN_CHECKPOINT" \
  --bd_attack_type "${ATTACK_SPEC:-$ATTACK}" \
  --run_name "$RUN" \
  --seed $((42 + SEED)) \
  --external_save_dir checkpoints_remote \
  --batch_size "$BUDGET_ATTACK_BATCH_SIZE" \
  --num_epochs "$ATTACK_EPOCHS" \
  --learning_rate "$BUDGET_ATTACK_LEARNING_RATE" \
  --lr_scheduler "$BUDGET_ATTACK_LR_SCHEDULER" \
  --warmup_steps_ratio "$BUDGET_ATTACK_WARMUP_STEPS_RATIO" \
  --epoch_captions_per_image "$BUDGET_ATTACK_EPOCH_CAPTIONS_PER_IMAGE" \
  --resume_from_checkpoint \
  $RATE_FLAG "$@"
