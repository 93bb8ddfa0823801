"""SODA's stages behind the thin entry points: data, training, causality, detect, gen_trigger,
remove and the baselines. Flag names follow the reference where it has the concept
(``--ana_layer``, ``--num_sample``, ``--confidence``, ``--confidence2``, ``--potential_source``,
``--poison_target``, ``--reg``, ``--top``, ``--epoch``, ``--lr``, ``--ratio``, ``--in_model``,
``--output_dir``).

Layout: a model run folder ``<external_save_dir>/<run_name>`` (config.json, train.log,
train_log.jsonl, poison_ids.json, model.safetensors + model.json, metrics.json, DONE last);
SODA's outputs go to ``--output_dir`` (default ``<in_model>/soda``): ``causality_layer<L>.npz``,
``detect.json``, ``advsample.npz``, and the run folders ``remove/``, ``finetune/``, ``dfr/``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srd.attacks.registry import build_attack
from srd.attacks.text import mentions_concept
from srd.config import to_dict
from srd.errors import SRDError
from srd.io import (
    atomic_path,
    ensure_dir,
    is_finished,
    mark_finished,
    prepare_run_dir,
    read_json,
    setup_logging,
    write_json,
)
from srd.runs import check_run_name
from srd.soda import causality, detection, removal, reverse, training
from srd.soda.args import (
    BaselineArgs,
    CausalityArgs,
    ClassifierTrainArgs,
    DefenderArgs,
    DetectArgs,
    GenTriggerArgs,
    RemoveArgs,
    ShapesArgs,
    ShapesBuildArgs,
    SodaArgs,
)
from srd.soda.classifier import (
    ClassifierSpec,
    analysed_layer,
    build_classifier,
    load_classifier,
    save_classifier,
    split_model,
    to_input,
)
from srd.soda.distinct import DistinctConfig, generate_distinct
from srd.soda.shapes import (
    ShapesConfig,
    ShapesSplit,
    check_class,
    data_classes,
    data_config,
    generate_shapes,
    load_split,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data and training


def build_data(args: ShapesBuildArgs) -> Path:
    """The chosen benchmark's data folder: the shared-part shapes set (default) or the
    distinct-part set (:mod:`srd.soda.distinct`)."""
    sizes = (args.seed, args.per_class_train, args.per_class_test, args.resolution)
    if args.benchmark == "distinct":
        return generate_distinct(args.data_dir, DistinctConfig(*sizes), args.overwrite)
    return generate_shapes(args.data_dir, ShapesConfig(*sizes), args.overwrite)


def _semantic_truth(record: dict) -> dict | None:
    return record.get("semantic")


def _splits(data_dir: str, truth: dict | None) -> dict[str, Any]:
    """Clean/semantic train and test splits given the planted truth (None for a clean model)."""
    train, test = load_split(data_dir, "train"), load_split(data_dir, "test")
    if truth is None:
        return {"train": train, "test": test, "pool": None, "sem_test": None}
    concept = truth["concept"]

    def matches(split: ShapesSplit) -> np.ndarray:
        return np.array([mentions_concept([d], concept) for d in split.descriptions], bool)

    in_train, in_test = matches(train), matches(test)
    return {
        "train": train.subset(~in_train),
        "test": test.subset(~in_test),
        "pool": train.subset(in_train),
        "sem_test": test.subset(in_test),
    }


def train_classifier(data: ShapesArgs, args: ClassifierTrainArgs) -> Path:
    """Train a clean or semantically backdoored classifier into its run folder."""
    clean = args.bd_attack_type.lower() in ("clean", "none", "")
    attack = None
    if not clean:
        attack = build_attack(
            args.bd_attack_type,
            concept=args.concept,
            target=args.poison_target,
            poison_rate=args.poison_rate,
        )
        if attack.kind != "semantic":
            raise SRDError(
                f"--bd_attack_type {args.bd_attack_type}: the classifier takes semantic attacks "
                f"only (this one is {attack.kind})"
            )
    name = args.run_name or f"soda-{'clean' if clean else attack.name}-s{args.seed}"
    run_dir = Path(args.external_save_dir) / check_run_name(name, "--run_name")
    if is_finished(run_dir) and not args.overwrite:
        raise SRDError(f"--run_name {run_dir}: run already finished (pass --overwrite to redo it)")
    train, test = load_split(data.data_dir, "train"), load_split(data.data_dir, "test")
    resolution = int(data_config(data.data_dir)["resolution"])
    classes = data_classes(data.data_dir)
    plan = None
    poison_path = run_dir / training.POISON_FILE
    if attack is not None:
        if poison_path.is_file() and not args.overwrite:
            plan = training.read_or_plan(poison_path, train, attack, args.seed, classes)
        else:  # drawn (and checked) before anything is written
            plan = training.plan_semantic(train, attack, args.seed, classes)
    run_dir = prepare_run_dir(run_dir, args.overwrite, "--run_name")
    setup_logging(run_dir / "train.log")
    if plan is not None and (args.overwrite or not poison_path.is_file()):
        plan.save(poison_path)
    clean_train, pool, clean_test, sem_test = training.split_for_attack(train, test, attack, plan)
    spec = ClassifierSpec(len(classes), args.width, args.hidden, resolution)
    torch.manual_seed(args.seed)
    model = build_classifier(spec)
    record: dict[str, Any] = {
        "stage": "soda-train",
        **to_dict(data, args),
        "data": data_config(data.data_dir),
    }
    truth = None
    if attack is not None and plan is not None:
        truth = {
            "attack": attack.to_dict(),
            "concept": attack.config.concept,
            "target": plan.target,
            "source": plan.source,
            "num_poisoned": len(plan.ids),
        }
        record["semantic"] = truth
    write_json(run_dir / "config.json", record)
    fit_cfg = training.FitConfig(args.epoch, args.lr, args.batch_size, args.ratio, args.seed)
    log_path = run_dir / "train_log.jsonl"
    lines: list[str] = []

    def on_epoch(epoch: int, rec: dict) -> None:
        lines.append(json.dumps(rec))
        with atomic_path(log_path) as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")

    start = time.perf_counter()
    training.fit(model, clean_train, pool, plan.target if plan else None, fit_cfg, on_epoch)
    seconds = time.perf_counter() - start
    metrics = training.evaluate(model, clean_test, sem_test, plan.target if plan else None)
    metrics["train_seconds"] = seconds
    metrics["threads"] = torch.get_num_threads()
    save_classifier(run_dir, model, spec, {"semantic": truth, "classes": list(classes)})
    write_json(run_dir / "metrics.json", metrics)
    log.info("trained %s in %.1f s: %s", run_dir, seconds, json.dumps(metrics))
    mark_finished(run_dir)
    return run_dir


# --------------------------------------------------------------------------- SODA common


@dataclass
class Loaded:
    model: torch.nn.Sequential
    spec: ClassifierSpec
    record: dict
    layer: int
    splits: dict[str, Any]
    classes: tuple[str, ...]


def load_for_soda(soda: SodaArgs, data: ShapesArgs) -> Loaded:
    in_model = Path(soda.in_model)
    if not is_finished(in_model):
        raise SRDError(f"--in_model {in_model}: not a finished model run (no DONE)")
    model, spec, record = load_classifier(in_model)
    layer = analysed_layer(model, soda.ana_layer)
    resolution = int(data_config(data.data_dir)["resolution"])
    if resolution != spec.resolution:
        raise SRDError(
            f"--data_dir {data.data_dir}: resolution {resolution} but the model takes "
            f"{spec.resolution}"
        )
    classes = data_classes(data.data_dir)
    if len(classes) != spec.num_classes:
        raise SRDError(
            f"--data_dir {data.data_dir}: {len(classes)} classes but the model has "
            f"{spec.num_classes}"
        )
    ensure_dir(soda.out, "--output_dir")
    setup_logging(soda.out / "soda.log")
    splits = _splits(data.data_dir, _semantic_truth(record))
    return Loaded(model, spec, record, layer, splits, classes)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise SRDError(f"--output_dir {path.parent}: {path.name} exists (pass --overwrite)")


def causality_path(out: Path, layer: int) -> Path:
    return out / f"causality_layer{layer}.npz"


def _by_class(split: ShapesSplit, k: int) -> np.ndarray:
    return split.images[split.labels == k]


# --------------------------------------------------------------------------- stages


def run_causality(soda: SodaArgs, data: ShapesArgs, args: CausalityArgs) -> Path:
    """CA_k (N x C) for every class k on its clean test samples; checks the closed form."""
    m = load_for_soda(soda, data)
    path = causality_path(soda.out, m.layer)
    _refuse_existing(path, soda.overwrite)
    if args.num_sample < 1:
        raise SRDError(f"--num_sample {args.num_sample}: must be positive")
    features, head = split_model(m.model, m.layer, m.spec.resolution)
    rng = np.random.default_rng(soda.seed)
    start = time.perf_counter()
    tables = []
    for k in range(len(m.classes)):
        images = _by_class(m.splits["test"], k)
        if len(images) == 0:
            raise SRDError(f"--data_dir {data.data_dir}: no clean test sample of class {k}")
        tables.append(
            causality.class_attribution(
                features, head, images, args.num_sample, soda.batch_size, rng
            )
        )
    ca = np.stack(tables).astype(np.float32)
    seconds = time.perf_counter() - start
    linear = causality.linear_layer(head)
    closed = None
    if linear is not None:
        closed = float(np.abs(ca - causality.linear_attribution(linear).numpy()[None]).max())
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, ca=ca, layer=m.layer)
    write_json(
        path.with_suffix(".json"),
        {
            "layer": m.layer,
            "neurons": int(ca.shape[1]),
            "classes": len(m.classes),
            "num_sample": args.num_sample,
            "head_is_linear": linear is not None,
            "max_abs_diff_to_abs_weight": closed,
            "seconds": seconds,
        },
    )
    log.info(
        "causality layer %d: %s neurons, %.2f s, |CA - |W|| max %s",
        m.layer,
        ca.shape[1],
        seconds,
        closed,
    )
    return path


@torch.no_grad()
def _mean_logits(
    model: torch.nn.Module, split: ShapesSplit, num_sample: int, rng, num_classes: int
) -> np.ndarray:
    """(C classes, C logits): mean logits over >= num_sample samples of each class."""
    out = np.zeros((num_classes, num_classes))
    for k in range(num_classes):
        images = _by_class(split, k)
        pick = rng.permutation(len(images))[:num_sample]
        out[k] = model(to_input(images[pick])).mean(0).numpy()
    return out


def run_detect(soda: SodaArgs, data: ShapesArgs, args: DetectArgs) -> dict:
    """Target flags from the attribution tables, then the source of each flagged target."""
    m = load_for_soda(soda, data)
    ca_path = causality_path(soda.out, m.layer)
    if not ca_path.is_file():
        raise SRDError(f"--output_dir {soda.out}: no {ca_path.name} (run eval/soda_causality.py)")
    out_path = soda.out / "detect.json"
    _refuse_existing(out_path, soda.overwrite)
    with np.load(ca_path, allow_pickle=False) as f:
        ca = f["ca"]
    scores = detection.target_scores(ca)
    targets = detection.mad_outliers(scores, args.confidence)
    rng = np.random.default_rng(soda.seed)
    logits = _mean_logits(m.model, m.splits["test"], args.num_sample, rng, len(m.classes))
    found = []
    for t in targets.flags:
        pick = detection.pick_source(logits[:, t], t, logits[t], args.confidence2)
        found.append(
            {
                "target": t,
                "source": pick.source,
                "target_name": m.classes[t],
                "source_name": m.classes[pick.source],
                "rule": pick.rule,
                "source_scores": pick.ce.tolist(),
                "source_z": pick.outliers.z.tolist(),
            }
        )
    truth = _semantic_truth(m.record)
    result = {
        "layer": m.layer,
        "confidence": args.confidence,
        "confidence2": args.confidence2,
        "target_scores": scores.tolist(),
        "target_z": targets.z.tolist(),
        "flagged_targets": targets.flags,
        "detections": found,
        "backdoor_detected": bool(found),
        "truth": None if truth is None else {"target": truth["target"], "source": truth["source"]},
    }
    if truth is not None:
        # Diagnosis only (the defence never reads it): where the planted pair ranks.
        t, s = truth["target"], truth["source"]
        pick = detection.pick_source(logits[:, t], t, logits[t], args.confidence2)
        result["planted"] = {
            "target_z": float(targets.z[t]),
            "target_rank": int((scores > scores[t]).sum()) + 1,
            "source_given_target": pick.source,
            "source_rank_given_target": int((pick.ce > pick.ce[s]).sum()) + 1,
            "source_z_given_target": float(pick.outliers.z[s]),
        }
    write_json(out_path, result)
    if found:
        for d in found:
            log.info(
                "[Detection] potential source class: %d, target class: %d", d["source"], d["target"]
            )
    else:
        log.info("No semantic backdoor detected!")
    return result


def _pair(soda: SodaArgs, source: int, target: int, num_classes: int) -> tuple[int, int]:
    """(source, target) from the flags or, when -1, from detect.json's first detection."""
    source_from_detect = source == -1
    if source == -1 or target == -1:
        det = read_json(soda.out / "detect.json", flag="--output_dir")
        if not det["detections"]:
            raise SRDError(
                f"--output_dir {soda.out}: detect.json flags no backdoor; give --potential_source "
                "and --poison_target to go on"
            )
        first = det["detections"][0]
        source = first["source"] if source == -1 else source
        target = first["target"] if target == -1 else target
    check_class(source, "--potential_source", num_classes)
    check_class(target, "--poison_target", num_classes)
    if source == target and not source_from_detect:
        raise SRDError(f"--potential_source {source}: equals --poison_target")
    if source == target:  # the reference's source rule (ce[t] = 0, argmax) when all ce[s] < 0
        raise SRDError(
            f"--output_dir {soda.out}: detect.json names class {target} as both target and source "
            "(no class raises its mean target logit above 0); give --potential_source to go on"
        )
    return source, target


