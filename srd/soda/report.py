"""The zoo report: what SODA flags per model against the planted truth, and the removal table
(semantic ASR and clean accuracy before/after for SODA and the baselines, mean +- std over seeds).

Reads only the files the stages wrote: ``<model>/config.json``, ``metrics.json`` and each SODA
output folder's ``detect.json``, ``remove/``, ``finetune/``, ``dfr/`` ``metrics.json``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from srd.errors import SRDError
from srd.io import is_finished, read_json
from srd.soda.detection import pcc_matrix
from srd.soda.shapes import CLASSES

METHODS = ("soda", "soda_oracle", "finetune", "dfr")
"""Removal rows: SODA on its own detection, SODA given the planted pair, and the baselines."""


def _maybe(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _name(index: int | None, classes: Sequence[str]) -> str:
    return "-" if index is None else f"{index} ({classes[index]})"


def _classes(row: dict) -> Sequence[str]:
    return row.get("classes") or CLASSES


def collect_model(model_dir: Path, outputs: dict[str, str]) -> dict:
    """One model's row: its training metrics, detections per output folder, removal results."""
    if not is_finished(model_dir):
        raise SRDError(f"{model_dir}: model run not finished")
    config = read_json(model_dir / "config.json")
    classes = (_maybe(model_dir / "model.json") or {}).get("classes")
    row: dict[str, Any] = {
        "model": model_dir.name,
        "attack": config.get("bd_attack_type", "clean"),
        "seed": config.get("seed"),
        "truth": None,
        "trained": read_json(model_dir / "metrics.json"),
        "detect": {},
        "removal": {},
    }
    if classes and list(classes) != list(CLASSES):  # another benchmark's classes
        row["classes"] = list(classes)
    truth = config.get("semantic")
    if truth:
        row["truth"] = {"target": truth["target"], "source": truth["source"]}
    for key, folder in outputs.items():
        out = model_dir / folder
        det = _maybe(out / "detect.json")
        if det is not None:
            if row["truth"] is not None:
                det["profiles"] = profile_diagnosis(out, det["layer"], row["truth"])
            row["detect"][key] = det
    soda_dir = model_dir / outputs.get("soda", "soda")
    for method, sub in (
        ("soda", soda_dir / "remove"),
        ("finetune", soda_dir / "finetune"),
        ("dfr", soda_dir / "dfr"),
    ):
        metrics = _maybe(sub / "metrics.json")
        if metrics is not None:
            row["removal"][method] = metrics
    if "oracle" in outputs:
        metrics = _maybe(model_dir / outputs["oracle"] / "remove" / "metrics.json")
        if metrics is not None:
            row["removal"]["soda_oracle"] = metrics
    return row


def profile_diagnosis(out: Path, layer: int, truth: dict) -> dict | None:
    """Why the planted target does or does not stand out, from the saved attribution tables.

    ``target_pcc``: mean over analysed classes of Pearson(target profile, mean of the other
    profiles) (the quantity SODA's score is 1 minus), beside the median and min over classes;
    ``target_source_corr``: Pearson(target profile, source profile) beside the median over
    all class pairs (a backdoor routing source features to the target would raise it).
    """
    path = out / f"causality_layer{layer}.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        ca = f["ca"]
    pcc = pcc_matrix(ca).mean(0) * len(ca) / (len(ca) - 1)  # mean over rows s != i
    t, s = truth["target"], truth["source"]
    profile = ca.mean(0)  # (N, C), averaged over analysed classes
    corr = np.corrcoef(profile.T)
    pairs = corr[np.triu_indices(len(corr), 1)]
    return {
        "target_pcc": float(pcc[t]),
        "median_pcc": float(np.median(pcc)),
        "min_pcc": float(pcc.min()),
        "argmin_pcc": int(pcc.argmin()),
        "target_source_corr": float(corr[t, s]),
        "median_pair_corr": float(np.median(pairs)),
        "target_source_corr_rank": int((pairs > corr[t, s]).sum()) + 1,
        "num_pairs": len(pairs),
    }


