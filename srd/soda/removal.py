"""SODA step 4 (``remove``) and the two baselines on the same defender data.

SODA: keep the top ``top`` share of the analysed layer's neurons by CA_source[:, target]
(``locate_outstanding_neuron``), put a 0/1 mask after that layer, fine-tune everything (SGD,
momentum 0.9, weight decay 5e-4, BatchNorm in train mode) with batches of ``B - n_rev`` clean
samples plus ``n_rev`` reconstructed samples (cycled) labelled with the *detected source* (the
reference code passes no source, so class 0; see the reference §2.5), on
``CE(batch) - reg * CE(reconstructed -> target)``; then drop the mask.

Baselines: plain fine-tuning of all weights on the clean share (same epochs, batch, lr), and
DFR as the reference's ``dfr`` option: ``dfr_runs`` fine-tunes of the last layer only (other
weights frozen, BatchNorm in train mode) on the clean share, their state dicts averaged.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from srd.errors import SRDError
from srd.soda.classifier import split_model

log = logging.getLogger(__name__)


def neuron_mask(attribution: np.ndarray, top: float) -> np.ndarray:
    """0/1 float mask keeping the ``int(top * N)`` (at least 1) largest entries of (N,)."""
    if not 0.0 < top <= 1.0:
        raise SRDError(f"--top {top}: must be in (0, 1]")
    n = len(attribution)
    keep = max(1, int(top * n))
    order = np.argsort(-np.asarray(attribution), kind="stable")
    mask = np.zeros(n, np.float32)
    mask[order[:keep]] = 1.0
    return mask


class Masked(nn.Module):
    """features -> h * mask -> head (the reference's ``reconstruct_model`` with ``Mask``)."""

    def __init__(self, model: nn.Sequential, ana_layer: int, resolution: int, mask: np.ndarray):
        super().__init__()
        self.features, self.head = split_model(model, ana_layer, resolution)
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x) * self.mask)


@dataclass
class TuneConfig:
    epochs: int
    lr: float
    batch_size: int
    seed: int
    reg: float = 0.01
    n_rev: int = 20
    momentum: float = 0.9
    weight_decay: float = 5e-4


def _sgd(params, cfg: TuneConfig) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def soda_remove(
    model: nn.Sequential,
    ana_layer: int,
    resolution: int,
    mask: np.ndarray,
    x_clean: torch.Tensor,
    y_clean: torch.Tensor,
    x_rev: torch.Tensor,
    source: int,
    target: int,
    cfg: TuneConfig,
) -> list[dict]:
    """Masked fine-tune of ``model`` in place (the mask is gone afterwards: the same modules)."""
    if len(x_rev) == 0:
        raise SRDError(
            "no reconstructed sample to remove the backdoor with (gen_trigger kept none)"
        )
    n_rev = min(cfg.n_rev, cfg.batch_size - 1)
    n_clean = cfg.batch_size - n_rev
    masked = Masked(model, ana_layer, resolution, mask)
    opt = _sgd(masked.parameters(), cfg)
    torch.manual_seed(cfg.seed)
    order_rng = random.Random(cfg.seed)
    steps = math.ceil(len(x_clean) / n_clean)
    rev_pos = 0
    history = []
    masked.train()
    for epoch in range(cfg.epochs):
        order = list(range(len(x_clean)))
        order_rng.shuffle(order)
        total = 0.0
        for step in range(steps):
            idx = torch.as_tensor(order[step * n_clean : (step + 1) * n_clean])
            rev_idx = torch.arange(rev_pos, rev_pos + n_rev) % len(x_rev)
            rev_pos = (rev_pos + n_rev) % len(x_rev)
            xb = torch.cat([x_clean[idx], x_rev[rev_idx]])
            yb = torch.cat([y_clean[idx], torch.full((n_rev,), source)])
            logits = masked(xb)
            unlearn = F.cross_entropy(logits[-n_rev:], torch.full((n_rev,), target))
            loss = F.cross_entropy(logits, yb) - cfg.reg * unlearn
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        history.append({"epoch": epoch + 1, "loss": total / steps})
        log.info("remove epoch %d: loss %.4f", epoch + 1, total / steps)
    model.eval()
    return history


def finetune(
    model: nn.Module, x_clean: torch.Tensor, y_clean: torch.Tensor, cfg: TuneConfig
) -> list[dict]:
    """Plain fine-tune of all weights on the clean share (CE, same optimiser as removal)."""
    opt = _sgd(model.parameters(), cfg)
    torch.manual_seed(cfg.seed)
    order_rng = random.Random(cfg.seed)
    steps = math.ceil(len(x_clean) / cfg.batch_size)
    history = []
    model.train()
    for epoch in range(cfg.epochs):
        order = list(range(len(x_clean)))
        order_rng.shuffle(order)
        total = 0.0
        for step in range(steps):
            idx = torch.as_tensor(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
            loss = F.cross_entropy(model(x_clean[idx]), y_clean[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        history.append({"epoch": epoch + 1, "loss": total / steps})
    model.eval()
    return history


def dfr(
    model: nn.Sequential, x_clean: torch.Tensor, y_clean: torch.Tensor, cfg: TuneConfig, runs: int
) -> list[dict]:
    """Last-layer retraining: ``runs`` fine-tunes of the final Linear from the same start, with
    different shuffles, other weights frozen, BatchNorm in train mode; state dicts averaged."""
    start = copy.deepcopy(model.state_dict())
    states, history = [], []
    for run in range(runs):
        model.load_state_dict(start)
        for p in model.parameters():
            p.requires_grad_(False)
        last = model[-1]
        for p in last.parameters():
            p.requires_grad_(True)
        opt = _sgd(last.parameters(), cfg)
        order_rng = random.Random(cfg.seed * 1000 + run)
        steps = math.ceil(len(x_clean) / cfg.batch_size)
        model.train()
        for _epoch in range(cfg.epochs):
            order = list(range(len(x_clean)))
            order_rng.shuffle(order)
            for step in range(steps):
                idx = torch.as_tensor(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
                loss = F.cross_entropy(model(x_clean[idx]), y_clean[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        states.append(copy.deepcopy(model.state_dict()))
        history.append({"run": run + 1, "last_loss": float(loss.detach())})
    averaged = {
        k: (torch.stack([s[k].float() for s in states]).mean(0)).to(states[0][k].dtype)
        for k in states[0]
    }
    model.load_state_dict(averaged)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history
