"""SODA step 1: causal attribution of every hidden neuron of the analysed layer to every class.

For hidden vectors h (B, N) and the network's head, the attribution of neuron i to class c is
the mean over the batch of ``|head(h + e_i)[c] - head(h)[c]|`` (the intervention
``do(h_i := h_i + 1)``, reference ``analyze_hidden``). When the head is one ``nn.Linear`` this
is exactly ``|W[c, i]|`` for every input (:func:`linear_attribution`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from srd.soda.classifier import Features, Head, to_input

log = logging.getLogger(__name__)


@torch.no_grad()
def causal_attribution(
    head: nn.Module, h: torch.Tensor, delta: float = 1.0, chunk: int = 256
) -> torch.Tensor:
    """(N, C) mean over the batch of |head(h + delta e_i) - head(h)|, all neurons at once.

    Neurons are shifted ``chunk`` at a time: the head runs on a (B * chunk, N) batch.
    """
    base = head(h)
    b, n = h.shape
    out = torch.empty(n, base.shape[1])
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(n, start + chunk))
        k = len(idx)
        shifted = h.unsqueeze(1).repeat(1, k, 1)  # (B, k, N)
        shifted[:, torch.arange(k), idx] += delta
        diff = head(shifted.view(b * k, n)).view(b, k, -1) - base.unsqueeze(1)
        out[idx] = diff.abs().mean(0)
    return out


def linear_attribution(head: nn.Linear) -> torch.Tensor:
    """The closed form for a linear head: (N, C) = |W|^T."""
    return head.weight.detach().abs().T.clone()


def linear_layer(head: Head) -> nn.Linear | None:
    """The head's only module when it is a single ``nn.Linear`` (closed form applies), else None."""
    blocks = head.blocks
    if len(blocks) == 1 and isinstance(blocks[0], nn.Linear):
        return blocks[0]
    return None


@torch.no_grad()
def class_attribution(
    features: Features,
    head: Head,
    images: np.ndarray,
    num_sample: int,
    batch_size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """CA_k (N, C) of one class: batches of its shuffled samples until >= ``num_sample`` are
    used (the last batch is not truncated), per-batch attributions averaged over batches."""
    order = rng.permutation(len(images))
    per_batch = []
    used = 0
    for start in range(0, len(order), batch_size):
        if used >= num_sample:
            break
        idx = order[start : start + batch_size]
        h = features(to_input(images[idx]))
        per_batch.append(causal_attribution(head, h))
        used += len(idx)
    return torch.stack(per_batch).mean(0).numpy()
