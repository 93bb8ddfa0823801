"""SRD agents side by side: what each D2 run learned and where its squares land.

For each SRD run folder (``run/run_SRD.sh``'s ``checkpoints_remote/srd-*``), from the files its
stages wrote: the agent's variant (srd.defenses.srd.variants; "reference" when none), the reward
landscape of its random policy (eta squared of the square's centre within each square side, with
its value under no effect), the greedy policy's gain over the random one (in the reward it
learned and in the reference table's), the covering signal (transitions on triggered pool images,
how many covered the trigger and their mean table reward against the others'), whether the
occlusion map (if the agent reads one) points at the trigger, and the share of
triggered images whose square covers half the trigger: the greedy square on the pool, on the
triggered training images, D3's first try and D3's kept square (where those stages ran).
Prints a Markdown table (and writes it with ``--output``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srd.cli import run_main
from srd.config import arg, parse
from srd.defenses.srd.env import EnvConfig
from srd.defenses.srd.variants import agent_variant, variant_tags
from srd.errors import SRDError
from srd.io import read_json, write_text


@dataclass
class AgentTableArgs:
    """Which runs, where the table goes."""

    runs: list[str] = arg(help="SRD run folders (checkpoints_remote/srd-*)")
    output: str = arg("", help="also write the Markdown table here")


def _maybe(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def agent_row(folder: Path) -> list[str]:
    """One table row of the SRD run ``folder``."""
    report = read_json(folder / "policy.agent_report.json")
    config = read_json(folder / "policy.config.json")
    pool = read_json(folder / "pool" / "pool.json")
    defaults = EnvConfig()  # (runs written before a variant existed lack its key)
    env = EnvConfig(
        area_cost=float(config.get("area_cost", defaults.area_cost)),
        occlusion_grid=int(config.get("occlusion_grid", defaults.occlusion_grid)),
        max_square_side=int(config.get("max_square_side", defaults.max_square_side)),
    )
    tags = variant_tags(agent_variant(str(pool.get("source", "surrogate")), env))
    structure = report.get("reward_structure", {})
    by_size = structure.get("eta2_centre_by_size", {})
    landscape = ", ".join(
        f"{side}: {v['eta2']:.2f} ({v['null']:.2f})" for side, v in by_size.items()
    )
    during = _maybe(folder / "policy.training_coverage.json")
    signal = (during.get("signal") or {}).get("random") or {}
    signal_text = (
        f"{signal['covering']}/{signal['on_triggered_images']} of {signal['transitions']}: "
        f"{_num(signal['mean_table_reward_covering'], 2)} vs "
        f"{_num(signal['mean_table_reward_not_covering'], 2)}"
        if signal.get("on_triggered_images")
        else "-"
    )
    where = during.get("occlusion_maps") or {}
    map_text = (
        f"{_pct(where['triggered']['largest_is_trigger_cell'])} / "
        f"{_pct(where['clean']['largest_is_trigger_cell'])}"
        if where
        else "-"
    )
    greedy = _maybe(folder / "policy.coverage.json")
    kept = _maybe(folder / "clean_data" / "coverage.json")
    sides = (during.get("greedy_on_pool") or {}).get("square_sides") or {}
    return [
        folder.name,
        ", ".join(tags) or "reference",
        landscape or "-",
        _num(report.get("gain_over_random")),
        _num(report.get("table_gain_over_random", report.get("gain_over_random"))),
        signal_text,
        map_text,
        _pct((during.get("greedy_on_pool") or {}).get("covered")),
        ", ".join(f"{s}: {n}" for s, n in sides.items()) or "-",
        _pct(greedy.get("covered")),
        _pct((kept.get("first_try") or {}).get("covered")),
        _pct(kept.get("covered")),
    ]


COLUMNS = (
    "Run",
    "Agent",
    "Reward landscape: eta2 of the centre per side (null)",
    "Gain over random (learned reward)",
    "Gain over random (table)",
    "Covering signal (random policy: covering/on triggered of all; mean table reward)",
    "Occlusion map's largest cell is the trigger's (triggered / clean pool images)",
    "Greedy covers, triggered pool images",
    "Greedy square sides on the pool",
    "Greedy covers, triggered training images",
    "D3 first try covers",
    "D3 kept square covers",
)


def main(argv: Sequence[str] | None = None) -> str:
    (args,) = parse(argv, AgentTableArgs, description=__doc__)
    rows = []
    for run in map(Path, args.runs):
        if not (run / "policy.agent_report.json").is_file():
            raise SRDError(f"--runs {run}: no policy.agent_report.json (run D2 first)")
        rows.append(agent_row(run))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    if args.output:
        write_text(args.output, text)
    print(text)
    return json.dumps(rows)


if __name__ == "__main__":
    run_main(main)
