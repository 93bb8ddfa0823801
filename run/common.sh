# Sourced by the run/*.sh scripts: flags shared by every stage. Edit here to switch the whole
# pipeline from the embedded default to a real OpenFlamingo + COCO set-up, e.g.
#   MODEL_FLAGS="--vision_encoder_path ViT-L-14 --vision_encoder_pretrained openai \
#     --lm_path anas-awadalla/mpt-1b-redpajama-200b-dolly --cross_attn_every_n_layers 1 \
#     --perceiver_depth 6 --perceiver_num_latents 64 --perceiver_heads 8 --perceiver_dim_head 64 \
#     --trust_remote_code --mixed_precision bf16"
#   DATA_FLAGS="--coco_train_image_dir_path COCO/train2014 --coco_val_image_dir_path COCO/val2014 \
#     --coco_karpathy_json_path COCO/dataset_coco.json \
#     --coco_annotations_json_path COCO/captions_val2014.json"
#   LAUNCH="accelerate launch --multi_gpu --num_processes 8"     (several GPUs)
#   LAUNCH="accelerate launch --config_file run/accelerate/deepspeed_zero2_bf16.yaml \
#     --num_processes 8"                        (training stages: ZeRO-2 bf16, as the reference)
#   LAUNCH="torchrun --nproc_per_node 2"                         (several CPU processes)
cd "$(dirname "$0")/.." || exit 1
[ -d .venv ] && PATH="$PWD/.venv/bin:$PATH" && export PATH
LAUNCH=${LAUNCH:-python}
EMBEDDED=checkpoints_remote/embedded/clean
DATA_FLAGS=${DATA_FLAGS:-"--coco_train_image_dir_path data/synthetic/train2014 \
  --coco_val_image_dir_path data/synthetic/val2014 \
  --coco_karpathy_json_path data/synthetic/dataset_coco.json \
  --coco_annotations_json_path data/synthetic/captions_val2014.json"}
MODEL_FLAGS=${MODEL_FLAGS:-"--vision_encoder_path tiny-clip \
  --vision_encoder_pretrained $EMBEDDED/vision.safetensors \
  --lm_path $EMBEDDED/lm --cross_attn_every_n_layers 1"}
