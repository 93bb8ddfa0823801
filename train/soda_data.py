"""SODA data: the single-object shapes classification set (18 colour-shape classes)."""

from __future__ import annotations

from collections.abc import Sequence

from srd.cli import run_main
from srd.config import parse
from srd.io import setup_logging
from srd.soda.args import ShapesBuildArgs
from srd.soda.stages import build_data


def main(argv: Sequence[str] | None = None) -> str:
    (args,) = parse(argv, ShapesBuildArgs, description=__doc__)
    setup_logging()
    return str(build_data(args))


if __name__ == "__main__":
    run_main(main)
