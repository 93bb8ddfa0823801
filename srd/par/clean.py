"""The cleaning stage of a (poisoned) CLIP on the defender's clean pairs: PAR, ``ft`` or CleanCLIP.

All three share data, augmentation (PAR's noise + erase), optimiser (AdamW, betas (0.9, 0.98),
weight decay on >= 2-D weights only), batches, epochs and PAR's learning-rate shape: linear from
``lr_start`` down to ``lr`` over the first ``warmup`` share of the steps, then cosine to
``lr_end``. The temperature is frozen (PAR reads it as a float). They differ only in the loss
(:mod:`srd.par.loss`): ``par`` subtracts the thresholded push from a frozen copy of the starting
model, ``ft`` is the same run without it, ``cleanclip`` adds the unimodal terms on augmented views.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from srd.config import arg
from srd.errors import SRDError
from srd.flags import COUNT, at_least
from srd.par.augment import image_views, par_augment, text_view
from srd.par.loss import DEFAULT_TAU, cleanclip_loss, par_loss

log = logging.getLogger(__name__)

METHODS = ("par", "ft", "cleanclip")


@dataclass
class CleanArgs:
    """Cleaning a CLIP on clean image-caption pairs (PAR, plain fine-tune or CleanCLIP)."""

    method: str = arg(
        "par", help="par | ft (no push term) | cleanclip (unimodal views)", choices=METHODS
    )
    clean_data: str = arg(
        "data/clean_seed1",
        help="defender's clean pairs: a benchmark/Karpathy folder or an "
        "image,caption CSV (with header; paths relative to it)",
    )
    epochs: int = arg(3, help="epochs over the clean pairs")
    batch_size: int = arg(128, help="contrastive batch size", check=COUNT)
    lr: float = arg(2e-4, help="peak learning rate (reached after the warm-up)")
    lr_start: float | None = arg(
        None, help="learning rate at step 0 (PAR starts above the peak); default 10 x --lr"
    )
    lr_end: float = arg(1e-9, help="learning rate at the last step (cosine)")
    warmup: float = arg(0.5, help="share of the steps going linearly from lr_start to lr")
    weight_decay: float = arg(1e-4, help="AdamW weight decay on >= 2-D weights", check=at_least(0))
    loss_thresh: float = arg(DEFAULT_TAU, help="PAR's tau: push term off while S exceeds it")
    cleanclip_lambda: float = arg(1.0, help="CleanCLIP: weight of the unimodal loss")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise SRDError(f"--method {self.method}: one of {', '.join(METHODS)}")
        if not self.loss_thresh > 0:
            raise SRDError(f"--loss_thresh {self.loss_thresh}: must be positive")
        if self.epochs < 1:
            raise SRDError(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 2:
            raise SRDError(f"--batch_size {self.batch_size}: a contrastive batch needs 2 pairs")
        if self.lr_start is None:
            self.lr_start = 10 * self.lr
        for name in ("lr", "lr_start"):
            if not getattr(self, name) > 0:
                raise SRDError(f"--{name} {getattr(self, name)}: must be positive")
        if not 0 <= self.warmup < 1:
            raise SRDError(f"--warmup {self.warmup}: must be in [0, 1)")
        if self.cleanclip_lambda < 0:
            raise SRDError(f"--cleanclip_lambda {self.cleanclip_lambda}: must be non-negative")


def lr_at(step: int, total: int, args: CleanArgs) -> float:
    """PAR's schedule: linear lr_start -> lr over the warm-up, then cosine lr -> lr_end."""
    warm = int(total * args.warmup)
    if step < warm:
        return args.lr_start + (args.lr - args.lr_start) * step / warm
    progress = (step - warm) / max(1, total - warm)
    return args.lr_end + 0.5 * (args.lr - args.lr_end) * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, args: CleanArgs) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2]
    rest = [p for n, p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=args.lr_start,
        betas=(0.9, 0.98),
        eps=1e-8,
    )


def clean_clip(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    images: np.ndarray,
    captions: Sequence[Sequence[str]],
    args: CleanArgs,
    seed: int,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Clean ``model`` in place with ``args.method``; returns one log entry per epoch (mean loss
    parts, and for PAR/ft the push distances and how often each switch was on)."""
    args.validate()
    if len(images) != len(captions) or len(images) < args.batch_size:
        raise SRDError(
            f"--clean_data: {len(images)} pairs, fewer than one batch of {args.batch_size}"
        )
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    teacher = None
    if args.method in ("par", "ft"):  # ft logs the same distances
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    model.logit_scale.requires_grad_(False)  # the temperature is not trained
    scale = float(model.logit_scale.detach().exp())
    optimizer = _optimizer(model, args)
    steps = len(images) // args.batch_size
    total = steps * args.epochs
    history = []
    step = 0
    model.train()
    for epoch in range(args.epochs):
        order = rng.permutation(len(images))
        parts_sum: dict[str, float] = {}
        for b in range(steps):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            texts = [captions[i][int(rng.integers(len(captions[i])))] for i in idx]
            pixels = par_augment(images[idx], rng)  # the same view goes to student and teacher
            tokens = tokenizer(texts)
            image_f = model.encode_image(pixels)
            text_f = model.encode_text(tokens)
            if args.method == "cleanclip":
                views = image_views(images[idx], int(rng.integers(2**31)))
                view_f = model.encode_image(views)
                text_v = model.encode_text(tokenizer([text_view(t, rng) for t in texts]))
                loss, parts = cleanclip_loss(
                    image_f, text_f, view_f, text_v, scale, args.cleanclip_lambda
                )
            else:
                with torch.no_grad():
                    t_image, t_text = teacher.encode_image(pixels), teacher.encode_text(tokens)
                loss, parts = par_loss(
                    image_f,
                    text_f,
                    t_image,
                    t_text,
                    scale,
                    args.loss_thresh,
                    push=args.method == "par",
                )
            if not torch.isfinite(loss):
                raise SRDError(f"--lr {args.lr}: the {args.method} loss diverged at step {step}")
            lr = lr_at(step, total, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
            step += 1
        entry = {"epoch": epoch, "step": step, "lr": lr, "logit_scale": scale}
        entry.update({k: v / steps for k, v in parts_sum.items()})
        history.append(entry)
        log.info(
            "%s epoch %d: %s",
            args.method,
            epoch,
            ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if isinstance(v, float)),
        )
        if on_epoch is not None:
            on_epoch(entry)
    model.eval()
    return history