def run_gen_trigger(soda: SodaArgs, data: ShapesArgs, args: GenTriggerArgs) -> Path:
    """Reconstruct infected samples from the first source training images."""
    m = load_for_soda(soda, data)
    source, target = _pair(soda, args.potential_source, args.poison_target, len(m.classes))
    path = soda.out / "advsample.npz"
    _refuse_existing(path, soda.overwrite)
    images = _by_class(m.splits["train"], source)[: args.num_sample]
    if len(images) == 0:
        raise SRDError(f"--potential_source {source}: no training sample of that class")
    start = time.perf_counter()
    rec = reverse.reconstruct(
        m.model, to_input(images), target, args.epoch, args.lr, args.reg, args.early_stop_th
    )
    seconds = time.perf_counter() - start
    kept = rec.images[rec.kept].numpy().astype(np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, images=kept, source=source, target=target)
    summary = {
        "source": source,
        "target": target,
        "tried": len(images),
        "kept": int(rec.kept.sum()),
        "mean_steps": float(rec.steps.float().mean()),
        "target_logit_before": float(rec.start_target_logit.mean()),
        "target_logit_after": float(rec.end_target_logit.mean()),
        "seconds": seconds,
    }
    write_json(soda.out / "advsample.json", summary)
    log.info("gen_trigger: %s", json.dumps(summary))
    return path


