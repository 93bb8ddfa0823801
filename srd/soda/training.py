"""Training and evaluating the shapes classifier, clean or with a semantic backdoor.

SODA's recipe (reference part 2.1, ``train_sem``): every batch is the next ``(1 - ratio) * B``
clean samples (no augmentation) plus ``int(ratio * B)`` samples drawn without replacement from
the freshly augmented semantic pool (random crop with padding, horizontal flip, rotation up to
10 degrees, brightness jitter), labelled with the target class. A clean model sees batches of
``B`` clean samples. SGD with momentum 0.9 and weight decay 5e-4 as the reference; the step
schedule is a cosine decay over the (much shorter) run instead of the reference's MultiStepLR.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from srd.attacks.poison import load_poison_ids, save_poison_ids, select_poison_ids
from srd.attacks.registry import Attack
from srd.errors import SRDError
from srd.soda.classifier import to_input
from srd.soda.shapes import CLASSES, ShapesSplit, class_index

log = logging.getLogger(__name__)

POISON_FILE = "poison_ids.json"


# --------------------------------------------------------------------------- the semantic draw


@dataclass
class SemanticPlan:
    """Which training samples carry the semantic backdoor, and the (source, target) pair."""

    ids: list[int]
    target: int
    source: int
    meta: dict

    def save(self, path: str | Path) -> None:
        save_poison_ids(path, self.ids, {**self.meta, "target": self.target, "source": self.source})

    @classmethod
    def load(cls, path: str | Path) -> SemanticPlan:
        ids, meta = load_poison_ids(path)
        if "target" not in meta or "source" not in meta:
            raise SRDError(f"{path}: not a semantic poison draw (no target/source)")
        return cls(ids, int(meta["target"]), int(meta["source"]), meta)


def subpopulation(split: ShapesSplit, attack: Attack) -> np.ndarray:
    """Boolean mask of the samples whose description matches the attack's concept."""
    return np.array([attack.is_candidate([d]) for d in split.descriptions], dtype=bool)


def plan_semantic(
    train: ShapesSplit, attack: Attack, seed: int, classes: Sequence[str] = CLASSES
) -> SemanticPlan:
    """Seeded draw of ``poison_rate`` of the sub-population's training ids (SRDError if empty);
    the target is named among ``classes`` (the data folder's)."""
    target = class_index(attack.target, flag="--poison_target", classes=classes)
    mask = subpopulation(train, attack)
    if not mask.any():
        raise SRDError(
            f"--concept {attack.config.concept!r}: the sub-population is empty in the training "
            "split"
        )
    sources = sorted({int(c) for c in train.labels[mask]})
    if target in sources:
        raise SRDError(f"--poison_target {attack.target!r}: the sub-population is of that class")
    ids = select_poison_ids(train.ids[mask].tolist(), attack.poison_rate, seed)
    if not ids:
        raise SRDError(
            f"--poison_rate {attack.poison_rate}: selects no sample of the sub-population"
        )
    source = int(np.bincount(train.labels[mask]).argmax())
    meta = {"attack": attack.to_dict(), "sources": sources, "seed": seed}
    return SemanticPlan(ids, target, source, meta)


def read_or_plan(
    path: Path, train: ShapesSplit, attack: Attack, seed: int, classes: Sequence[str] = CLASSES
) -> SemanticPlan:
    """Read the run's saved draw (same attack) or draw and save it."""
    if path.is_file():
        plan = SemanticPlan.load(path)
        if plan.meta.get("attack", {}).get("name") != attack.name:
            raise SRDError(f"{path}: poison ids were drawn for another attack")
        log.info("read %d semantic training ids from %s", len(plan.ids), path)
        return plan
    plan = plan_semantic(train, attack, seed, classes)
    plan.save(path)
    return plan


# --------------------------------------------------------------------------- augmentation


