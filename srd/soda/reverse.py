"""SODA step 3 (``gen_trigger``): "infected" samples reconstructed by gradient ascent.

Each source image x is optimised on its own with SGD (lr, momentum 0.9, weight decay 5e-4 as
torch's SGD does them) on ``-logit_target(x) + reg * mean(x^2)`` for at most ``steps`` steps,
stopping when softmax_target(x) >= ``early_stop_th``; it is kept if argmax(x) = target. The
images are optimised as one batch (eval mode, so samples do not interact) with per-sample
stopping: a stopped sample is no longer updated, exactly as if it were optimised alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Reconstruction:
    images: torch.Tensor
    """(N, 3, R, R) optimised inputs in normalised space."""
    steps: torch.Tensor
    """(N,) steps each sample took."""
    kept: torch.Tensor
    """(N,) bool: argmax is the target at the end."""
    start_target_logit: torch.Tensor
    end_target_logit: torch.Tensor


def reconstruct(
    model: nn.Module,
    x: torch.Tensor,
    target: int,
    steps: int,
    lr: float = 0.1,
    reg: float = 0.9,
    early_stop_th: float = 0.99,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> Reconstruction:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        x = x.detach().clone()
        with torch.no_grad():
            start_logit = model(x)[:, target].clone()
        buf = torch.zeros_like(x)
        active = torch.ones(len(x), dtype=torch.bool)
        taken = torch.zeros(len(x), dtype=torch.long)
        for step in range(steps):
            xa = x[active].requires_grad_(True)
            logits = model(xa)
            prob = logits.softmax(1)[:, target].detach()
            done = prob >= early_stop_th
            ids = active.nonzero().squeeze(1)
            active[ids[done]] = False
            if not active.any():
                break
            per_sample = -logits[:, target] + reg * xa.pow(2).flatten(1).mean(1)
            (grad,) = torch.autograd.grad(per_sample.sum(), xa)
            run = ~done
            rows = ids[run]
            d = grad[run] + weight_decay * x[rows]
            buf[rows] = d if step == 0 else momentum * buf[rows] + d
            x[rows] = x[rows] - lr * buf[rows]
            taken[rows] += 1
        with torch.no_grad():
            logits = model(x)
        kept = logits.argmax(1) == target
        return Reconstruction(x, taken, kept, start_logit, logits[:, target])
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
