"""Fine-pruning (Liu et al. 2018) of the gated cross-attention, then the shared refine-tune.

The feed-forward units of every gated cross-attention block (``ff``: LayerNorm -> Linear ->
GELU -> Linear) are ranked by their mean activation on the defender's data; the
``--prune_ratio`` least active units of each block are removed (their input row and output
column set to zero, which a gradient step cannot revive: both gradients are zero at that point
and AdamW's weight decay keeps zeros at zero), then the model is refine-tuned on the data as it
is (the ``no_mask`` data), with the same budget as every refine-tune defense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from open_flamingo.src.helpers import GatedCrossAttentionBlock

from srd.captioner.engine import Collator
from srd.config import arg
from srd.defenses.refine import NoMask
from srd.defenses.registry import DefenderData, VersionArgs, register_defense, seeded_subset
from srd.errors import SRDError
from srd.flags import COUNT, between


def cross_attention_blocks(model: torch.nn.Module) -> list[GatedCrossAttentionBlock]:
    return [m for m in model.modules() if isinstance(m, GatedCrossAttentionBlock)]


@torch.no_grad()
def ff_activations(captioner: Any, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Mean activation (after GELU) of each cross-attention FF unit, per block: [(inner,)]."""
    blocks = cross_attention_blocks(captioner.model)
    sums = [torch.zeros(b.ff[1].out_features) for b in blocks]
    counts = [0] * len(blocks)

    def hook(k: int):
        def record(_module, _inp, out: torch.Tensor) -> None:
            flat = out.detach().float().reshape(-1, out.shape[-1]).cpu()
            sums[k] += flat.sum(0)
            counts[k] += flat.shape[0]

        return record

    handles = [b.ff[2].register_forward_hook(hook(k)) for k, b in enumerate(blocks)]
    model = captioner.model
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(
                vision_x=batch["vision_x"].to(captioner.device),
                lang_x=batch["lang_x"].to(captioner.device),
                attention_mask=batch["attention_mask"].to(captioner.device),
            )
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [s / max(c, 1) for s, c in zip(sums, counts, strict=True)]


@torch.no_grad()
def prune_units(ff: torch.nn.Sequential, units: torch.Tensor) -> None:
    """Zero the input rows and output columns of hidden ``units`` of a FeedForward
    (LayerNorm -> Linear -> GELU -> Linear)."""
    ff[1].weight[units] = 0
    ff[3].weight[:, units] = 0


@dataclass
class PruningArgs(VersionArgs):
    """fine_pruning: how much to prune, measured on how much data (and the image version)."""

    prune_ratio: float = arg(
        0.2,
        help="share of cross-attention FF units pruned",
        check=between(0, 1, high_open=True),
    )
    prune_batches: int = arg(
        8, help="batches of the defender's data for the activations", check=COUNT
    )


@register_defense("fine_pruning")
class FinePruning(NoMask):
    """Prune the least active cross-attention FF units, then refine-tune on the data as it is."""

    Args = PruningArgs

    def prepare_model(self, captioner: Any, data: DefenderData) -> dict[str, Any]:
        ratio = self.args.prune_ratio
        blocks = cross_attention_blocks(captioner.model)
        if not blocks:
            raise SRDError("--defense fine_pruning: the model has no gated cross-attention")
        samples, images = self.training_set(data)
        batch_size = 16
        picked = seeded_subset(range(len(samples)), self.args.prune_batches * batch_size, data.seed)
        collate = Collator(captioner.tokenizer, captioner.vision_inputs)
        batches = [
            collate([(images(samples[i]), samples[i].caption) for i in picked[k : k + batch_size]])
            for k in range(0, len(picked), batch_size)
        ]
        means = ff_activations(captioner, batches)
        pruned = []
        for block, mean in zip(blocks, means, strict=True):
            n = math.floor(ratio * mean.numel())
            units = torch.argsort(mean)[:n]
            prune_units(block.ff, units)
            pruned.append(int(n))
        return {"pruned_units_per_block": pruned, "activation_samples": len(picked)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "prune_ratio": self.args.prune_ratio}
