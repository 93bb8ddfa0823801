"""The CLIP table of run/run_PAR.sh: per attack and model (poisoned, par, ft, cleanclip), the mean
+- std over seeds of each metric, read from the runs' metrics.json (never recomputed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from srd.errors import SRDError
from srd.io import read_json

STAGES = ("poisoned", "par", "ft", "cleanclip")
COLUMNS = ("top1", "colour", "shape", "any_object", "asr", "false_trigger", "R@1", "R@5",
           "asr_text")  # fmt: skip


def collect(root: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{attack: {stage: {metric: {"mean", "std", "n"}, "seeds": [...]}}}`` from
    ``root/<attack>/seed<k>/<stage>/metrics.json``."""
    root = Path(root)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(root.glob("*/seed*/*/metrics.json")):
        stage, seed, attack = path.parent.name, path.parent.parent.name, path.parents[2].name
        if stage not in STAGES:
            continue
        metrics = read_json(path)
        entry = table.setdefault(attack, {}).setdefault(stage, {"seeds": [], "values": {}})
        entry["seeds"].append(int(seed.removeprefix("seed")))
        for key in COLUMNS:
            if key in metrics:
                entry["values"].setdefault(key, []).append(float(metrics[key]))
    if not table:
        raise SRDError(f"--root {root}: no <attack>/seed<k>/<stage>/metrics.json below it")
    for stages in table.values():
        for entry in stages.values():
            values = entry.pop("values")
            for key, vals in values.items():
                entry[key] = {
                    "mean": float(np.mean(vals)),
                    "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                    "n": len(vals),
                }
    return table


def to_markdown(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One row per (attack, stage); cells "mean +- std" (percent)."""
    head = "| attack | model | seeds | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for attack, stages in table.items():
        for stage in STAGES:
            if stage not in stages:
                continue
            entry = stages[stage]
            cells = []
            for key in COLUMNS:
                cell = entry.get(key)
                cells.append("-" if cell is None else f"{cell['mean']:.1f} ± {cell['std']:.1f}")
            seeds = ",".join(map(str, sorted(entry["seeds"])))
            lines.append(f"| {attack} | {stage} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