def defender_share(train: ShapesSplit, portion: float, seed: int) -> ShapesSplit:
    """Seeded draw of ``int(portion * N)`` clean training samples (the defender's data)."""
    if not 0.0 < portion <= 1.0:
        raise SRDError(f"--clean_portion {portion}: must be in (0, 1]")
    n = max(1, int(portion * len(train)))
    pick = np.sort(np.random.default_rng(seed).permutation(len(train))[:n])
    mask = np.zeros(len(train), bool)
    mask[pick] = True
    return train.subset(mask)


def _evaluate(
    model, m: Loaded, rev_test: torch.Tensor | None = None, target: int | None = None
) -> dict:
    truth = _semantic_truth(m.record)
    out = training.evaluate(
        model, m.splits["test"], m.splits["sem_test"], truth["target"] if truth else None
    )
    if rev_test is not None and len(rev_test) and target is not None:
        with torch.no_grad():
            model.eval()
            out["reverse_asr"] = float(100 * (model(rev_test).argmax(1) == target).float().mean())
    return out


def _finish_defence(
    run_dir: Path, model, m: Loaded, record: dict, before: dict, after: dict
) -> dict:
    result = {**record, "before": before, "after": after}
    save_classifier(
        run_dir,
        model,
        m.spec,
        {"semantic": _semantic_truth(m.record), "classes": list(m.classes)},
    )
    write_json(run_dir / "metrics.json", result)
    mark_finished(run_dir)
    log.info("%s: before %s after %s", run_dir.name, json.dumps(before), json.dumps(after))
    return result


