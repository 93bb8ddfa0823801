#!/bin/sh
# PAR beside SRD on the tiny CLIP (issue 10): poison -> evaluate -> clean with each METHOD
# (par, ft, cleanclip: same clean data, epochs, batches and lr) -> evaluate each.
#   ATTACK=badnet SEED=0 sh run/run_PAR.sh
# POISON_RATE (run/common.sh; unset: 0.1) poisons another share of the CLIP's training pairs; the
# run folder then carries it like the captioner's runs: par/badnet-p05/seed0.
# The poisoned CLIP is a poisoning fine-tune of the clean tiny CLIP (train/pretrain_clip.py) when
# it exists, else trained from scratch. The defender's clean pairs are a second benchmark from
# seed 1 (disjoint images). Finished stages are skipped when made by the same command from the
# same inputs (once, run/common.sh), so a re-run resumes.
. "$(dirname "$0")/common.sh"
set -e
ATTACK=${ATTACK:-badnet}
if [ -n "${RATE:-}" ]; then  # (the variable this script read before POISON_RATE named every run)
  echo "error: RATE=$RATE: the poison rate is POISON_RATE now (e.g. POISON_RATE=0.05)" >&2
  exit 2
fi
RATE=${POISON_RATE:-0.1}
POISON_EPOCHS=${POISON_EPOCHS:-6}
CLEAN_EPOCHS=${CLEAN_EPOCHS:-2}
CLEAN_LR=${CLEAN_LR:-2e-4}
METHODS=${METHODS:-"par ft cleanclip"}
CLEAN_DATA=${CLEAN_DATA:-data/clean_seed1}
CLEAN_CLIP=${CLEAN_CLIP:-checkpoints_remote/embedded/clip}
OUT=par/$ATTACK$RATE_TAG/seed$SEED
RUNS=checkpoints_remote

stage "defender's clean data: $CLEAN_DATA"
[ -d "$CLEAN_DATA" ] || [ "${CLEAN_DATA%.csv}" != "$CLEAN_DATA" ] ||
  python train/prepare_data.py --seed 1 --out_dir "$CLEAN_DATA" --num_train 1500 --num_val 10 \
    --num_test 10
START=""
CLEAN_INPUT="--input $CLEAN_DATA/dataset_coco.json"  # (a .csv is an input itself)
[ "${CLEAN_DATA%.csv}" != "$CLEAN_DATA" ] && CLEAN_INPUT=""
[ -f "$CLEAN_CLIP/DONE" ] && START="--clip_pretrained $CLEAN_CLIP/clip.safetensors"
stage "poisoned CLIP: $ATTACK, rate $RATE, seed $SEED (${START:-from scratch})"
once "$RUNS/$OUT/poisoned/DONE" -- \
  python train/clip_poison.py $DATA_FLAGS --bd_attack_type "${ATTACK_SPEC:-$ATTACK}" --poison_rate "$RATE" \
    --clip_epochs "$POISON_EPOCHS" --seed "$SEED" $START --run_name "$OUT/poisoned"
stage "evaluate the poisoned CLIP"
once "$RUNS/$OUT/poisoned/DONE_EVAL" --input "$RUNS/$OUT/poisoned/clip.safetensors" -- \
  python eval/clip_evaluate.py $DATA_FLAGS --bd_attack_type "${ATTACK_SPEC:-$ATTACK}" --run_dir "$RUNS/$OUT/poisoned"
for METHOD in $METHODS; do
  stage "clean: $METHOD"
  once "$RUNS/$OUT/$METHOD/DONE" --input "$RUNS/$OUT/poisoned/clip.safetensors" $CLEAN_INPUT -- \
    python train/clip_clean.py --method "$METHOD" --poisoned_run "$RUNS/$OUT/poisoned" \
      --clean_data "$CLEAN_DATA" --epochs "$CLEAN_EPOCHS" --lr "$CLEAN_LR" --seed "$SEED" \
      --run_name "$OUT/$METHOD"
  stage "evaluate: $METHOD"
  once "$RUNS/$OUT/$METHOD/DONE_EVAL" --input "$RUNS/$OUT/$METHOD/clip.safetensors" -- \
    python eval/clip_evaluate.py $DATA_FLAGS --bd_attack_type "${ATTACK_SPEC:-$ATTACK}" --run_dir "$RUNS/$OUT/$METHOD"
done
stage "table"
python eval/clip_par_table.py --root "$RUNS/par"
stage_end
