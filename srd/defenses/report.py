"""The defense comparison report: defenses x attacks over seeds, from result JSONs only.

Reads evaluation results (``eval/evaluate.py``) that carry a ``defense`` block (copied from the
checkpoint's ``defense.json``, or the ``none`` record of an attack run's checkpoint); results
without one (e.g. the clean captioner) are skipped. Rows are (defense, attack); each cell is the
mean +- std over seeds (the seed of the backdoored model). DER is computed per seed against the
``none`` result of the same attack and seed (:mod:`srd.defenses.rating`).
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from srd.attacks.config import CONFIG_DIR, known_attacks
from srd.attacks.registry import load_attack_config, recorded_attack_name
from srd.budgets import ATTACK
from srd.data.attributes import attribute_accuracy, colour_recall, object_errors
from srd.data.scenes import COLOURS
from srd.defenses.rating import defense_effectiveness_rating
from srd.defenses.report_agent import agent_section
from srd.defenses.report_budget import budget_section
from srd.defenses.retune import retuned_asr
from srd.defenses.stage import RETRAIN_PROTOCOL, backdoor_facts
from srd.errors import SRDError
from srd.evaluation.captioning import result_captions
from srd.evaluation.tables import check_number, check_result
from srd.io import ensure_dir, read_json, write_text


@dataclass
class DefenseResult:
    path: Path
    defense: str
    attack: str
    seed: int | None
    asr: float
    false_trigger: float | None
    sampled_triggered: float | None
    sampled_clean: float | None
    clean_cider: float
    triggered_cider: float | None
    stripped_cider: float | None
    ssim: float | None
    covered: float | None
    model: str | None = None  # the backdoored checkpoint the defense started from
    benign: bool = False  # a defense run on the clean captioner (seed: the defense's seed)
    record: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    clean_captions: dict[int, str] | None = None  # the evaluation's captions of clean images
    sampling: str | None = None  # the sampled ASR's decoding, as the result records it
    retuned: float | None = None  # ASR after the re-tuning attack (srd.defenses.retune)
    wall_seconds: float | None = None  # the defense stage's own wall time (train/defend.py)
    protocol: str = "refine"  # or RETRAIN_PROTOCOL (train/defend.py --retrain_from)
    max_steps: int | None = None  # a light budget (train/defend.py --max_steps; None: ours)
    train_steps: int | None = None  # optimizer steps the defense trained (None: not recorded)


def defense_label(
    block: dict[str, Any], protocol: str | None = None, max_steps: int | None = None
) -> str:
    """Name, with the image version when it is not the default one, the defense's ``variant``
    (e.g. par's non-default data or feature) when it names one, "retrain from clean" when
    the record's ``protocol`` trained the clean captioner (``train/defend.py --retrain_from``),
    and "N steps" when a light budget (``--max_steps``) cut its training short."""
    name = str(block["name"])
    version = block.get("image_version")
    tags = [version] if version and version != "triggered" else []
    tags += [block["variant"]] if block.get("variant") else []
    tags += ["retrain from clean"] if protocol == RETRAIN_PROTOCOL else []
    tags += [f"{max_steps} steps"] if max_steps else []
    return f"{name} [{', '.join(tags)}]" if tags else name


def _normpath(path: Any) -> str | None:
    return None if path is None else os.path.normpath(str(path))


def attack_fact(record: dict[str, Any], key: str) -> Any:
    """``attack_poison_rate``, ``attack_poison_unit``, ``attack_epochs`` or ``attack_sampling`` of
    the backdoored model a defense record starts from: as recorded, or for records written
    before they named it, read from the attack run of ``backdoored_checkpoint`` (None for the
    benign control, which starts from the clean captioner)."""
    if key in record:
        return record[key]
    return backdoor_facts(record.get("backdoored_checkpoint"))[key]


@functools.cache
def _config_poison_rate(attack: str) -> float | None:
    """The poison rate of a shipped attack's config (None for another name), read once."""
    if attack not in known_attacks():
        return None
    return load_attack_config(CONFIG_DIR / f"{attack}.yaml").poison_rate


def attack_label(
    attack: str,
    rate: float | None,
    epochs: int | None = None,
    unit: str | None = None,
    sampling: str | None = None,
) -> str:
    """The attack's name, with the poison rate when it is not the attack config's own, the
    poison unit when whole images were poisoned, the attack's epochs when they are not the
    default budget and the reference's sample draw when the attack trained with it: models of
    one attack poisoned at two rates or units, or trained for two budgets or with two sample
    orders, are rows of their own, never one averaged cell."""
    tags = []
    if rate is not None and rate != _config_poison_rate(attack):
        tags.append(f"{100 * rate:g}% poison")
    if unit == "image":
        tags.append("image-level poison")
    if epochs is not None and epochs != ATTACK.epochs:
        tags.append(f"{epochs} attack epochs")
    if sampling == "fixed_replacement":
        tags.append("reference sample draw")
    return f"{attack} ({', '.join(tags)})" if tags else attack


def read_result(path: Path, named: bool = True) -> DefenseResult | None:
    """One evaluation result of a defended model, its numbers checked (types and ranges,
    srd.evaluation.tables.check_result). A result without a defense record, an attack or an
    ASR is refused when the file was ``named``, and passed over (None) when it was only found
    in a folder given to ``--results`` (e.g. the backdoored model's own result)."""
    data = read_json(path, flag="--results")
    if not isinstance(data, dict) or "metrics" not in data:
        raise SRDError(f"--results {path}: not an evaluation result")
    check_result(data, path)
    record = data.get("defense")
    m = data["metrics"]
    needed = (
        ("defense record: evaluate it with --defense_run", bool(record)),
        ("attack", data.get("attack") is not None),
        ("ASR", m.get("asr_substring") is not None),
    )
    missing = next((what for what, present in needed if not present), None)
    if missing:
        if named:
            raise SRDError(f"--results {path}: not a defended model's result (no {missing})")
        return None
    if not isinstance(record, dict) or not isinstance(record.get("defense"), dict):
        raise SRDError(f"--results {path}: malformed defense record (not an object)")
    quality = _object(record, "image_quality", path)
    implant = _object(data, "implant", path)

    def share(block: dict[str, Any], key: str, where: str) -> float | None:
        return check_number(block.get(key), f"{path}: malformed result JSON: '{where}{key}'")

    benign = bool(record.get("benign_control"))
    return DefenseResult(
        path=path,
        defense=defense_label(record["defense"], record.get("protocol"), record.get("max_steps")),
        attack=attack_label(
            recorded_attack_name(str(data["attack"]), (data.get("config") or {}).get("attack")),
            attack_fact(record, "attack_poison_rate"),
            attack_fact(record, "attack_epochs"),
            attack_fact(record, "attack_poison_unit"),
            attack_fact(record, "attack_sampling"),
        ),
        seed=record.get("seed") if benign else record.get("attack_seed"),
        asr=float(m["asr_substring"]),
        false_trigger=m.get("false_trigger_substring"),
        sampled_triggered=share(
            _object(implant, "triggered", path), "sampled_asr_substring", "implant.triggered."
        ),
        sampled_clean=share(
            _object(implant, "clean", path), "sampled_asr_substring", "implant.clean."
        ),
        clean_cider=float(m["clean"]["CIDEr"]),
        triggered_cider=(m.get("triggered") or {}).get("CIDEr"),
        stripped_cider=check_number(
            _object(m, "triggered_stripped", path).get("CIDEr"),
            f"{path}: malformed result JSON: 'metrics.triggered_stripped.CIDEr'",
            upper=None,
        ),
        ssim=share(quality, "ssim_mean", "defense.image_quality."),
        covered=share(_object(record, "trigger_coverage", path), "covered", "trigger_coverage."),
        model=_normpath(record.get("backdoored_checkpoint")),
        benign=benign,
        record=dict(record["defense"]),
        clean_captions=result_captions(data),
        sampling=implant.get("decoding"),
        retuned=retuned_asr(path),
        wall_seconds=check_number(
            record.get("wall_seconds"),
            f"{path}: malformed result JSON: 'defense.wall_seconds'",
            upper=None,
        ),
        protocol=str(record.get("protocol") or "refine"),
        max_steps=record.get("max_steps"),
        train_steps=record.get("train_steps"),
    )


def _object(block: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    """``block[key]`` when it is an object, {} when absent or null; SRDError otherwise."""
    value = block.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SRDError(f"{path}: malformed result JSON ('{key}' must be an object)")
    return value


def _models(a: DefenseResult, b: DefenseResult) -> str:
    """' (backdoored models X and Y)' where the records name them."""
    known = [m for m in (a.model, b.model) if m is not None]
    return f" (backdoored models {' and '.join(known)})" if known else ""


def collect(paths: Sequence[str | Path]) -> list[DefenseResult]:
    files: list[tuple[Path, bool]] = []  # (file, named on the command line)
    for p in map(Path, paths):
        if p.is_dir():
            files += [(f, False) for f in sorted(p.glob("*.json"))]
        elif p.is_file():
            files.append((p, True))
        else:
            raise SRDError(f"--results {p}: not found")
    results = [r for r in (read_result(f, named) for f, named in files) if r is not None]
    if not results:
        raise SRDError(f"--results {', '.join(map(str, paths))}: no result with a defense record")
    seen: dict[tuple[str, str, int | None, bool], DefenseResult] = {}
    for r in results:
        first = seen.setdefault((r.defense, r.attack, r.seed, r.benign), r)
        if first is not r:  # two runs of one cell would be averaged as if they were two seeds
            what = "a benign control with seed" if r.benign else "attack seed"
            raise SRDError(
                f"--results {first.path} and {r.path}: both are {r.defense} on {r.attack} with "
                f"{what} {r.seed}{_models(first, r)}; pass the results of one comparison "
                f"(run/run_defenses.sh: result/defense-*.json, result/benign-*.json)"
            )
    return results


def add_der(results: list[DefenseResult]) -> None:
    """DER of every result against the ``none`` result of its attack and seed (else None)."""
    base = {(r.attack, r.seed): r for r in results if r.defense == "none"}
    for r in results:
        b = base.get((r.attack, r.seed))
        if b is not None and None not in (b.model, r.model) and b.model != r.model:
            raise SRDError(
                f"--results {r.path}: defends {r.model}, but the none row of {r.attack} with "
                f"attack seed {r.seed} ({b.path}) is {b.model}"
            )
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


def _count(values: list[float | None]) -> str:
    """' (n=k)' when only k of the row's results have the value (k > 0)."""
    k = sum(v is not None for v in values)
    return f" (n={k})" if 0 < k < len(values) else ""


def _sampled(rs: list[DefenseResult]) -> str:
    """ASR of sampled captions on triggered and on clean test images (the implant diagnostic of
    ``eval/evaluate.py``; '-' where it was not run)."""
    triggered = _stat([r.sampled_triggered for r in rs], 100)
    clean = _stat([r.sampled_clean for r in rs], 100)
    if triggered == clean == "-":
        return "-"
    samplers = {r.sampling for r in rs if r.sampled_triggered is not None}
    return f"{triggered} / {clean}" + (" (mixed samplers)" if len(samplers) > 1 else "")


COLUMNS = (
    "Defense",
    "Attack",
    "Seeds",
    "ASR (%)",
    "False trigger (%)",
    "Sampled ASR, triggered / clean images (%)",
    "CIDEr clean (x100)",
    "CIDEr triggered (x100)",
    "CIDEr triggered, target stripped (x100)",
    "DER",
    "SSIM (processed vs original)",
    "Trigger covered (%)",
    "ASR after re-tune (%)",
)


def group(results: list[DefenseResult]) -> dict[tuple[str, str], list[DefenseResult]]:
    groups: dict[tuple[str, str], list[DefenseResult]] = defaultdict(list)
    for r in results:
        groups[(r.defense, r.attack)].append(r)
    order = sorted(groups, key=lambda k: (k[1], k[0] != "none", k[0]))
    return {k: groups[k] for k in order}


def _table(
    columns: Sequence[str],
    results: list[DefenseResult],
    cells: Callable[[list[DefenseResult]], list[str]],
) -> str:
    """A Markdown table with one row per (defense, attack): defense, attack, seeds, then
    ``cells`` of the row's results."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for (defense, attack), rs in group(results).items():
        seeds = sorted({str(r.seed) for r in rs})
        row = [defense, attack, f"{len(rs)} ({', '.join(seeds)})", *cells(rs)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def report_table(results: list[DefenseResult]) -> str:
    """The defenses x attacks table of the defenses run on backdoored models."""
    add_der(results)
    return _table(
        COLUMNS,
        results,
        lambda rs: [
            _stat([r.asr for r in rs], 100),
            _stat([r.false_trigger for r in rs], 100),
            _sampled(rs),
            _stat([r.clean_cider for r in rs], 100),
            _stat([r.triggered_cider for r in rs], 100),
            _stat([r.stripped_cider for r in rs], 100),
            _stat([r.extra["der"] for r in rs], 1, 3),
            _stat([r.ssim for r in rs], 1, 3),
            _stat([r.covered for r in rs], 100),
            _stat([r.retuned for r in rs], 100) + _count([r.retuned for r in rs]),
        ],
    )


def ranking_table(results: list[DefenseResult]) -> str:
    """Per threat model (attack row label, the protocol when the defenses retrained the clean
    captioner, and the light budget when one cut their training short), the defenses ranked
    by mean DER (then lower ASR, then higher clean CIDEr); rows without a DER (no ``none`` row
    of their attack) come last. Needs :func:`add_der` first."""
    lines = [
        "| Threat model | Rank | Defense | Seeds | DER | ASR (%) | CIDEr clean (x100) "
        "| Defense stage wall time (s) |",
        "|---" * 8 + "|",
    ]
    by_attack: dict[str, list[tuple[str, list[DefenseResult]]]] = defaultdict(list)
    for (defense, attack), rs in group(results).items():
        apart = ["retrain from clean"] if rs[0].protocol == RETRAIN_PROTOCOL else []
        apart += [f"{rs[0].max_steps} steps"] if rs[0].max_steps else []  # (one per row label)
        by_attack["; ".join([attack, *apart])].append((defense, rs))

    def mean(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return float(np.mean(kept)) if kept else None

    for attack, rows in by_attack.items():

        def key(row: tuple[str, list[DefenseResult]]) -> tuple[float, float, float]:
            der = mean([r.extra.get("der") for r in row[1]])
            return (-(der if der is not None else -1.0), mean([r.asr for r in row[1]]) or 0.0,
                    -(mean([r.clean_cider for r in row[1]]) or 0.0))  # fmt: skip

        for rank, (defense, rs) in enumerate(sorted(rows, key=key), start=1):
            seeds = ", ".join(sorted({str(r.seed) for r in rs}))
            cells = [attack, str(rank), defense, f"{len(rs)} ({seeds})",
                     _stat([r.extra.get("der") for r in rs], 1, 3), _stat([r.asr for r in rs], 100),
                     _stat([r.clean_cider for r in rs], 100),
                     _stat([r.wall_seconds for r in rs], 1, 0)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


OTHER_COLOURS = tuple(c for c in COLOURS if c != "red")
"""The benchmark's object colours other than red (red is the masks' default colour)."""

CAPTION_COLUMNS = (
    "Defense",
    "Attack",
    "Seeds",
    "Attribute accuracy (%)",
    "Red named (%)",
    f"Other colours named: {' / '.join(OTHER_COLOURS)} (%, mean)",
    "Objects named (%)",
    "Wrong shape (%)",
    "Wrong colour (%)",
    "Not named (%)",
    "Named, not shown (%)",
)


def caption_diagnostics(
    captions: dict[int, str] | None, scenes: Mapping[int, Sequence[Any]]
) -> dict[str, float | None] | None:
    """What one evaluation's clean captions get right and wrong on the synthetic benchmark:
    :func:`srd.data.attributes.attribute_accuracy`, :func:`~srd.data.attributes.colour_recall` per
    colour (keys ``recall_<colour>``) and :func:`~srd.data.attributes.object_errors`; None without
    captions of benchmark scenes."""
    if not captions or any(i not in scenes for i in captions):
        return None
    recall = colour_recall(captions, scenes)
    return {
        "accuracy": attribute_accuracy(captions, scenes),
        **{f"recall_{c}": v["recall"] for c, v in recall.items()},
        **object_errors(captions, scenes),
    }


def caption_table(results: list[DefenseResult], scenes: Mapping[int, Sequence[Any]]) -> str:
    """The defenses x attacks table of :func:`caption_diagnostics` (mean ± std over seeds; the
    other colours' recall as one cell of means, so a mask that stops the captioner naming
    another colour than red shows too)."""
    found = {id(r): caption_diagnostics(r.clean_captions, scenes) or {} for r in results}

    def column(rs: list[DefenseResult], key: str) -> str:
        return _stat([found[id(r)].get(key) for r in rs], 100)

    def others(rs: list[DefenseResult]) -> str:
        means = []
        for c in OTHER_COLOURS:
            values = [found[id(r)].get(f"recall_{c}") for r in rs]
            values = [v for v in values if v is not None]
            means.append(f"{100 * np.mean(values):.0f}" if values else "-")
        return "-" if set(means) == {"-"} else " / ".join(means)

    errors = ("named", "wrong_shape", "wrong_colour", "missing", "extra")
    return _table(
        CAPTION_COLUMNS,
        results,
        lambda rs: [
            column(rs, "accuracy"),
            column(rs, "recall_red"),
            others(rs),
            *[column(rs, k) for k in errors],
        ],
    )


CAPTION_SECTION = (
    "\n## What the clean captions get wrong (synthetic benchmark)\n\n"
    "From each evaluation's captions of the clean test images against the scenes the benchmark "
    "drew: attribute accuracy (the caption names exactly the image's colour-shape pairs); of "
    "the images showing an object of a colour, the share whose caption names that colour (red, "
    "the masks' default colour, mean ± std; the other five colours, mean over the seeds); of "
    "the objects the images show, the share named, named with the wrong shape, named with the "
    "wrong colour or not named at all; and the named objects the image does not show, as a "
    "share of the shown ones.\n\n"
)


BENIGN_COLUMNS = (
    "Defense",
    "Trigger of the evaluation",
    "Seeds",
    "CIDEr clean (x100)",
    "Change against no defense (%)",
    "False trigger (%)",
    "SSIM (processed vs original)",
)


def benign_table(results: list[DefenseResult]) -> str:
    """The benign control: each defense run on the clean captioner (``train/defend.py
    --benign_control``), its clean CIDEr and the relative change against the clean captioner's
    ``none`` row of the same seed (what the defense costs a model without a backdoor)."""
    base = {(r.attack, r.seed): r for r in results if r.defense == "none"}

    def change(r: DefenseResult) -> float | None:
        b = base.get((r.attack, r.seed))
        return None if b is None or not b.clean_cider else 100 * (r.clean_cider / b.clean_cider - 1)

    return _table(
        BENIGN_COLUMNS,
        results,
        lambda rs: [
            _stat([r.clean_cider for r in rs], 100),
            _stat([change(r) for r in rs]),
            _stat([r.false_trigger for r in rs], 100),
            _stat([r.ssim for r in rs], 1, 3),
        ],
    )


def plot_bars(results: list[DefenseResult], out_dir: str | Path) -> list[Path]:
    """ASR and clean CIDEr bars per defense, one group per attack, error bars = std over seeds
    (none where a cell has one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from srd.defenses.srd.figures import _save

    groups = group(results)
    attacks = sorted({a for _, a in groups})
    defenses = sorted({d for d, _ in groups}, key=lambda d: (d != "none", d))
    paths = []
    for key, label, scale in (("asr", "ASR (%)", 100), ("clean_cider", "clean CIDEr (x100)", 100)):
        fig, ax = plt.subplots(figsize=(max(6.0, 2 + 0.35 * len(defenses) * len(attacks)), 3.5))
        width = 0.8 / max(1, len(attacks))
        for k, attack in enumerate(attacks):
            means, stds = [], []
            for d in defenses:
                vals = [getattr(r, key) * scale for r in groups.get((d, attack), [])]
                means.append(np.mean(vals) if vals else np.nan)
                stds.append(np.std(vals, ddof=1) if len(vals) > 1 else np.nan)  # no bar: 1 seed
            xs = np.arange(len(defenses)) + k * width
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=attack)
        ax.set_xticks(np.arange(len(defenses)) + 0.4 - width / 2)
        ax.set_xticklabels(defenses, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.legend(title="attack", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        paths.append(_save(fig, Path(out_dir) / f"defense_{key}.png"))
    return paths


def _links(figures: Sequence[Path], start: Path) -> str:
    """Markdown image lines for ``figures``, relative to the report's folder ``start``."""
    rel = [Path(os.path.relpath(Path(p).resolve(), start.resolve())) for p in figures]
    return "".join(f"![{p.stem}]({p.as_posix()})\n" for p in rel)


def write_report(
    paths: Sequence[str | Path],
    output: str | Path,
    img_dir: str | Path,
    scenes: Mapping[int, Sequence[Any]] | None = None,
) -> str:
    """Write the Markdown report (table + figure links, and with the benchmark's ``scenes`` the
    table of what the clean captions get wrong); returns its text."""
    everything = collect(paths)
    results = [r for r in everything if not r.benign]
    benign = [r for r in everything if r.benign]
    table = report_table(results) if results else "(no defense run on a backdoored model)\n"
    ensure_dir(img_dir, "--img_dir")
    figures = plot_bars(results, img_dir) if results else []
    agent, agent_figures = agent_section(results, img_dir)
    out = Path(output)
    ensure_dir(out.parent, "--output")
    text = (
        "# Defense comparison\n\n"
        "Written by `eval/defense_report.py` from the result JSONs (never by hand). Cells: mean "
        "± std over seeds (seed of the backdoored model); DER on CIDEr against the `none` row "
        "of the same attack and seed ((max(0, dASR) - max(0, relative clean-CIDEr drop) + 1) "
        "/ 2). ASR is of the evaluation's decoded captions (the reference decodes with beam "
        "search); the sampled ASR (temperature 1, one caption per image from the image's own "
        "seed) shows a backdoor that beam search hides, beside the same rate on clean images "
        "(results written before per-image seeds drew from torch's global RNG, so their draw "
        "depended on the batch size; a cell mixing both samplers says so).\n\n"
        + table
        + "\n"
        + _links(figures, out.parent)
    )
    if results:
        text += (
            "\n## Ranking per threat model\n\nEach threat model's (attack row's; the "
            "retrain-from-clean protocol's and each light budget's apart) defenses, best first "
            "by DER, then lower ASR, then higher clean CIDEr; the wall time is the defense "
            "stage's own (train/defend.py: scoring, pruning, refine-tune; for srd its D4 only, "
            "not the agent and cleaning before it), not the evaluation, on whatever machine and "
            "load it ran.\n\n" + ranking_table(results)
        )
    budget, budget_figures = budget_section(results, defense_label, img_dir)
    text += budget + ("\n" + _links(budget_figures, out.parent) if budget else "")
    if benign:
        text += (
            "\n## Benign control\n\nEach defense run on the clean captioner "
            "(`train/defend.py --benign_control`: the defender's data with no caption "
            "poisoned, the same budget): its clean CIDEr and the change against the clean "
            "captioner itself (`none`, same seed), i.e. what the defense costs a model that "
            "has no backdoor. Seeds: the defense's seed.\n\n" + benign_table(benign)
        )
    if scenes is not None and results:
        text += CAPTION_SECTION + caption_table(results, scenes)
    if agent:
        text += "\n" + agent + "\n" + _links(agent_figures, out.parent)
    write_text(out, text)
    return text