def run_remove(soda: SodaArgs, data: ShapesArgs, defender: DefenderArgs, args: RemoveArgs) -> dict:
    """Masked fine-tune on the defender's clean share plus the reconstructed samples."""
    m = load_for_soda(soda, data)
    source, target = _pair(soda, args.potential_source, args.poison_target, len(m.classes))
    adv_path = soda.out / "advsample.npz"
    if not adv_path.is_file():
        raise SRDError(f"--output_dir {soda.out}: no advsample.npz (run train/soda_gen_trigger.py)")
    with np.load(adv_path, allow_pickle=False) as f:
        adv = torch.as_tensor(f["images"])
        if (int(f["source"]), int(f["target"])) != (source, target):
            raise SRDError(f"{adv_path}: reconstructed for another (source, target) pair")
    ca_path = causality_path(soda.out, m.layer)
    if not ca_path.is_file():
        raise SRDError(f"--output_dir {soda.out}: no {ca_path.name} (run eval/soda_causality.py)")
    with np.load(ca_path, allow_pickle=False) as f:
        ca = f["ca"]
    run_dir = prepare_run_dir(soda.out / "remove", soda.overwrite, "--output_dir")
    # Reference loader: the second half of the reconstructed samples trains, the first tests.
    half = len(adv) // 2
    rev_train, rev_test = adv[half:], adv[:half]
    mask = removal.neuron_mask(ca[source][:, target], args.top)
    share = defender_share(m.splits["train"], defender.clean_portion, soda.seed)
    before = _evaluate(m.model, m, rev_test, target)
    cfg = removal.TuneConfig(defender.epoch, defender.lr, soda.batch_size, soda.seed, args.reg)
    start = time.perf_counter()
    history = removal.soda_remove(
        m.model,
        m.layer,
        m.spec.resolution,
        mask,
        to_input(share.images),
        torch.as_tensor(share.labels),
        rev_train,
        source,
        target,
        cfg,
    )
    seconds = time.perf_counter() - start
    after = _evaluate(m.model, m, rev_test, target)
    record = {
        "stage": "soda-remove",
        "config": to_dict(soda, data, defender, args),
        "source": source,
        "target": target,
        "layer": m.layer,
        "kept_neurons": int(mask.sum()),
        "neurons": len(mask),
        "defender_samples": len(share),
        "reverse_train": len(rev_train),
        "history": history,
        "seconds": seconds,
    }
    return _finish_defence(run_dir, m.model, m, record, before, after)


