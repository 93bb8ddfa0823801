"""SODA ``--option=detect``: the target class (MAD on attribution profiles), then its source."""

from __future__ import annotations

from collections.abc import Sequence

from srd.cli import run_main
from srd.config import parse
from srd.soda.args import DetectArgs, ShapesArgs, SodaArgs
from srd.soda.stages import run_detect


def main(argv: Sequence[str] | None = None) -> dict:
    soda, data, args = parse(argv, SodaArgs, ShapesArgs, DetectArgs, description=__doc__)
    return run_detect(soda, data, args)


if __name__ == "__main__":
    run_main(main)
