"""Collect evaluation result JSONs into one Markdown table (printed, and optionally saved).

Example: ``python eval/results_table.py --results result --output result/table.md``
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from srd.cli import run_main
from srd.config import arg, parse
from srd.errors import SRDError
from srd.evaluation.tables import SORT_KEYS, results_table
from srd.io import write_text


@dataclasses.dataclass
class TableConfig:
    """Which result JSONs to tabulate and where to write the table."""

    results: list[str] = arg(["result"], help="result JSON files and/or folders of them")
    output: str | None = arg(None, help="also write the Markdown table to this .md file")
    sort: str | None = arg(
        None,
        help=f"sort rows by a column ({', '.join(SORT_KEYS)}); "
        "prefix '-' for descending, e.g. --sort=-cider_clean",
    )


def main(argv: Sequence[str] | None = None) -> str:
    (cfg,) = parse(argv, TableConfig, description=__doc__.splitlines()[0])
    if cfg.output and Path(cfg.output).is_dir():
        raise SRDError(f"--output {cfg.output}: is a folder, expected a .md file path")
    table = results_table(cfg.results, sort=cfg.sort)
    if cfg.output:
        write_text(cfg.output, table)
    print(table, end="")
    return table


if __name__ == "__main__":
    run_main(main)
