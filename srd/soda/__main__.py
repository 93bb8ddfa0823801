"""``python -m srd.soda MODEL LAYER``: print the layer that ``--ana_layer LAYER`` analyses in the
classifier run MODEL (-1: its last hidden layer). run/run_SODA.sh names its causality output
(``causality_layer<L>.npz``) with it before the stage runs, so the stage can be stamped."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from srd.cli import EXIT_BAD_INPUT, light_main
from srd.errors import SRDError
from srd.soda.classifier import analysed_layer, load_classifier


def resolve_layer(model_dir: str, layer: str) -> int:
    try:
        ana_layer = int(layer)
    except ValueError:
        raise SRDError(f"--ana_layer {layer}: not an integer") from None
    return analysed_layer(load_classifier(model_dir)[0], ana_layer)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("error: usage: python -m srd.soda MODEL LAYER", file=sys.stderr)
        return EXIT_BAD_INPUT
    return light_main(lambda: print(resolve_layer(*argv)))


if __name__ == "__main__":
    sys.exit(main())
