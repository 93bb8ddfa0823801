"""Baselines beside SODA's removal: clean fine-tuning or last-layer retraining (DFR)."""

from __future__ import annotations

from collections.abc import Sequence

from srd.cli import run_main
from srd.config import parse
from srd.soda.args import BaselineArgs, DefenderArgs, ShapesArgs, SodaArgs
from srd.soda.stages import run_baseline


def main(argv: Sequence[str] | None = None) -> dict:
    soda, data, defender, args = parse(
        argv, SodaArgs, ShapesArgs, DefenderArgs, BaselineArgs, description=__doc__
    )
    return run_baseline(soda, data, defender, args)


if __name__ == "__main__":
    run_main(main)
