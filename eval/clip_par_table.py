"""The CLIP table of the PAR runs (poisoned, PAR, ft, CleanCLIP; mean +- std over seeds).

    python eval/clip_par_table.py --root checkpoints_remote/par

Reads every <attack>/seed<k>/<stage>/metrics.json under --root; writes par_table.json and
par_table.md into --root and prints the Markdown table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from srd.cli import run_main
from srd.config import arg, parse
from srd.io import write_json, write_text
from srd.par.report import collect, to_markdown


@dataclass
class TableArgs:
    """Where the PAR runs are."""

    root: str = arg("checkpoints_remote/par", help="folder of <attack>/seed<k>/<stage> runs")


def main(argv: Sequence[str] | None = None) -> dict:
    (args,) = parse(argv, TableArgs, description=__doc__)
    table = collect(args.root)
    text = to_markdown(table)
    write_json(Path(args.root) / "par_table.json", table)
    write_text(Path(args.root) / "par_table.md", text)
    print(text, end="")
    return table


if __name__ == "__main__":
    run_main(main)
