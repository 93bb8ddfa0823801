"""Diagnosis of the SRD cleaning stage: do the chosen red squares cover the real trigger?

Reads the merged cleaning manifest (``--clean_data_save``) and the attack run's poison ids, and
reports the share of triggered training images whose square covers at least half of the patch
trigger, the mean covered share and the square sizes chosen. Writes ``coverage.json`` beside
the manifest and prints it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from srd.cleaning import SRDArgs, plan_attack, read_merged, trigger_coverage
from srd.cli import run_main
from srd.config import parse
from srd.data import DataArgs
from srd.io import write_json
from srd.trainset import PoisonPlan, TrainingImages

log = logging.getLogger("srd_coverage")


def main(argv: Sequence[str] | None = None) -> dict:
    data, srd = parse(argv, DataArgs, SRDArgs, description=__doc__)
    plan = PoisonPlan.load(srd.poison_ids_path)
    attack = plan_attack(plan, srd.poison_ids_path)
    merged = read_merged(srd.clean_data_save)
    triggered = TrainingImages(data.split("train"), attack, plan.ids).poisoned_images
    report = trigger_coverage(merged, attack, triggered)
    write_json(f"{srd.clean_data_save}/coverage.json", report)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    run_main(main)
