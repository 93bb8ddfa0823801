"""SODA ``--option=causality_analysis``: attribution of every analysed neuron to every class."""

from __future__ import annotations

from collections.abc import Sequence

from srd.cli import run_main
from srd.config import parse
from srd.soda.args import CausalityArgs, ShapesArgs, SodaArgs
from srd.soda.stages import run_causality


def main(argv: Sequence[str] | None = None) -> str:
    soda, data, args = parse(argv, SodaArgs, ShapesArgs, CausalityArgs, description=__doc__)
    return str(run_causality(soda, data, args))


if __name__ == "__main__":
    run_main(main)
