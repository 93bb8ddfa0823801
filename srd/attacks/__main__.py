"""``python -m srd.attacks SPEC``: the name of the attack a shipped name or a YAML file gives
(the file's ``name:``), checked to be usable in run and result names. run/common.sh calls it for
``ATTACK=<file>.yaml``, so runs are named ``backdoor-<name>``, not after the file's path."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from srd.attacks.registry import build_attack
from srd.cli import EXIT_BAD_INPUT, light_main
from srd.runs import check_run_name


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("error: usage: python -m srd.attacks NAME_OR_YAML", file=sys.stderr)
        return EXIT_BAD_INPUT

    def name() -> int:
        attack = build_attack(argv[0])
        print(check_run_name(attack.name, f"ATTACK={argv[0]} (its name:)"))
        return 0

    return light_main(name)


if __name__ == "__main__":
    sys.exit(main())