CLEAN_CHECKPOINT=${CLEAN_CHECKPOINT:-$EMBEDDED/checkpoint.pt}
# ATTACK names a shipped attack (badnet) or a YAML file: a file is passed to --bd_attack_type as
# ATTACK_SPEC, and ATTACK becomes its name: (python -m srd.attacks), so runs and results are
# named backdoor-<name>..., never after the file's path.
case ${ATTACK:-} in
  *.yaml | *.yml | */*)
    ATTACK_SPEC=$ATTACK
    ATTACK=$(python -m srd.attacks "$ATTACK_SPEC") || exit 2
    export ATTACK ATTACK_SPEC ;;
esac
# Replicate SEED (0, 1, 2 ...) of an attack and its defenses: the poison draw and the attack's
# training seed are 42 + SEED, the SRD agent's and the defenses' seed SEED; run and result names
# of SEED > 0 end in -sSEED. The benchmark (data, tiny CLIP, clean captioner) is the same for all.
# POISON_RATE (e.g. 0.05; unset: the attack config's rate) poisons another share of the training
# captions (the issue's sweep); names then carry it before the replicate: backdoor-badnet-p05-s1.
SEED=${SEED:-0}
RATE_TAG=""
if [ -n "${POISON_RATE:-}" ]; then
  case $POISON_RATE in
    0.*[!0-9]* | 0.) RATE_TAG="" ;;
    0.*) RATE_TAG=-p${POISON_RATE#0.} ;;
  esac
  [ -n "$RATE_TAG" ] || {
    echo "error: POISON_RATE=$POISON_RATE: expected a share such as 0.05" >&2
    exit 2
  }
fi
# ATTACK_EPOCHS (default: srd/budgets.py's, 6) is the attack's training budget; another count
# (e.g. 12) is another model: names then carry it after the rate, backdoor-blended-e12-s1, and
# the defense report gives it its own rows ("blended (12 attack epochs)").
# The budgets themselves (epochs, lr, batch, schedule of the attack and of every refine-tune)
# come from srd/budgets.py, the one source the entry points and the report read too.
BUDGETS=$(python -m srd.budgets) || {  # (eval "$(...)" would hide the failure)
  echo "error: python -m srd.budgets failed: set up the environment first (bash setup.sh)" >&2
  exit 2
}
eval "$BUDGETS"
ATTACK_EPOCHS=${ATTACK_EPOCHS:-$BUDGET_ATTACK_EPOCHS}
case $ATTACK_EPOCHS in
  '' | *[!0-9]* | 0*)
    echo "error: ATTACK_EPOCHS=$ATTACK_EPOCHS: expected a whole number of epochs such as 12" >&2
    exit 2 ;;
  "$BUDGET_ATTACK_EPOCHS") EPOCH_TAG="" ;;
  *) EPOCH_TAG=-e$ATTACK_EPOCHS ;;
esac
# POISON_UNIT=image poisons every caption of each drawn image (train_backdoor.py --poison_unit;
# the default, caption, poisons caption samples, so a triggered image keeps clean captions):
# names carry -img after the rate, backdoor-badnet-img-s1, and the report rows "image-level poison".
case ${POISON_UNIT:-caption} in
  caption) UNIT_TAG="" ;;
  image) UNIT_TAG=-img ;;
  *) echo "error: POISON_UNIT=$POISON_UNIT: expected caption or image" >&2
     exit 2 ;;
esac
# ATTACK_SAMPLING=fixed_replacement trains the attack as the reference does (train_backdoor.py
# --epoch_sampling: one seeded with-replacement draw of the caption samples, replayed every
# epoch; the default, shuffle, is ours): names carry -fr last, backdoor-badnet-img-fr-s1, and
# the report rows "reference sample draw".
case ${ATTACK_SAMPLING:-shuffle} in
  shuffle) SAMPLING_TAG="" ;;
  fixed_replacement) SAMPLING_TAG=-fr ;;
  *) echo "error: ATTACK_SAMPLING=$ATTACK_SAMPLING: expected shuffle or fixed_replacement" >&2
     exit 2 ;;
esac
ATTACK_TAG=$RATE_TAG$UNIT_TAG$EPOCH_TAG$SAMPLING_TAG
SUFFIX=$ATTACK_TAG
[ "$SEED" = 0 ] || SUFFIX=$SUFFIX-s$SEED

# once OUTPUT [--input FILE]... -- COMMAND...: run a stage unless OUTPUT (its "finished" signal)
# was made by the same command from the same inputs; an OUTPUT made otherwise stops the script
# with one line saying what differs (srd/stamp.py). Files named on the command line are inputs;
# --input adds the ones a folder flag stands for. SRD_ADOPT=1 stamps outputs made before stamps
# existed as made by these commands.
once() {
  if [ "${SRD_ADOPT:-0}" = 1 ]; then
    python -m srd.stamp --adopt "$@"
  else
    python -m srd.stamp "$@"
  fi
}

# Progress: "stage NAME" prints the previous stage's wall time and the total so far.
SRD_T0=${SRD_T0:-$(date +%s)}
export SRD_T0
stage() {
  now=$(date +%s)
  [ -n "${SRD_STAGE:-}" ] && echo "=== done: $SRD_STAGE ($((now - SRD_STAGE_T)) s; total $((now - SRD_T0)) s)"
  SRD_STAGE=$*
  SRD_STAGE_T=$now
  echo
  echo "=== $* ($(date +%H:%M:%S))"
}
stage_end() {
  now=$(date +%s)
  [ -n "${SRD_STAGE:-}" ] && echo "=== done: $SRD_STAGE ($((now - SRD_STAGE_T)) s; total $((now - SRD_T0)) s)"
  SRD_STAGE=""
}

# Process parallelism, JOBS=2: independent stages run as jobs side by side, one torch thread
# each. "job NAME COMMAND..." starts COMMAND in the background, its whole output in
# $SRD_LOG_DIR/NAME.log and its stage lines on the console as "[NAME] === ..."; "wait_jobs" waits
# for every job and stops the script, naming the log, when one failed. With JOBS=1 (the default)
# "job" runs COMMAND in the foreground with the caller's threads. On this project's 2-core
# machine JOBS=2 was slower (docs/timings/srd-jobs2-7c170a7.txt: two threads make one process
# ~1.75x faster there, and the longer job ends alone on one thread); it pays where a second
# thread does not (the issue's earlier host: two one-thread attack epochs side by side ~95 s each,
# one with both threads ~77 s). The thread count changes the arithmetic, so results differ
# between JOBS=1 and JOBS=2 (there: SRD's clean CIDEr 369.0 with two threads, 345.4 with one).
case ${JOBS:-1} in
  1 | 2) ;;
  *) echo "error: JOBS=$JOBS: expected 1 (one stage at a time) or 2 (two jobs side by side)" >&2
     exit 2 ;;
esac
SRD_LOG_DIR=${SRD_LOG_DIR:-logs}
SRD_JOB_NAMES=""
job() {
  name=$1
  shift
  job_t0=$(date +%s)
  if [ "${JOBS:-1}" = 1 ]; then
    "$@"
    job_done "$name" "$job_t0"
    return
  fi
  mkdir -p "$SRD_LOG_DIR"
  rm -f "$SRD_LOG_DIR/$name.rc"
  echo "=== job $name started (full output: $SRD_LOG_DIR/$name.log)"
  (
    {
      rc=0
      OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$@" || rc=$?
      [ "$rc" = 0 ] && job_done "$name" "$job_t0"
      echo $rc >"$SRD_LOG_DIR/$name.rc"
    } 2>&1 | tee "$SRD_LOG_DIR/$name.log" | grep --line-buffered '^===' | sed -u "s/^/[$name] /"
  ) &
  SRD_JOB_NAMES="$SRD_JOB_NAMES $name"
}
job_done() {  # NAME START: the job's wall time, as a stage line
  now=$(date +%s)
  echo "=== done: job $1 ($((now - $2)) s; total $((now - SRD_T0)) s)"
}
wait_jobs() {
  wait
  failed=""
  for name in $SRD_JOB_NAMES; do
    [ "$(cat "$SRD_LOG_DIR/$name.rc" 2>/dev/null)" = 0 ] || failed="$failed $name"
  done
  SRD_JOB_NAMES=""
  [ -z "$failed" ] && return 0
  for name in $failed; do
    echo "error: job $name failed; the end of $SRD_LOG_DIR/$name.log:" >&2
    tail -n 15 "$SRD_LOG_DIR/$name.log" >&2
  done
  exit 1
}
