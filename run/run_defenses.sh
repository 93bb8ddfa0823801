#!/bin/sh
# The defense comparison on one attack: every defense of the registry from the same backdoored
# model (stage A's run), the same refine-tune budget (srd/budgets.py's REFINE, as run/run_SRD.sh's
# D4) and the same evaluation, then result/report.md (on the synthetic benchmark with what the
# clean captions get wrong) and img/defense_*.png.
#   ATTACK=badnet SEED=0 sh run/run_defenses.sh        (POISON_RATE=0.05: that model, run/common.sh)
# RUNS (checkpoints_remote), RESULTS (result) and IMG (img) move the run folders, the result
# JSONs (+ report.md) and the figures; EPOCHS and LR override the shared refine-tune budget
# (srd/budgets.py's REFINE: 2 epochs at lr 1e-3, batch 32).
# DEFENSES picks the defenses (space-separated; default: every registry entry marked for the
# comparison, `python -m srd.defenses --list`; those that cannot run against the attack, e.g.
# oracle_square without a patch trigger, are left out with the reason); SRD's rows need
# run/run_SRD.sh's cleaning manifest (checkpoints_remote/srd-$ATTACK/clean_data) and are added
# when it exists, with the image version of the reference (first_occurrence) and ours
# (triggered); likewise rows "srd [independent reference]" from run/run_SRD.sh
# REFERENCE_DIR=...'s cleaning run (checkpoints_remote/srd-indref-$ATTACK/clean_data), and
# SRD_VARIANTS="datapool-ac2 ..." adds the rows of run/run_SRD.sh's agent-variant runs
# (checkpoints_remote/srd-datapool-ac2-$ATTACK/clean_data; rows tagged with the variant). With
# par in the list, PAR also runs on the data as the attack left it
# (--par_data as_left, the row "par [as_left]"; its control is no_mask). SQUARE_SIDES (e.g.
# "20 200") adds random_squares with every square of one size (--square_side; rows
# "random_squares [200 px]"): what a square's size alone costs and removes, beside SRD's agent.
# MASK_COLOURS (e.g. "cyan") repeats random_squares (each size of SQUARE_SIDES, or any size) and
# SRD (triggered) with the same squares painted in that colour (--mask_colour; rows
# "random_squares [200 px, cyan squares]"): whether a square works as a mask or as a red object.
# IMAGE_VERSIONS (default "first_occurrence"; "" for none) repeats every refine defense whose data
# depend on --image_version (python -m srd.defenses --versioned: no_mask, random_squares,
# fine_pruning, and par [as_left]) in those versions besides the default triggered one (rows
# "no_mask [first_occurrence]"): the reference's protocol with every control, beside ours.
# SRD's rows run in both versions already; oracle_square's square covers the trigger, so its
# data, and its row, are the same in both. Under POISON_UNIT=image the two versions are the same
# images (every caption of a triggered image is poisoned), so only the default one runs.
# PROTOCOL=retrain runs the retrain-from-clean protocol instead of the refine-tune (ours; a
# defender who cleans the data before training, train/defend.py --retrain_from): each data-level
# defense's data (python -m srd.defenses --retrainable; SRD's rows too) train the clean captioner
# with the attack's budget (srd/budgets.py's ATTACK); runs and results named retrain-*, rows
# "no_mask [retrain from clean]" (no_mask's is the attack itself, trained with the defense's seed).
# STEPS (e.g. 126) gives every refine-tune a light budget: it stops after that many optimizer
# steps, the schedule laid over them (train/defend.py --max_steps; the published clean
# fine-tune's budget is ~126 steps, ours 2 epochs = 938); runs and results named
# defense-<defense>-<attack>-steps126-sSEED, rows "no_mask [126 steps]": the budget sweep.
# BENIGN=1 runs the benign control instead: the same defenses on the clean captioner, with the
# defender's data as if nothing were poisoned (train/defend.py --benign_control; runs and
# results named benign-*; SRD's row when BENIGN=1 run/run_SRD.sh made its cleaning run
# srd-benign-$ATTACK), reported beside the comparison.
. "$(dirname "$0")/common.sh"
set -e
ATTACK=${ATTACK:-badnet}
IMAGE_VERSIONS=${IMAGE_VERSIONS-first_occurrence}
SRD_VERSIONS="triggered first_occurrence"
if [ "${POISON_UNIT:-caption}" = image ]; then  # every caption of a triggered image is poisoned,
  IMAGE_VERSIONS="" SRD_VERSIONS=triggered  # so its first occurrence is triggered: one version
