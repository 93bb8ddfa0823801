"""The defense comparison report: result/report.md and bar figures in img/ from result JSONs.

Reads every evaluation result under --results that carries a defense record (the checkpoint's
defense.json, or an attack run's checkpoint = no defense) and writes the table of defenses x
attacks (ASR, clean CIDEr, triggered CIDEr with and without the target word, DER, SSIM; mean
+- std over seeds) and ASR / clean-CIDEr bar figures; with --caption_diagnostics on the
synthetic benchmark, the table of what the clean captions get wrong (colours, shapes). A model
poisoned at another rate than its attack config's is its own row ("badnet (5% poison)"). Two
results of the same defense, attack, poison rate and attack seed (e.g. the attack stage's own
evaluation beside the comparison's ``none`` run) are an error, never averaged as seeds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from srd.cli import run_main
from srd.config import arg, parse
from srd.data.attributes import scene_index
from srd.data.records import DataArgs
from srd.defenses.report import write_report
from srd.errors import SRDError

log = logging.getLogger("defense_report")


@dataclass
class ReportArgs:
    """Report: inputs and outputs."""

    results: list[str] = arg(
        help="result JSON files or folders of them, one result per defense, attack and attack "
        "seed (run/run_defenses.sh passes result/defense-*.json)"
    )
    output: str = arg("result/report.md", help="Markdown report to write")
    img_dir: str = arg("img", help="folder of the bar figures")
    caption_diagnostics: bool = arg(
        False,
        help="add the table of what the clean captions get wrong (colours, shapes), scored "
        "against the scenes of the data flags' test split (the synthetic benchmark only; "
        "left out with a note for data without scene descriptions, e.g. COCO)",
    )


def main(argv: Sequence[str] | None = None) -> str:
    data, args = parse(argv, DataArgs, ReportArgs, description=__doc__)
    scenes = None
    if args.caption_diagnostics:
        try:
            scenes = scene_index(data.split("test"))
        except SRDError as err:  # real COCO: no scene descriptions
            log.info("--caption_diagnostics left out: %s", err)
    text = write_report(args.results, args.output, args.img_dir, scenes)
    print(text)
    return text


if __name__ == "__main__":
    run_main(main)