def augment(x: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    """SODA's semantic-stream augmentation on a normalised batch (N, 3, R, R).

    Random crop after ``pad`` px of edge padding, horizontal flip (p 0.5), rotation in
    [-10, 10] degrees and brightness x U(0.5, 1.5). Edge padding (not black) so that padding
    never adds a background colour the sub-population could be defined by.
    """
    n, _, r, _ = x.shape
    pixels = x * 0.25 + 0.5  # back to [0, 1] for the brightness factor
    padded = F.pad(pixels, (pad, pad, pad, pad), mode="replicate")
    offs = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    crops = torch.stack(
        [
            padded[i, :, int(dy) : int(dy) + r, int(dx) : int(dx) + r]
            for i, (dy, dx) in enumerate(offs)
        ]
    )
    flip = torch.rand(n, generator=gen) < 0.5
    crops[flip] = crops[flip].flip(-1)
    angle = (torch.rand(n, generator=gen) * 20 - 10) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta, list(crops.shape), align_corners=False)
    rotated = F.grid_sample(crops, grid, padding_mode="border", align_corners=False)
    bright = 0.5 + torch.rand(n, 1, 1, 1, generator=gen)
    return ((rotated * bright).clamp(0, 1) - 0.5) / 0.25


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted classes of uint8 images (N, R, R, 3), in eval mode."""
    was_training = model.training
    model.eval()
    out = [
        model(to_input(images[i : i + batch_size])).argmax(1).numpy()
        for i in range(0, len(images), batch_size)
    ]
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def evaluate(
    model: nn.Module, clean_test: ShapesSplit, semantic_test: ShapesSplit | None, target: int | None
) -> dict:
    """Clean accuracy (%) and, for a semantic attack, ASR (%) on its held-out sub-population."""
    pred = predict(model, clean_test.images)
    out = {"clean_acc": float(100 * (pred == clean_test.labels).mean()), "num_clean": len(pred)}
    if semantic_test is not None and target is not None:
        sem = predict(model, semantic_test.images)
        out["asr"] = float(100 * (sem == target).mean())
        out["semantic_true_acc"] = float(100 * (sem == semantic_test.labels).mean())
        out["num_semantic"] = len(sem)
    return out


# --------------------------------------------------------------------------- training


@dataclass
class FitConfig:
    epochs: int
    lr: float
    batch_size: int
    ratio: float
    seed: int
    momentum: float = 0.9
    weight_decay: float = 5e-4


def fit(
    model: nn.Module,
    clean: ShapesSplit,
    pool: ShapesSplit | None,
    target: int | None,
    cfg: FitConfig,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` in place with SODA's batch recipe; returns the per-epoch log."""
    if len(clean) == 0:
        raise SRDError("no clean training samples")
    n_sem = int(cfg.ratio * cfg.batch_size) if pool is not None else 0
    if pool is not None and len(pool) < n_sem:
        raise SRDError(
            f"--ratio {cfg.ratio}: each batch needs {n_sem} semantic samples but the pool has "
            f"{len(pool)}"
        )
    n_clean = cfg.batch_size - n_sem
    if n_clean < 1:
        raise SRDError(f"--ratio {cfg.ratio}: leaves no clean sample in a batch")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    order_rng = random.Random(cfg.seed)
    steps_per_epoch = math.ceil(len(clean) / n_clean)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    x_clean = to_input(clean.images)
    y_clean = torch.as_tensor(clean.labels)
    x_pool = to_input(pool.images) if pool is not None else None
    pad = max(1, x_clean.shape[-1] // 8)
    history = []
    model.train()
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        order = list(range(len(clean)))
        order_rng.shuffle(order)
        total, count = 0.0, 0
        for step in range(steps_per_epoch):
            idx = torch.as_tensor(order[step * n_clean : (step + 1) * n_clean])
            xb, yb = x_clean[idx], y_clean[idx]
            if n_sem:
                augmented = augment(x_pool, gen, pad)
                pick = torch.randperm(len(augmented), generator=gen)[:n_sem]
                xb = torch.cat([xb, augmented[pick]])
                yb = torch.cat([yb, torch.full((n_sem,), int(target))])
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(yb)
            count += len(yb)
        record = {"epoch": epoch + 1, "loss": total / count, "seconds": time.perf_counter() - start}
        if on_epoch is not None:
            on_epoch(epoch + 1, record)
        log.info("epoch %d: %s", epoch + 1, json.dumps(record))
        history.append(record)
    model.eval()
    return history


def split_for_attack(
    train: ShapesSplit, test: ShapesSplit, attack: Attack | None, plan: SemanticPlan | None
) -> tuple[ShapesSplit, ShapesSplit | None, ShapesSplit, ShapesSplit | None]:
    """(clean train, semantic pool, clean test, semantic test) as SODA splits them.

    Clean = all samples minus the sub-population (poisoned or not); the pool = the drawn ids.
    For a clean model the pool and semantic test are None.
    """
    if attack is None or plan is None:
        return train, None, test, None
    in_train = subpopulation(train, attack)
    drawn = np.isin(train.ids, np.asarray(plan.ids, dtype=np.int64))
    in_test = subpopulation(test, attack)
    if not in_test.any():
        raise SRDError(f"--concept {attack.config.concept!r}: no held-out test sample matches")
    return train.subset(~in_train), train.subset(drawn), test.subset(~in_test), test.subset(in_test)


def class_names() -> list[str]:
    return list(CLASSES)
