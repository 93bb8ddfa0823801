"""The registry from the shell.

``python -m srd.defenses --list``: every defense, its kind, its own flags and whether
run/run_defenses.sh runs it by default.

``python -m srd.defenses [--benign] POISON_IDS [NAME...]``: the defenses among NAME (default: the
registry's comparison list, or its benign-control list with ``--benign``) that can run against
the attack recorded in POISON_IDS (an attack run's poison_ids.json), one per line; each one left
out goes to stderr with the reason (e.g. oracle_square without a patch trigger).

``python -m srd.defenses --versioned NAME...``: those among NAME whose refine-tune data depend
on ``--image_version`` with their default flags (run/run_defenses.sh runs them in each version).

``python -m srd.defenses --retrainable [NAME...]``: those among NAME (default: every defense)
that are data-level, which ``train/defend.py --retrain_from`` can train the clean captioner on
(run/run_defenses.sh PROTOCOL=retrain runs these).

``python -m srd.defenses --trains NAME...``: those among NAME that refine-tune the model (the
only ones a light budget, ``train/defend.py --max_steps``, applies to: run/run_defenses.sh STEPS).

run/run_defenses.sh takes its lists from here, so a new defense needs no edit of the script.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from srd.attacks.trainset import PoisonPlan, plan_attack
from srd.cli import EXIT_BAD_INPUT, light_main
from srd.defenses import DEFENSES, build_defense

USAGE = (
    "usage: python -m srd.defenses --list | --versioned NAME... | --retrainable [NAME...] | "
    "--trains NAME... | [--benign] POISON_IDS [NAME...]"
)


def default_names(benign: bool) -> list[str]:
    """The registry's comparison list (or its benign-control list), in registration order."""
    return [
        name
        for name, cls in DEFENSES.items()
        if cls.in_comparison and (cls.in_benign_control or not benign)
    ]


def applicable(poison_ids_path: str, names: Sequence[str]) -> list[str]:
    attack = plan_attack(PoisonPlan.load(poison_ids_path), poison_ids_path)
    keep = []
    for name in names:
        reason = build_defense(name).unavailable(attack)
        if reason:
            print(f"skipped: {name}: {reason}", file=sys.stderr)
        else:
            keep.append(name)
    return keep


def versioned(names: Sequence[str]) -> list[str]:
    return [name for name in names if build_defense(name).uses_image_version()]


def retrainable(names: Sequence[str]) -> list[str]:
    return [name for name in names or DEFENSES if build_defense(name).retrainable()]


def trains(names: Sequence[str]) -> list[str]:
    return [name for name in names if build_defense(name).kind == "refine"]


def registry_table() -> str:
    rows = ["defense\tkind\tin comparison\tflags"]
    for name, cls in DEFENSES.items():
        flags = " ".join(f"--{f.name}" for f in dataclasses.fields(cls.Args)) or "-"
        default = "yes" if cls.in_comparison else "no"
        rows.append(f"{name}\t{cls.kind}\t{default}\t{flags}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--list"]:
        return light_main(lambda: print(registry_table()))
    if argv[:1] == ["--versioned"]:
        return light_main(lambda: print("\n".join(versioned(argv[1:]))))
    if argv[:1] == ["--retrainable"]:
        return light_main(lambda: print("\n".join(retrainable(argv[1:]))))
    if argv[:1] == ["--trains"]:
        return light_main(lambda: print("\n".join(trains(argv[1:]))))
    benign = bool(argv) and argv[0] == "--benign"
    if benign:
        argv = argv[1:]
    if len(argv) < 1 or argv[0].startswith("--"):
        print(f"error: {USAGE}", file=sys.stderr)
        return EXIT_BAD_INPUT
    names = argv[1:] or default_names(benign)
    return light_main(lambda: print("\n".join(applicable(argv[0], names))))


if __name__ == "__main__":
    sys.exit(main())