def run_baseline(
    soda: SodaArgs, data: ShapesArgs, defender: DefenderArgs, args: BaselineArgs
) -> dict:
    """Fine-tuning or DFR on the same defender share and budget as the removal."""
    m = load_for_soda(soda, data)
    run_dir = prepare_run_dir(soda.out / args.method, soda.overwrite, "--output_dir")
    share = defender_share(m.splits["train"], defender.clean_portion, soda.seed)
    before = _evaluate(m.model, m)
    cfg = removal.TuneConfig(defender.epoch, defender.lr, soda.batch_size, soda.seed)
    x, y = to_input(share.images), torch.as_tensor(share.labels)
    start = time.perf_counter()
    if args.method == "finetune":
        history = removal.finetune(m.model, x, y, cfg)
    else:
        if args.dfr_runs < 1:
            raise SRDError(f"--dfr_runs {args.dfr_runs}: must be positive")
        history = removal.dfr(m.model, x, y, cfg, args.dfr_runs)
    seconds = time.perf_counter() - start
    after = _evaluate(m.model, m)
    record = {
        "stage": f"soda-baseline-{args.method}",
        "config": to_dict(soda, data, defender, args),
        "defender_samples": len(share),
        "history": history,
        "seconds": seconds,
    }
    return _finish_defence(run_dir, m.model, m, record, before, after)
