#!/bin/sh
# Stage B: evaluation of a checkpoint, clean and triggered. By default the backdoored model of
# ATTACK; CHECKPOINT and MODEL_NAME choose another (e.g. the clean captioner with ATTACK=badnet
# gives the clean model's ASR row). Skipped when its result was made by the same command from
# the same checkpoint (once, run/common.sh).
. "$(dirname "$0")/common.sh"
ATTACK=${ATTACK:-badnet}
CHECKPOINT=${CHECKPOINT:-checkpoints_remote/backdoor-$ATTACK$SUFFIX/final_weights.pt}
MODEL_NAME=${MODEL_NAME:-backdoor-$ATTACK$SUFFIX}
once "result/$MODEL_NAME.json" -- $LAUNCH eval/evaluate.py $DATA_FLAGS $MODEL_FLAGS \
  --checkpoint_path "$CHECKPOINT" \
  --bd_attack_type "${ATTACK_SPEC:-$ATTACK}" \
  --results_file result \
  --model_name "$MODEL_NAME" \
  --sfs_data_dir result/sfs_inputs \
  --batch_size 64 \
  --num_beams 3 \
  --max_new_tokens 20 \
  "$@"
