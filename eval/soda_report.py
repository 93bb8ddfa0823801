"""SODA zoo report: detection per model against the planted truth, and the removal table with
the baselines (mean +- std over seeds), as JSON and Markdown under result/."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from srd.cli import run_main
from srd.config import arg, parse
from srd.errors import SRDError
from srd.io import setup_logging, write_text
from srd.soda.report import collect_model, dumps, plot_target_z, write_report

log = logging.getLogger("soda_report")


@dataclass
class ReportArgs:
    """Zoo report: which model runs, which SODA output folders, where to write."""

    models: list[str] = arg(help="model run folders (train/soda_train.py)")
    detect_dirs: list[str] = arg(
        ["soda"], help="SODA output folders (inside each model) to tabulate"
    )
    oracle_dir: str = arg(
        "soda-oracle", help="output folder of SODA removal given the planted pair"
    )
    out_json: str = arg("result/soda/soda_zoo.json", help="JSON record")
    out_md: str = arg("result/soda/soda_report.md", help="Markdown report")
    note: list[str] = arg([], help="lines printed under the title (conditions, timings)")
    figure: str = arg("img/soda_target_z.png", help="figure of the target z-scores ('' for none)")
    title: str = arg("SODA on the shapes classifier zoo", help="the report's heading")


def main(argv: Sequence[str] | None = None) -> str:
    (args,) = parse(argv, ReportArgs, description=__doc__)
    setup_logging()
    outputs = {d: d for d in args.detect_dirs}
    outputs["soda"] = args.detect_dirs[0]
    outputs["oracle"] = args.oracle_dir
    dirs = [Path(m) for m in args.models]
    if not dirs:
        raise SRDError("--models: no model run folder given")
    rows = [collect_model(d, outputs) for d in dirs]
    record, md = write_report(rows, {d: d for d in args.detect_dirs}, args.note, args.title)
    write_text(args.out_json, dumps(record) + "\n")
    if args.figure:
        plot_target_z(rows, list(args.detect_dirs), args.figure)
        rel = os.path.relpath(args.figure, Path(args.out_md).parent)
        md += f"\n![target z-scores]({rel})\n"
    write_text(args.out_md, md)
    print(md)
    return args.out_md


if __name__ == "__main__":
    run_main(main)