fi
for V in $IMAGE_VERSIONS; do  # the default version's rows are the ones without a version
  [ "$V" != triggered ] || {
    echo "error: IMAGE_VERSIONS=$IMAGE_VERSIONS: triggered is the version of the rows without it" >&2
    exit 2
  }
done
for C in ${MASK_COLOURS:-}; do  # red rows are the default ones: the same runs under two names
  [ "$C" != red ] || {
    echo "error: MASK_COLOURS=$MASK_COLOURS: red is the colour of the rows without it" >&2
    exit 2
  }
done
RUNS=${RUNS:-checkpoints_remote}
RESULTS=${RESULTS:-result}
IMG=${IMG:-img}
BACKDOOR=$RUNS/backdoor-$ATTACK$SUFFIX/final_weights.pt
case ${STEPS:-} in
  "" | *[!0-9]* | 0*) [ -z "${STEPS:-}" ] || {
      echo "error: STEPS=$STEPS: expected a positive whole number of optimizer steps" >&2
      exit 2
    } ;;
esac
RUN_TAG=$ATTACK$ATTACK_TAG${STEPS:+-steps$STEPS}-s$SEED  # the end of every run and result name
START=$BACKDOOR PREFIX=defense CONTROL="" INPUT="" LIST=""
[ "${BENIGN:-0}" = 1 ] && START=$CLEAN_CHECKPOINT PREFIX=benign CONTROL=--benign_control \
  LIST=--benign
BUDGET_OF=REFINE
case ${PROTOCOL:-refine} in
  refine) ;;
  retrain)
    [ "$PREFIX" = defense ] || {
      echo "error: PROTOCOL=retrain: the benign control (BENIGN=1) already starts from the clean captioner" >&2
      exit 2
    }
    PREFIX=retrain CONTROL="--retrain_from $CLEAN_CHECKPOINT" BUDGET_OF=ATTACK ;;
  *) echo "error: PROTOCOL=$PROTOCOL: expected refine or retrain" >&2
     exit 2 ;;
esac
POISON=$RUNS/backdoor-$ATTACK$SUFFIX/poison_ids.json
CLEAN_DATA=$RUNS/srd-$ATTACK$SUFFIX/clean_data
budget() { eval "echo \$BUDGET_${BUDGET_OF}_$1"; }  # srd/budgets.py's REFINE or ATTACK
BUDGET="--batch_size $(budget BATCH_SIZE) --num_epochs ${EPOCHS:-$(budget EPOCHS)} \
  --learning_rate ${LR:-$(budget LEARNING_RATE)} --lr_scheduler $(budget LR_SCHEDULER) \
  --warmup_steps_ratio $(budget WARMUP_STEPS_RATIO) \
  --epoch_captions_per_image $(budget EPOCH_CAPTIONS_PER_IMAGE) --seed $SEED \
  ${STEPS:+--max_steps $STEPS}"
EVAL_FLAGS="--bd_attack_type ${ATTACK_SPEC:-$ATTACK} --batch_size 32 --num_beams 3 --max_new_tokens 20"
[ -f "$BACKDOOR" ] || { echo "error: $BACKDOOR: run the attack stage first (run/run_train.sh)" >&2; exit 2; }

defend_and_evaluate() {  # NAME then extra defend.py flags; INPUT: once's --input flags
  NAME=$1
  shift
  RUN=$RUNS/$NAME
  stage "defense: $NAME"
  once "$RUN/DONE" $INPUT -- \
    $LAUNCH train/defend.py $DATA_FLAGS $MODEL_FLAGS $BUDGET \
      --checkpoint_path "$START" --poison_ids_path "$POISON" $CONTROL \
      --run_name "$NAME" --external_save_dir "$RUNS" "$@"
  stage "evaluation: $NAME"
  CHECKPOINT=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$RUN/defense.json")
  KIND=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['defense']['kind'])" "$RUN/defense.json")
  TRANSFORM=""
  [ "$KIND" = test_time ] && TRANSFORM="$*"
  once "$RESULTS/$NAME.json" --input "$RUN/defense.json" -- \
    $LAUNCH eval/evaluate.py $DATA_FLAGS $MODEL_FLAGS $EVAL_FLAGS \
      --checkpoint_path "$CHECKPOINT" --defense_run "$RUN" --model_name "$NAME" $TRANSFORM \
      --results_file "$RESULTS" --sfs_data_dir "$RESULTS/sfs_inputs"
}

# The registry's list (or DEFENSES) less what cannot run, e.g. no oracle square without a patch
APPLICABLE=$(python -m srd.defenses $LIST "$POISON" ${DEFENSES:-})
if [ "$PREFIX" = retrain ] && [ -n "$APPLICABLE" ]; then  # the data-level ones (srd's below)
  APPLICABLE=$(python -m srd.defenses --retrainable $APPLICABLE)
