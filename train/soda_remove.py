"""SODA ``--option=remove``: masked fine-tune on clean + reconstructed samples."""

from __future__ import annotations

from collections.abc import Sequence

from srd.cli import run_main
from srd.config import parse
from srd.soda.args import DefenderArgs, RemoveArgs, ShapesArgs, SodaArgs
from srd.soda.stages import run_remove


def main(argv: Sequence[str] | None = None) -> dict:
    soda, data, defender, args = parse(
        argv, SodaArgs, ShapesArgs, DefenderArgs, RemoveArgs, description=__doc__
    )
    return run_remove(soda, data, defender, args)


if __name__ == "__main__":
    run_main(main)
