"""The defense report's budget section: each refine-tune defense at light budgets
(``train/defend.py --max_steps``) beside the comparison's own budget, as a table and ASR /
clean-CIDEr curves over the optimizer steps trained.

Works on :class:`srd.defenses.report.DefenseResult` rows (that module calls
:func:`budget_section`); a (threat model, defense) pair gets a row when at least one of its
results ran at a light budget.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OURS = "ours"
"""The column of the comparison's own budget (no ``--max_steps``: every step of its epochs)."""


def _cell(rs: Sequence[Any]) -> str:
    """ASR / clean CIDEr (x100) as mean (± std over seeds) and the replicate count."""
    if not rs:
        return "-"
    asr = [100 * r.asr for r in rs]
    cider = [100 * r.clean_cider for r in rs]
    spread = f" ± {np.std(asr, ddof=1):.1f}" if len(rs) > 1 else ""
    return f"{np.mean(asr):.1f}{spread} / {np.mean(cider):.1f} (n={len(rs)})"


Label = Callable[[dict[str, Any], str], str]
"""``label(defense block, protocol)``: a row's defense label without its budget tag
(:func:`srd.defenses.report.defense_label`)."""


def sweep(
    results: Sequence[Any], label: Label
) -> dict[tuple[str, str], dict[int | str, list[Any]]]:
    """(attack row, defense without its budget tag) -> budget (steps, or ``OURS``) -> results,
    for the pairs with at least one light-budget result."""
    rows: dict[tuple[str, str], dict[int | str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.defense != "none":
            base = label(r.record, r.protocol)
            rows[(r.attack, base)][r.max_steps or OURS].append(r)
    return {k: dict(v) for k, v in sorted(rows.items()) if any(b != OURS for b in v)}


def _steps(rs: Sequence[Any]) -> str:
    """The steps the comparison's own budget trained (as its records say), e.g. "938"."""
    known = sorted({r.train_steps for r in rs if r.train_steps})
    return "/".join(map(str, known)) or "?"


def budget_table(results: Sequence[Any], label: Label) -> str:
    """Markdown: one row per (threat model, defense); columns the backdoor (``none``), each
    light budget and ours; cells ASR / clean CIDEr (n)."""
    rows = sweep(results, label)
    budgets = sorted({b for row in rows.values() for b in row if b != OURS})
    none = defaultdict(list)
    for r in results:
        if r.defense == "none":
            none[r.attack].append(r)
    ours = [r for row in rows.values() for r in row.get(OURS, [])]
    head = [f"{b} steps" for b in budgets] + [f"ours ({_steps(ours)} steps)"]
    lines = [
        "| Threat model | Defense | no defense | " + " | ".join(head) + " |",
        "|---" * (3 + len(head)) + "|",
    ]
    for (attack, defense), row in rows.items():
        cells = [_cell(row.get(b, [])) for b in [*budgets, OURS]]
        row_cells = [attack, defense, _cell(none[attack]), *cells]
        lines.append("| " + " | ".join(row_cells) + " |")
    return "\n".join(lines) + "\n"


def plot_budget(results: Sequence[Any], label: Label, out_dir: str | Path) -> list[Path]:
    """Per threat model, ASR and clean CIDEr against the steps trained (log scale), a line
    per defense (mean over seeds), the backdoor's own ASR and CIDEr dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from srd.defenses.srd.figures import _save

    rows = sweep(results, label)
    paths = []
    for attack in sorted({a for a, _ in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        none = [r for r in results if r.defense == "none" and r.attack == attack]
        ticks: set[int] = set()
        for (a, defense), row in rows.items():
            if a != attack:
                continue
            points = sorted(
                (b if b != OURS else rs[0].train_steps, rs)
                for b, rs in row.items()
                if b != OURS or rs[0].train_steps
            )
            xs = [x for x, _ in points]
            ticks.update(xs)
            for ax, key in zip(axes, ("asr", "clean_cider"), strict=True):
                ax.plot(xs, [100 * np.mean([getattr(r, key) for r in rs]) for _, rs in points],
                        marker="o", label=defense)  # fmt: skip
        for ax, key, ylabel in zip(
            axes, ("asr", "clean_cider"), ("ASR (%)", "clean CIDEr (x100)"), strict=True
        ):
            if none:
                value = 100 * np.mean([getattr(r, key) for r in none])
                ax.axhline(value, color="grey", linestyle="--", label="no defense")
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
            ax.set_xlabel("refine-tune steps (log)")
            ax.set_ylabel(ylabel)
        axes[0].set_ylim(-3, 103)
        axes[0].set_title(attack)
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        slug = re.sub(r"[^a-z0-9]+", "-", attack.lower()).strip("-")
        paths.append(_save(fig, Path(out_dir) / f"defense_budget_{slug}.png"))
    return paths


def budget_section(
    results: Sequence[Any], label: Label, img_dir: str | Path
) -> tuple[str, list[Path]]:
    """The report's section (empty when no result ran at a light budget) and its figures."""
    if not sweep(results, label):
        return "", []
    text = (
        "\n## Defense budget\n\nEach refine-tune defense at light budgets (`train/defend.py "
        "--max_steps N`: it stops after N optimizer steps, its warm-up and cosine laid over "
        "them; the published clean fine-tune's budget is ~126 steps) beside the comparison's "
        "own. Cells: ASR (%) / clean CIDEr (x100), mean (± std of the ASR) over n seeds; no "
        "defense is the backdoored model itself.\n\n" + budget_table(results, label)
    )
    return text, plot_budget(results, label, img_dir)
