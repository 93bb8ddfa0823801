#!/bin/sh
# SRD defence of the backdoored model of ATTACK (stage A's run), then its evaluation:
#   D1 RL pool -> D2 DQN agent -> D3 clean data (sharded over $LAUNCH processes) -> D3b combine
#   -> D4 refine-tune -> B evaluation -> C SFS -> figures.
# Finished stages are skipped when made by the same command from the same inputs (once, in
# run/common.sh; anything else stops the script), so a re-run resumes (D3 and D4 also resume
# inside a stage; D3 always starts, to refuse a folder of another cleaning run).
# POLICY=random is the ablation: one seeded random red square per image instead of the agent
# (no D1/D2), written under separate names (srd-random-$ATTACK). POOL=data builds the RL
# pool from the defender's own training images instead of surrogate-triggered ones
# (srd-datapool-$ATTACK). BENIGN=1 makes the benign control's cleaning run (srd-benign-$ATTACK):
# D1-D3b with the clean captioner and nothing poisoned, for run/run_defenses.sh BENIGN=1's srd
# row. SEED picks the replicate (run/common.sh): its backdoored model, the
# agent's seed SEED and D4's training seed 42 + SEED (the attack's; run/run_defenses.sh's SRD
# rows refine-tune with seed SEED); names of SEED > 0 end in -sSEED.
#
# Embedded defaults below are smaller than the reference's: the pool takes 300 training images
# (reference: all), the refine-tune srd/budgets.py's REFINE, 2 epochs at lr 1e-3 (reference:
# 20 epochs at 1e-4, the defaults of train/defend.py). The agent runs train/srd_train.py's
# defaults, which are ours (3,000 transitions in 16 batched environments, 5-step episodes over
# the shuffled pool, target copy every 500: every pool image visited twice; docs/agent.md); the
# reference's run is --total_timesteps 10000 --num_envs 1 --max_steps 150 --pool_order random
# --learning_starts 100 --target_update_interval 10000 --exploration_fraction 0.1 --obs_size 224:
# SCHEDULE=reference trains D2 that way (srd_train.py --reference_schedule; its random-policy
# baseline and greedy scoring step 16 batched environments, --eval_envs, ours; runs
# srd[-...]-refsched-$ATTACK, rows tagged "reference agent schedule" by run/run_defenses.sh
# SRD_VARIANTS=refsched).
# Paper setting for the SFS models: set SFS_FLAGS to
#   --text_model <all-MiniLM-L6-v2> --gpt_model <gpt2-large> --blip_model <blip-large>
# REFERENCE_DIR=<exported captioner folder> (train/pretrain.py --export_dir, e.g. another seed)
# makes D1-D3's reward reference that captioner, with its own LM and weights, instead of the
# clean captioner the attack started from (ours: the paper's reference is BLIP, which a
# defender holds and the attack never touched); runs srd-indref-$ATTACK (the defense rows
# "srd [independent reference]" of run/run_defenses.sh).
# VARIANT=<tag> AGENT_FLAGS="--area_cost 2 --occlusion_grid 4" trains D2's agent with our
# variants (srd.defenses.srd.variants, docs/agent.md; none is the reference's), named
# srd[-datapool]-<tag>-$ATTACK...; D3 reads the variant from the policy, and the defense report
# tags its rows with it (run/run_defenses.sh SRD_VARIANTS=<the run's name less srd- and $ATTACK>).
# A policy that reads occlusion maps skips the greedy-square diagnosis and the figures (they do
# not caption the occluded images); D3's kept squares are still diagnosed. AGENT_ONLY=1 stops
# after D2 and its diagnosis, CLEAN_ONLY=1 after D3b and its diagnosis (before D4).
. "$(dirname "$0")/common.sh"
set -e
ATTACK=${ATTACK:-badnet}
POLICY=${POLICY:-dqn}
POOL=${POOL:-surrogate}
export ATTACK
case $POLICY in
  dqn) NAME=srd-$ATTACK$SUFFIX ;;
  random) NAME=srd-random-$ATTACK$SUFFIX ;;
  *) echo "error: POLICY=$POLICY: expected dqn or random" >&2; exit 2 ;;
esac
case $POOL in
  surrogate) ;;
  data) if [ "$POLICY" = dqn ]; then NAME=srd-datapool-$ATTACK$SUFFIX; fi ;;
  *) echo "error: POOL=$POOL: expected surrogate or data" >&2; exit 2 ;;
