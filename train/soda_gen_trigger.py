"""SODA ``--option=gen_trigger``: reconstruct infected samples from source-class images."""

from __future__ import annotations

from collections.abc import Sequence

from srd.cli import run_main
from srd.config import parse
from srd.soda.args import GenTriggerArgs, ShapesArgs, SodaArgs
from srd.soda.stages import run_gen_trigger


def main(argv: Sequence[str] | None = None) -> str:
    soda, data, args = parse(argv, SodaArgs, ShapesArgs, GenTriggerArgs, description=__doc__)
    return str(run_gen_trigger(soda, data, args))


if __name__ == "__main__":
    run_main(main)
