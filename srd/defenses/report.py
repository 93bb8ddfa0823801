"""The defense comparison report: defenses x attacks over seeds, from result JSONs only.

Reads evaluation results (``eval/evaluate.py``) that carry a ``defense`` block (copied from the
checkpoint's ``defense.json``, or the ``none`` record of an attack run's checkpoint); results
without one (e.g. the clean captioner) are skipped. Rows are (defense, attack); each cell is the
mean +- std over seeds (the seed of the backdoored model). DER is computed per seed against the
``none`` result of the same attack and seed (:mod:`srd.defenses.rating`).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from srd.defenses.rating import defense_effectiveness_rating
from srd.errors import SRDError
from srd.io import ensure_dir, read_json, write_text


@dataclass
class DefenseResult:
    path: Path
    defense: str
    attack: str
    seed: int | None
    asr: float
    false_trigger: float | None
    clean_cider: float
    triggered_cider: float | None
    stripped_cider: float | None
    ssim: float | None
    covered: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def defense_label(block: dict[str, Any]) -> str:
    """Name, with the image version when it is not the default one and the defense's
    ``variant`` (e.g. par's non-default data or feature) when it names one."""
    name = str(block["name"])
    version = block.get("image_version")
    tags = [version] if version and version != "triggered" else []
    tags += [block["variant"]] if block.get("variant") else []
    return f"{name} [{', '.join(tags)}]" if tags else name


def read_result(path: Path) -> DefenseResult | None:
    data = read_json(path, flag="--results")
    if not isinstance(data, dict) or "metrics" not in data:
        raise SRDError(f"--results {path}: not an evaluation result")
    record = data.get("defense")
    if not record or data.get("attack") is None:
        return None
    m = data["metrics"]
    if m.get("asr_substring") is None:
        return None
    quality = record.get("image_quality") or {}
    return DefenseResult(
        path=path,
        defense=defense_label(record["defense"]),
        attack=str(data["attack"]),
        seed=record.get("attack_seed"),
        asr=float(m["asr_substring"]),
        false_trigger=m.get("false_trigger_substring"),
        clean_cider=float(m["clean"]["CIDEr"]),
        triggered_cider=(m.get("triggered") or {}).get("CIDEr"),
        stripped_cider=(m.get("triggered_stripped") or {}).get("CIDEr"),
        ssim=quality.get("ssim_mean"),
        covered=(record.get("trigger_coverage") or {}).get("covered"),
    )


def collect(paths: Sequence[str | Path]) -> list[DefenseResult]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise SRDError(f"--results {p}: not found")
    results = [r for r in (read_result(f) for f in files) if r is not None]
    if not results:
        raise SRDError(f"--results {', '.join(map(str, paths))}: no result with a defense record")
    return results


def add_der(results: list[DefenseResult]) -> None:
    """DER of every result against the ``none`` result of its attack and seed (else None)."""
    base = {(r.attack, r.seed): r for r in results if r.defense == "none"}
    for r in results:
        b = base.get((r.attack, r.seed))
        r.extra["der"] = (
            None
            if b is None
            else defense_effectiveness_rating(b.asr, r.asr, b.clean_cider, r.clean_cider)
        )


def _stat(values: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"


COLUMNS = (
    "Defense",
    "Attack",
    "Seeds",
    "ASR (%)",
    "False trigger (%)",
    "CIDEr clean (x100)",
    "CIDEr triggered (x100)",
    "CIDEr triggered, target stripped (x100)",
    "DER",
    "SSIM (processed vs original)",
    "Trigger covered (%)",
)


def group(results: list[DefenseResult]) -> dict[tuple[str, str], list[DefenseResult]]:
    groups: dict[tuple[str, str], list[DefenseResult]] = defaultdict(list)
    for r in results:
        groups[(r.defense, r.attack)].append(r)
    order = sorted(groups, key=lambda k: (k[1], k[0] != "none", k[0]))
    return {k: groups[k] for k in order}


def report_table(results: list[DefenseResult]) -> str:
    add_der(results)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for (defense, attack), rs in group(results).items():
        seeds = sorted({str(r.seed) for r in rs})
        cells = [
            defense,
            attack,
            f"{len(rs)} ({', '.join(seeds)})",
            _stat([r.asr for r in rs], 100),
            _stat([r.false_trigger for r in rs], 100),
            _stat([r.clean_cider for r in rs], 100),
            _stat([r.triggered_cider for r in rs], 100),
            _stat([r.stripped_cider for r in rs], 100),
            _stat([r.extra["der"] for r in rs], 1, 3),
            _stat([r.ssim for r in rs], 1, 3),
            _stat([r.covered for r in rs], 100),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_bars(results: list[DefenseResult], out_dir: str | Path) -> list[Path]:
    """ASR and clean CIDEr bars per defense, one group per attack, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from srd.figures import _save

    groups = group(results)
    attacks = sorted({a for _, a in groups})
    defenses = sorted({d for d, _ in groups}, key=lambda d: (d != "none", d))
    paths = []
    for key, label, scale in (("asr", "ASR (%)", 100), ("clean_cider", "clean CIDEr (x100)", 100)):
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(defenses) * len(attacks)), 3.5))
        width = 0.8 / max(1, len(attacks))
        for k, attack in enumerate(attacks):
            means, stds = [], []
            for d in defenses:
                vals = [getattr(r, key) * scale for r in groups.get((d, attack), [])]
                means.append(np.mean(vals) if vals else np.nan)
                stds.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
            xs = np.arange(len(defenses)) + k * width
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=attack)
        ax.set_xticks(np.arange(len(defenses)) + 0.4 - width / 2)
        ax.set_xticklabels(defenses, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.legend(title="attack")
        paths.append(_save(fig, Path(out_dir) / f"defense_{key}.png"))
    return paths


def write_report(paths: Sequence[str | Path], output: str | Path, img_dir: str | Path) -> str:
    """Write the Markdown report (table + figure links); returns its text."""
    results = collect(paths)
    table = report_table(results)
    ensure_dir(img_dir, "--img_dir")
    figures = plot_bars(results, img_dir)
    out = Path(output)
    ensure_dir(out.parent, "--output")
    rel = [Path(os.path.relpath(Path(p).resolve(), out.parent.resolve())) for p in figures]
    text = (
        "# Defense comparison\n\n"
        "Written by `eval/defense_report.py` from the result JSONs (never by hand). Cells: mean "
        "± std over seeds (seed of the backdoored model); DER on CIDEr against the `none` row "
        "of the same attack and seed ((max(0, dASR) - max(0, relative clean-CIDEr drop) + 1) "
        "/ 2).\n\n" + table + "\n" + "".join(f"![{p.stem}]({p.as_posix()})\n" for p in rel)
    )
    write_text(out, text)
    return text