def diagnosis_table(rows: list[dict], key: str) -> list[str]:
    lines = [
        "| model | planted target's mean PCC with the rest | median over classes | lowest (class) "
        "| corr(target, source) profiles | median over class pairs | its rank among pairs |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        prof = row["detect"].get(key, {}).get("profiles")
        if not prof:
            continue
        lines.append(
            f"| {row['model']} | {prof['target_pcc']:.3f} | {prof['median_pcc']:.3f} "
            f"| {prof['min_pcc']:.3f} ({_name(prof['argmin_pcc'], _classes(row))}) "
            f"| {prof['target_source_corr']:.3f} | {prof['median_pair_corr']:.3f} "
            f"| {prof['target_source_corr_rank']} of {prof['num_pairs']} |"
        )
    return lines


def verdict(row: dict, det: dict) -> str:
    flagged = [(d["target"], d["source"]) for d in det["detections"]]
    truth = row["truth"]
    if truth is None:
        return "correct (nothing flagged)" if not flagged else "false alarm"
    pair = (truth["target"], truth["source"])
    if pair in flagged:
        return "correct pair" if len(flagged) == 1 else "correct pair among others"
    if any(t == truth["target"] for t, _ in flagged):
        return "right target, wrong source"
    return "missed" if not flagged else "wrong target"


def detection_summary(rows: list[dict], key: str) -> dict:
    """Counts over the models with a ``key`` detection: backdoored models flagged with the
    planted pair (alone or among others), with the right target, and clean models flagged."""
    out = {"backdoored": 0, "correct_pair": 0, "right_target": 0, "clean": 0, "false_flags": 0}
    for row in rows:
        det = row["detect"].get(key)
        if det is None:
            continue
        if row["truth"] is None:
            out["clean"] += 1
            out["false_flags"] += bool(det["detections"])
            continue
        out["backdoored"] += 1
        text = verdict(row, det)
        out["correct_pair"] += text.startswith("correct pair")
        out["right_target"] += text.startswith(("correct pair", "right target"))
    return out


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def detection_table(rows: list[dict], key: str) -> list[str]:
    count = max((len(_classes(r)) for r in rows), default=len(CLASSES))
    lines = [
        "| model | truth (target, source) | flagged (target, source) "
        f"| planted target z / rank of {count} | max other z | source rank given true target "
        "| verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        det = row["detect"].get(key)
        if det is None:
            continue
        truth = row["truth"]
        flagged = (
            ", ".join(
                f"({d['target']}, {d['source']}) z={det['target_z'][d['target']]:.2f}"
                for d in det["detections"]
            )
            or "none"
        )
        z = det["target_z"]
        if truth is None:
            planted = rank = "-"
            other = max(z)
        else:
            p = det["planted"]
            planted = f"{p['target_z']:.2f} / {p['target_rank']}"
            rank = str(p["source_rank_given_target"])
            other = max(v for i, v in enumerate(z) if i != truth["target"])
        truth_text = (
            "clean"
            if truth is None
            else f"({_name(truth['target'], _classes(row))}, "
            f"{_name(truth['source'], _classes(row))})"
        )
        lines.append(
            f"| {row['model']} | {truth_text} | {flagged} | {planted} | {other:.2f} | {rank} "
            f"| {verdict(row, det)} |"
        )
    return lines


def removal_rows(rows: list[dict]) -> tuple[list[str], dict]:
    """Per attack and method: ASR and clean accuracy before/after, mean ± std over seeds."""
    groups: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["truth"] is None:
            continue
        for method in METHODS:
            res = row["removal"].get(method)
            if res is None:
                if method == "soda" and row["detect"].get("soda") is not None:
                    # Nothing (or nothing usable) flagged: SODA leaves the model as it is.
                    trained = row["trained"]
                    res = {"before": trained, "after": trained, "not_run": True}
                else:
                    continue
            g = groups[(row["attack"], method)]
            g["asr_before"].append(res["before"]["asr"])
            g["asr_after"].append(res["after"]["asr"])
            g["acc_before"].append(res["before"]["clean_acc"])
            g["acc_after"].append(res["after"]["clean_acc"])
            g["true_after"].append(res["after"].get("semantic_true_acc", 0.0))
            g["not_run"].append(1.0 if res.get("not_run") else 0.0)
    lines = [
        "| attack | method | n | semantic ASR before | ASR after | clean acc before "
        "| clean acc after | sub-population as its true class after "
        "| models SODA left unchanged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for (attack, method), g in sorted(
        groups.items(), key=lambda kv: (kv[0][0], METHODS.index(kv[0][1]))
    ):
        summary[f"{attack}/{method}"] = {k: v for k, v in g.items()}
        lines.append(
            f"| {attack} | {method} | {len(g['asr_after'])} | {_mean_std(g['asr_before'])} "
            f"| {_mean_std(g['asr_after'])} | {_mean_std(g['acc_before'])} "
            f"| {_mean_std(g['acc_after'])} | {_mean_std(g['true_after'])} "
            f"| {int(sum(g['not_run']))} |"
        )
    return lines, summary


def training_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | clean acc | semantic ASR | held-out semantic samples | train s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        t = row["trained"]
        asr = f"{t['asr']:.1f}" if "asr" in t else "-"
        lines.append(
            f"| {row['model']} | {t['clean_acc']:.1f} | {asr} | {t.get('num_semantic', '-')} "
            f"| {t['train_seconds']:.0f} |"
        )
    return lines


def write_report(
    rows: list[dict],
    outputs: dict[str, str],
    notes: list[str],
    title: str = "SODA on the shapes classifier zoo",
) -> tuple[dict, str]:
    """(JSON record, Markdown text) of the zoo."""
    removal_lines, summary = removal_rows(rows)
    detections = {}
    md = [
        f"# {title}",
        "",
        *notes,
        "",
        "## Models",
        "",
        *training_table(rows),
    ]
    for key in outputs:
        if key == "oracle":
            continue
        first = next((r["detect"][key] for r in rows if key in r["detect"]), None)
        if first is None:
            continue
        counts = detections[key] = detection_summary(rows, key)
        md += [
            "",
            f"## Detection: `{key}` (layer {first['layer']}, confidence {first['confidence']}, "
            f"confidence2 {first['confidence2']}; the same thresholds for every model)",
            "",
            *detection_table(rows, key),
            "",
            f"Planted pair found in {counts['correct_pair']} of {counts['backdoored']} backdoored "
            f"models (right target in {counts['right_target']}); {counts['false_flags']} of "
            f"{counts['clean']} clean models flagged.",
            "",
            f"Attribution profiles of the planted pair vs the rest (`{key}`):",
            "",
            *diagnosis_table(rows, key),
        ]
    md += [
        "",
        "## Removal (semantic ASR and clean accuracy in %, mean ± std over seeds)",
        "",
        *removal_lines,
    ]
    record = {"rows": rows, "removal_summary": summary, "detection_summary": detections}
    return record, "\n".join(md) + "\n"


def dumps(record: dict) -> str:
    return json.dumps(record, indent=2)


def plot_target_z(rows: list[dict], keys: list[str], path: str | Path) -> None:
    """One panel per detection folder: every model's target z-scores (one per class), the
    planted target marked, the threshold drawn; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from srd.io import atomic_path

    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 0.45 * len(rows) + 1.5))
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, keys, strict=True):
        names, threshold = [], None
        for y, row in enumerate(rows):
            det = row["detect"].get(key)
            if det is None:
                continue
            threshold = det["confidence"]
            z = np.asarray(det["target_z"])
            ax.scatter(z, np.full(len(z), y), s=12, color="grey")
            if row["truth"] is not None:
                t = row["truth"]["target"]
                ax.scatter([z[t]], [y], s=40, color="red", zorder=3)
            for d in det["detections"]:
                ax.scatter([z[d["target"]]], [y], s=80, facecolors="none", edgecolors="blue")
            names.append((y, row["model"]))
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        ax.set_yticks([y for y, _ in names], [n for _, n in names])
        layer = next((r["detect"][key]["layer"] for r in rows if key in r["detect"]), "?")
        ax.set_title(f"{key} (layer {layer})")
        count = max((len(_classes(r)) for r in rows), default=len(CLASSES))
        ax.set_xlabel(f"MAD z of the {count} target-class scores")
    fig.suptitle("red: planted target; blue ring: flagged; dashed: --confidence")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