esac
AGENT_FLAGS=${AGENT_FLAGS:-}
if [ -n "${VARIANT:-}" ]; then
  case $VARIANT in
    *[!a-z0-9]*) echo "error: VARIANT=$VARIANT: expected lower-case letters and digits" >&2; exit 2 ;;
  esac
  if [ -z "$AGENT_FLAGS" ] || [ "$POLICY" != dqn ]; then
    echo "error: VARIANT=$VARIANT: needs POLICY=dqn and the variant's AGENT_FLAGS" >&2; exit 2
  fi
  NAME=${NAME%-"$ATTACK$SUFFIX"}-$VARIANT-$ATTACK$SUFFIX
elif [ -n "$AGENT_FLAGS" ]; then
  echo "error: AGENT_FLAGS=$AGENT_FLAGS: name the variant's runs with VARIANT=<tag>" >&2; exit 2
fi
case ${SCHEDULE:-ours} in
  ours) ;;
  reference)
    if [ "$POLICY" != dqn ] || [ "${BENIGN:-0}" = 1 ]; then
      echo "error: SCHEDULE=reference: needs POLICY=dqn and no BENIGN=1" >&2; exit 2
    fi
    NAME=${NAME%-"$ATTACK$SUFFIX"}-refsched-$ATTACK$SUFFIX
    AGENT_FLAGS="$AGENT_FLAGS --reference_schedule --eval_envs 16" ;;  # (its baseline batched)
  *) echo "error: SCHEDULE=$SCHEDULE: expected ours or reference" >&2; exit 2 ;;
esac
READS_MAPS=0
case " $AGENT_FLAGS " in *" --occlusion_grid "[2-7]*) READS_MAPS=1 ;; esac
SFS_FLAGS=${SFS_FLAGS:-"--reference_checkpoint_path $CLEAN_CHECKPOINT \
  --annotations_path data/synthetic/captions_train2014.json"}
BACKDOOR=checkpoints_remote/backdoor-$ATTACK$SUFFIX/final_weights.pt
BENIGN_FLAG=""
LABEL="$ATTACK model"
if [ "${BENIGN:-0}" = 1 ]; then  # the benign control's cleaning run: D1-D3b on the clean model
  if [ "$POLICY" != dqn ] || [ "$POOL" != surrogate ]; then
    echo "error: BENIGN=1: the benign control runs the agent on the surrogate pool" >&2; exit 2
  fi
  NAME=srd-benign-$ATTACK$SUFFIX BACKDOOR=$CLEAN_CHECKPOINT BENIGN_FLAG=--benign_control
  LABEL="clean captioner (benign control for $ATTACK)"
  CLEAN_ONLY=1
