"""SODA step 1 of the attack side: train the shapes classifier, clean or with a semantic backdoor
(SODA's ``train_backdoor_sem.py --option=semtrain``; ``--bd_attack_type clean`` is ``base``)."""

from __future__ import annotations

from collections.abc import Sequence

from srd.cli import run_main
from srd.config import parse
from srd.soda.args import ClassifierTrainArgs, ShapesArgs
from srd.soda.stages import train_classifier


def main(argv: Sequence[str] | None = None) -> str:
    data, args = parse(argv, ShapesArgs, ClassifierTrainArgs, description=__doc__)
    return str(train_classifier(data, args))


if __name__ == "__main__":
    run_main(main)
