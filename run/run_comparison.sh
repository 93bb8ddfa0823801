#!/bin/sh
# The defense comparison over replicates, the issue's "--seeds 0 1 2": for each SEED of SEEDS,
# the attack (run/run_train.sh: poison draw and training seed 42 + SEED), its evaluation, SRD's
# cleaning D1-D3 (run/run_SRD.sh, agent seed SEED) and every registry defense with SRD's two
# image versions (run/run_defenses.sh, defense seed SEED); result/report.md then shows mean ± std
# over the replicates. The benchmark (data, tiny CLIP, clean captioner) is the same for every
# replicate: run/run_embedded.sh makes it first.
#   ATTACK=badnet SEEDS="0 1 2" sh run/run_comparison.sh
# POISON_RATE=0.05 runs it on models poisoned at that rate (the sweep; run/common.sh), reported
# as their own rows ("badnet (5% poison)"); ATTACK_EPOCHS=12 on models trained that long
# ("blended (12 attack epochs)").
# Finished stages are skipped when made by the same command from the same inputs (once), so a
# re-run resumes. BENIGN=1 adds the benign control (run/run_defenses.sh) once, with seed 0.
. "$(dirname "$0")/common.sh"
set -e
ATTACK=${ATTACK:-badnet}
SEEDS=${SEEDS:-"0 1 2"}
export ATTACK
for SEED in $SEEDS; do
  export SEED
  stage "replicate $SEED: backdoor training ($ATTACK)"
  sh run/run_train.sh
  stage "replicate $SEED: evaluation"
  sh run/run_eval.sh
  stage "replicate $SEED: SRD's cleaning (D1-D3)"
  CLEAN_ONLY=1 sh run/run_SRD.sh
  stage "replicate $SEED: the defenses"
  sh run/run_defenses.sh
done
if [ "${BENIGN:-0}" = 1 ]; then
  stage "benign control"
  SEED=0 BENIGN=1 sh run/run_defenses.sh
fi
stage_end