fi
if [ -n "${STEPS:-}" ] && [ -n "$APPLICABLE" ]; then  # a light budget: those that refine-tune
  APPLICABLE=$(python -m srd.defenses --trains $APPLICABLE)
fi
own_flags() {  # a defense's flags that follow this script's settings
  case $1 in
    ppl_filter | byorn) echo "--reference_checkpoint_path $CLEAN_CHECKPOINT" ;;
  esac
}
for D in $APPLICABLE; do
  defend_and_evaluate "$PREFIX-$D-$RUN_TAG" --defense "$D" $(own_flags "$D")
done
for S in ${SQUARE_SIDES:-}; do
  defend_and_evaluate "$PREFIX-random_squares-${S}px-$RUN_TAG" --defense random_squares \
    --square_side "$S"
done
for C in ${MASK_COLOURS:-}; do
  for S in ${SQUARE_SIDES:-0}; do
    SIZE=-${S}px
    [ "$S" = 0 ] && SIZE=""
    defend_and_evaluate "$PREFIX-random_squares$SIZE-$C-$RUN_TAG" --defense random_squares \
      --square_side "$S" --mask_colour "$C"
  done
done
if [ "$PREFIX" = defense ] && echo "$APPLICABLE" | grep -qx par; then  # not told the poison
  defend_and_evaluate "defense-par-as_left-$RUN_TAG" --defense par \
    --par_data as_left
fi
if [ "$PREFIX" != benign ]; then  # the benign control has no triggered image to version
  for V in $IMAGE_VERSIONS; do
    for D in $(python -m srd.defenses --versioned $APPLICABLE); do
      [ "$D" = srd ] || defend_and_evaluate "$PREFIX-$D-$V-$RUN_TAG" --defense "$D" \
        --image_version "$V" $(own_flags "$D")
    done
    if echo "$APPLICABLE" | grep -qx par; then
      defend_and_evaluate "defense-par-as_left-$V-$RUN_TAG" --defense par --par_data as_left \
        --image_version "$V"
    fi
  done
fi
INDREF_DATA=$RUNS/srd-indref-$ATTACK$SUFFIX/clean_data  # run_SRD.sh REFERENCE_DIR=...
VARIANT_RUNS=""  # SRD_VARIANTS="datapool-ac2 ...": run_SRD.sh VARIANT=... runs' rows
for V in ${SRD_VARIANTS:-}; do
  VARIANT_RUNS="$VARIANT_RUNS srd-$V:$RUNS/srd-$V-$ATTACK$SUFFIX/clean_data"
done
for SRD_RUN in srd:$CLEAN_DATA srd-indref:$INDREF_DATA $VARIANT_RUNS; do
  ROW=${SRD_RUN%%:*} DATA=${SRD_RUN#*:}
  [ "$PREFIX" != benign ] && [ -f "$DATA/merged.json" ] || continue
  INPUT="--input $DATA/merged.json"
  for V in $SRD_VERSIONS; do
    defend_and_evaluate "$PREFIX-$ROW-$V-$RUN_TAG" --defense srd \
      --image_version "$V" --clean_data_save "$DATA"
  done
done
if [ "$PREFIX" = defense ] && [ -f "$CLEAN_DATA/merged.json" ]; then
  INPUT="--input $CLEAN_DATA/merged.json"
  for C in ${MASK_COLOURS:-}; do
    defend_and_evaluate "defense-srd-triggered-$C-$RUN_TAG" --defense srd \
      --clean_data_save "$CLEAN_DATA" --mask_colour "$C"
  done
fi
BENIGN_DATA=$RUNS/srd-benign-$ATTACK$SUFFIX/clean_data  # (one image version: nothing triggered)
if [ "$PREFIX" = benign ] && [ -f "$BENIGN_DATA/merged.json" ]; then
  INPUT="--input $BENIGN_DATA/merged.json"
  defend_and_evaluate "benign-srd-$RUN_TAG" --defense srd \
    --clean_data_save "$BENIGN_DATA"
fi

stage "defense report"
set --  # the results of the comparison and of the benign control, whichever exist
for F in "$RESULTS"/defense-*.json "$RESULTS"/retrain-*.json "$RESULTS"/benign-*.json; do
  [ -f "$F" ] && set -- "$@" "$F"
done
python eval/defense_report.py $DATA_FLAGS --caption_diagnostics --results "$@" \
  --output "$RESULTS/report.md" --img_dir "$IMG"
stage_end
