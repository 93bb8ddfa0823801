"""``python -m srd.defenses POISON_IDS NAME...``: print the defenses among NAME that can run
against the attack recorded in POISON_IDS (an attack run's poison_ids.json), one per line; each
one left out goes to stderr with the reason (e.g. oracle_square without a patch trigger).
run/run_defenses.sh filters its DEFENSES through it, so the default list runs on every attack."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from srd.attacks.trainset import PoisonPlan, plan_attack
from srd.cli import EXIT_BAD_INPUT, light_main
from srd.defenses import DefenseArgs, build_defense


def applicable(poison_ids_path: str, names: Sequence[str]) -> list[str]:
    attack = plan_attack(PoisonPlan.load(poison_ids_path), poison_ids_path)
    keep = []
    for name in names:
        reason = build_defense(DefenseArgs(defense=name)).unavailable(attack)
        if reason:
            print(f"skipped: {name}: {reason}", file=sys.stderr)
        else:
            keep.append(name)
    return keep


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 1:
        print("error: usage: python -m srd.defenses POISON_IDS NAME...", file=sys.stderr)
        return EXIT_BAD_INPUT
    return light_main(lambda: print("\n".join(applicable(argv[0], argv[1:]))))


if __name__ == "__main__":
    sys.exit(main())