fi
if [ -n "${REFERENCE_DIR:-}" ]; then  # an independent reward reference
  NAME=srd-indref-${NAME#srd-}
  SFS_FLAGS="--reference_model_dir $REFERENCE_DIR \
  --annotations_path data/synthetic/captions_train2014.json"
fi
SRD_DIR=checkpoints_remote/$NAME
SRD_FLAGS="--save_data_path $SRD_DIR/pool --ppo_path $SRD_DIR/policy.zip \
  --clean_data_save $SRD_DIR/clean_data \
  --poison_ids_path checkpoints_remote/backdoor-$ATTACK$SUFFIX/poison_ids.json $BENIGN_FLAG"

if [ "$POLICY" = dqn ]; then
  stage "D1 RL pool: $LABEL on $POOL training images"
  once "$SRD_DIR/pool/DONE" -- \
    $LAUNCH train/srd_pool.py $DATA_FLAGS $MODEL_FLAGS $SRD_FLAGS $SFS_FLAGS \
      --checkpoint_path "$BACKDOOR" \
      --pool_size 300 \
      --pool_source "$POOL" \
      --seed "$SEED"

  stage "D2 DQN agent"
  once "$SRD_DIR/policy.zip" --input "$SRD_DIR/pool/pool.json" -- \
    python train/srd_train.py $MODEL_FLAGS $SRD_FLAGS $SFS_FLAGS \
      --checkpoint_path "$BACKDOOR" \
      --seed "$SEED" $AGENT_FLAGS

  if [ -z "$BENIGN_FLAG" ]; then  # (nothing is triggered in the benign control)
    stage "D2 diagnosis: its squares on the triggered pool images as training went"
    once "$SRD_DIR/policy.training_coverage.json" --input "$SRD_DIR/policy.zip" -- \
      python eval/srd_coverage.py $DATA_FLAGS $SRD_FLAGS --squares training
  fi
  if [ -z "$BENIGN_FLAG" ] && [ $READS_MAPS = 0 ]; then
    stage "D2 diagnosis: where the agent's greedy squares land against the real trigger"
    once "$SRD_DIR/policy.coverage.json" --input "$SRD_DIR/pool/pool.json" -- \
      python eval/srd_coverage.py $DATA_FLAGS $SRD_FLAGS --squares greedy
  fi
  # AGENT_ONLY=1 stops here: the agent measured (policy.agent_report.json) before paying for D3
  [ "${AGENT_ONLY:-0}" = 1 ] && { stage_end; exit 0; }
fi

stage "D3 clean data ($POLICY policy)"
$LAUNCH train/srd_clean_data.py $DATA_FLAGS $MODEL_FLAGS $SRD_FLAGS $SFS_FLAGS \
  --checkpoint_path "$BACKDOOR" \
  --policy "$POLICY" \
  --n_tries 5 \
  --epsilon 0.05 \
  --seed "$SEED"
stage "D3b combine shards"
once "$SRD_DIR/clean_data/merged.json" --input "$SRD_DIR/clean_data/clean_config.json" \
  --input "$BACKDOOR" -- python train/combine_data.py $DATA_FLAGS $SRD_FLAGS

if [ -z "$BENIGN_FLAG" ]; then
  stage "D3 diagnosis: share of triggered images whose square covers the real trigger"
  once "$SRD_DIR/clean_data/coverage.json" --input "$SRD_DIR/clean_data/merged.json" -- \
    python eval/srd_coverage.py $DATA_FLAGS $SRD_FLAGS
fi
# CLEAN_ONLY=1 stops here (run/run_comparison.sh: run/run_defenses.sh refine-tunes on the manifest)
[ "${CLEAN_ONLY:-0}" = 1 ] && { stage_end; exit 0; }

stage "D4 refine-tune (the registry's srd defense: train/defend.py, as run/run_defenses.sh)"
once "$SRD_DIR/DONE" --input "$SRD_DIR/clean_data/merged.json" -- \
  $LAUNCH train/defend.py $DATA_FLAGS $MODEL_FLAGS \
    --defense srd \
    --clean_data_save "$SRD_DIR/clean_data" \
    --poison_ids_path "checkpoints_remote/backdoor-$ATTACK$SUFFIX/poison_ids.json" \
    --checkpoint_path "$BACKDOOR" \
    --run_name "$NAME" \
    --external_save_dir checkpoints_remote \
    --batch_size "$BUDGET_REFINE_BATCH_SIZE" \
    --num_epochs "$BUDGET_REFINE_EPOCHS" \
    --learning_rate "$BUDGET_REFINE_LEARNING_RATE" \
    --lr_scheduler "$BUDGET_REFINE_LR_SCHEDULER" \
    --warmup_steps_ratio "$BUDGET_REFINE_WARMUP_STEPS_RATIO" \
    --epoch_captions_per_image "$BUDGET_REFINE_EPOCH_CAPTIONS_PER_IMAGE" \
    --seed $((42 + SEED)) \
    --resume_from_checkpoint

stage "evaluation: $NAME"
sh run/run_eval.sh
CHECKPOINT=$SRD_DIR/final_weights.pt MODEL_NAME=$NAME sh run/run_eval.sh
for TYPE in clean attack; do
  stage "SFS: $NAME $TYPE"
  NAME=$NAME TYPE=$TYPE sh run/run_eval_SFS.sh
done

if [ "$POLICY" = dqn ] && [ $READS_MAPS = 0 ]; then
  stage "figures"  # named after the run (replicate, rate, budget, pool), written once
  once "img/srd_reward_${NAME#srd-}.png" -- \
    python eval/srd_figures.py $DATA_FLAGS $SRD_FLAGS \
      --bd_attack_type "${ATTACK_SPEC:-$ATTACK}" \
      --before_results "result/backdoor-$ATTACK$SUFFIX.json" \
      --after_results "result/$NAME.json" \
      --name "${NAME#srd-}" \
      --out_dir img
fi
stage_end
