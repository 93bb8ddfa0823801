"""Running a defense (``train/defend.py``) and finding the defense record of a checkpoint.

Every defense writes a run folder holding ``defense.json`` (written last but for ``DONE``):
the defense's name, kind and parameters, the attack and the seed of the backdoored model it
starts from, the checkpoint to evaluate (the refined weights, or the backdoored ones for
test-time and no defense), and SSIM/PSNR of processed vs original training images where the
defense changes images. ``eval/evaluate.py`` copies that record into its result, so the report
groups results by defense, attack and seed without parsing names.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from srd.attacks.registry import Attack
from srd.attacks.trainset import PoisonPlan, plan_attack
from srd.captioner.engine import TrainArgs
from srd.config import arg
from srd.defenses.coverage import covered_share, trigger_box
from srd.defenses.quality import image_quality
from srd.defenses.registry import (
    CHECKPOINT_KINDS,
    DefenderData,
    Defense,
    Transform,
    seeded_subset,
)
from srd.defenses.versions import VersionImages, image_ids, triggered_images
from srd.errors import SRDError
from srd.flags import COUNT, positive
from srd.geometry import decode_action
from srd.io import is_finished, read_json, require_files

log = logging.getLogger(__name__)

DEFENSE_FILE = "defense.json"


@dataclass
class RefineTrainArgs(TrainArgs):
    """Training: run folder, optimiser, schedule, checkpoints (the refine-tune budget, one for
    SRD's D4 and every defense of train/defend.py)."""

    run_name: str = arg("", help="run folder name (default: named after the defense and attack)")
    num_epochs: int = arg(20, help="refine-tune epochs (reference: 20)", check=COUNT)
    learning_rate: float = arg(
        1e-4, help="peak learning rate (AdamW; reference: 1e-4)", check=positive()
    )


def require_backdoored_inputs(
    argv: Sequence[str], checkpoint_path: str, poison_ids_path: str
) -> None:
    """SRDError unless --checkpoint_path names the backdoored weights explicitly (a refine-tune
    never starts from the clean default by accident) and both input files exist."""
    named = any(a == "--checkpoint_path" or a.startswith("--checkpoint_path=") for a in argv)
    if not named or checkpoint_path.lower() in ("", "none"):
        raise SRDError(
            "--checkpoint_path: a defense starts from the backdoored weights; name them "
            "explicitly (e.g. checkpoints_remote/backdoor-badnet/final_weights.pt)"
        )
    require_files(("--checkpoint_path", checkpoint_path), ("--poison_ids_path", poison_ids_path))


def benign_plan(plan: PoisonPlan, checkpoint: str) -> PoisonPlan:
    """The benign control's data: the attack's plan with no caption poisoned (the attack still
    names the trigger for the evaluation and the test-time transforms), for a defense run on
    the clean captioner. SRDError when ``checkpoint`` is a backdoored or defended model."""
    if defense_of_checkpoint(checkpoint) is not None:
        raise SRDError(
            f"--benign_control: --checkpoint_path {checkpoint} is a backdoored or defended model; "
            "the control runs a defense on the clean captioner"
        )
    return PoisonPlan(ids=[], captions={}, meta={**plan.meta, "benign_control": True})


def defender_plan(
    poison_ids_path: str, checkpoint: str, benign_control: bool
) -> tuple[PoisonPlan, Attack]:
    """The poison plan a defense (or SRD's D1-D4) works from, and the attack it records: the
    attack run's plan, or under ``--benign_control`` the same with nothing poisoned."""
    plan = PoisonPlan.load(poison_ids_path)
    attack = plan_attack(plan, poison_ids_path)
    if benign_control:
        plan = benign_plan(plan, checkpoint)
    return plan, attack


RETRAIN_PROTOCOL = "retrain_from_clean"
"""A defense record's ``protocol`` when its data trained the clean captioner (``--retrain_from``);
otherwise ``refine``: the backdoored checkpoint refine-tuned (the reference's code, the default)."""


def retrain_start(defense: Defense, retrain_from: str, benign_control: bool) -> str | None:
    """The checkpoint the retrain-from-clean protocol trains (None: the refine protocol).
    SRDError when the defense is not a data-level one, with --benign_control (whose model is
    already the clean captioner), or when ``retrain_from`` is missing or names a backdoored or
    defended model."""
    if not retrain_from:
        return None
    if not defense.retrainable():
        raise SRDError(
            f"--retrain_from: --defense {defense.name} is not a data-level defense (it changes "
            "the model, trains a loss of its own or acts at test time); those that retrain: "
            "python -m srd.defenses --retrainable"
        )
    if benign_control:
        raise SRDError("--retrain_from: the benign control already starts from the clean captioner")
    require_files(("--retrain_from", retrain_from))
    if defense_of_checkpoint(retrain_from) is not None:
        raise SRDError(
            f"--retrain_from {retrain_from}: a backdoored or defended model; the protocol "
            "trains the clean captioner"
        )
    return retrain_from


def named_run(train_args: RefineTrainArgs, default_name: str) -> RefineTrainArgs:
    """``train_args`` with ``default_name`` when --run_name is empty; SRDError if that run
    already finished and --overwrite is not given."""
    if not train_args.run_name:
        train_args = dataclasses.replace(train_args, run_name=default_name)
    if is_finished(train_args.run_dir) and not train_args.overwrite:
        raise SRDError(
            f"--run_name {train_args.run_name}: {train_args.run_dir} already finished "
            "(pass --overwrite)"
        )
    return train_args


def training_quality(
    defense: Defense, data: DefenderData, n: int, training: tuple[Any, Any] | None
) -> dict[str, Any] | None:
    """SSIM/PSNR of what the defense trains on (``training``: its
    :meth:`~srd.defenses.registry.Defense.training_set`, built once by the caller) or of a
    test-time transform applied to the defender's images, against the defender's original
    image versions; None when the defense changes no image or ``n`` is 0."""
    if not defense.changes_images or n == 0:
        return None
    ids = seeded_subset(image_ids(data), n, data.seed)
    if defense.kind == "test_time":
        transform = defense.transform()
        original = VersionImages(data, triggered_images(data, "triggered", data.seed))
        return image_quality(ids, original.version, lambda i: transform(original.version(i)))
    if training is None:
        return None
    _, provider = training
    return image_quality(ids, provider.version, provider.processed)


def square_coverage(
    training: tuple[Any, Any] | None, attack: Attack, threshold: float = 0.5
) -> dict[str, Any] | None:
    """For square defenses (``training``: the defense's training set): the share of the images
    trained in their triggered version whose square covers at least ``threshold`` of the real
    trigger's box (None: no square or no patch trigger)."""
    box = trigger_box(attack)
    if training is None or box is None or not getattr(training[1], "mask_actions", None):
        return None
    images = training[1]
    shares = [
        covered_share(decode_action(images.mask_actions[i]), box)
        for i in sorted(images.triggered)
        if i in images.mask_actions
    ]
    if not shares:
        return None
    return {
        "covered": float(np.mean(np.array(shares) >= threshold)),
        "mean_covered_share": float(np.mean(shares)),
        "num_triggered_images": len(shares),
        "threshold": threshold,
    }


def transform_quality(
    ids: Sequence[int],
    load: Callable[[int], np.ndarray],
    transform: Transform | None,
    n: int = 64,
    seed: int = 0,
) -> dict[str, Any] | None:
    """SSIM/PSNR of transformed vs original images (a seeded draw of ``n`` of ``ids``)."""
    if transform is None or n == 0:
        return None
    picked = seeded_subset(ids, n, seed)
    return image_quality(picked, load, lambda i: transform(load(i)))


ATTACK_FACTS = (
    "attack_seed",
    "attack_poison_rate",
    "attack_poison_unit",
    "attack_epochs",
    "attack_sampling",
)
"""What a defense record says of the backdoored model it started from (:func:`backdoor_facts`)."""


def backdoor_facts(checkpoint: str | Path | None) -> dict[str, Any]:
    """``attack_seed``, ``attack_poison_rate``, ``attack_poison_unit``, ``attack_epochs`` and
    ``attack_sampling`` (its ``--epoch_sampling``) of the attack run that wrote ``checkpoint``
    (its run folder's ``config.json``); all None when it is not an attack run's checkpoint."""
    config = None if checkpoint is None else Path(checkpoint).parent / "config.json"
    record = read_json(config) if config is not None and config.is_file() else None
    if not isinstance(record, dict) or record.get("stage") != "backdoor":
        return dict.fromkeys(ATTACK_FACTS)
    rate = (record.get("attack") or {}).get("poison_rate")
    epochs = record.get("num_epochs")
    return {
        "attack_seed": int(record["seed"]),
        "attack_poison_rate": None if rate is None else float(rate),
        "attack_poison_unit": record.get("poison_unit", "caption"),  # (the only unit before)
        "attack_epochs": None if epochs is None else int(epochs),
        "attack_sampling": record.get("epoch_sampling", "shuffle"),  # (the only one before)
    }


def _read_record(path: Path, flag: str) -> dict[str, Any]:
    """A ``defense.json`` (SRDError naming ``flag`` when it is not a defense record)."""
    record = read_json(path, flag=flag)
    if not isinstance(record, dict) or "defense" not in record:
        raise SRDError(f"{flag} {path}: not a defense record")
    return record


def defense_of_checkpoint(checkpoint: str | Path) -> dict[str, Any] | None:
    """The defense record of a checkpoint: its run folder's ``defense.json``; a backdoored
    checkpoint of an attack run gives the ``none`` record; anything else None."""
    folder = Path(checkpoint).parent
    if (folder / DEFENSE_FILE).is_file():
        return _read_record(folder / DEFENSE_FILE, "--checkpoint_path")
    facts = backdoor_facts(checkpoint)
    if facts["attack_seed"] is None:
        return None
    return {
        "defense": {"name": "none", "kind": "none"},
        **facts,
        "backdoored_checkpoint": str(checkpoint),
    }


def read_defense_run(run_dir: str | Path, checkpoint: str | Path) -> dict[str, Any]:
    """The record of a finished ``train/defend.py`` run that names ``checkpoint`` as the weights
    to evaluate (SRDError naming ``--defense_run`` otherwise)."""
    path = Path(run_dir) / DEFENSE_FILE
    if not is_finished(run_dir) or not path.is_file():
        raise SRDError(
            f"--defense_run {run_dir}: not a finished defense run (no DONE or {DEFENSE_FILE})"
        )
    record = _read_record(path, "--defense_run")
    if os.path.normpath(str(record.get("checkpoint"))) != os.path.normpath(str(checkpoint)):
        raise SRDError(
            f"--defense_run {path}: evaluates {record.get('checkpoint')}, not --checkpoint_path "
            f"{checkpoint}"
        )
    return record


def evaluation_defense_record(
    checkpoint: str | Path, defense: Defense, defense_run: str | Path = ""
) -> dict[str, Any] | None:
    """The ``defense`` block of an evaluation result: the checkpoint's record (or the record of
    ``defense_run``, e.g. a defense run on the clean captioner, whose weights carry none), with
    the test-time defense applied by the evaluation (``--defense``) in place of ``none``."""
    if defense_run:
        record = read_defense_run(defense_run, checkpoint)
        named = record["defense"]
        if named.get("kind") not in CHECKPOINT_KINDS and named["name"] != defense.name:
            raise SRDError(
                f"--defense {defense.name}: the run {defense_run} is of defense {named['name']}"
            )
    else:
        record = defense_of_checkpoint(checkpoint)
    if defense.kind != "test_time":
        return record
    if record is not None and record["defense"]["name"] not in ("none", defense.name):
        raise SRDError(
            f"--defense {defense.name}: {checkpoint} is already defended by "
            f"{record['defense']['name']} (combine defenses in one run, not by stacking)"
        )
    return {**(record or {}), "defense": defense.describe()}


class Timer:
    """Wall time of a stage, for the record."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 2)
