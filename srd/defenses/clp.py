"""CLP: data-free channel pruning by Channel Lipschitzness (Zheng et al., ECCV 2022).

The paper bounds the Lipschitz constant of the map from the input to one channel's output by
the spectral norm of that channel's weights (UCLC, its Eq. for a conv channel followed by
batch norm: the kernel scaled by the channel's BN factor), and prunes, layer by layer, every
channel whose bound exceeds the layer's mean by ``u`` standard deviations: ``UCLC_k > mu +
u * sigma`` (u = 3 by default). No data, no training.

In OpenFlamingo the layers with channels and a nonlinearity after them are the feed-forwards
(``LayerNorm -> Linear -> GELU -> Linear``) of the perceiver and of every gated
cross-attention block: the trainable part the attack wrote. One channel is one hidden unit,
whose weights are a row ``w_k`` of the first Linear; its bound is ``|| w_k * gamma ||_2``,
the LayerNorm's gain folded in as CLP folds batch norm (ours: the spectral norm of a row is its
L2 norm; the LayerNorm's normalisation itself is not a per-channel factor). A pruned unit's
row and its column of the second Linear are set to zero (as fine_pruning does). The defense
writes the edited checkpoint (kind ``edit``) and is evaluated like a refine-tune's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler

from srd.config import arg
from srd.defenses.pruning import prune_units
from srd.defenses.registry import DefenderData, Defense, register_defense
from srd.errors import SRDError
from srd.flags import at_least


def feed_forwards(model: torch.nn.Module) -> list[tuple[str, torch.nn.Sequential]]:
    """(name, FeedForward) of the perceiver's layers and of every gated cross-attention block."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, GatedCrossAttentionBlock):
            found.append((f"{name}.ff", module.ff))
        elif isinstance(module, PerceiverResampler):
            found += [(f"{name}.layers.{i}.1", ff) for i, (_, ff) in enumerate(module.layers)]
    return found


@torch.no_grad()
def channel_lipschitz_bounds(ff: torch.nn.Sequential) -> torch.Tensor:
    """UCLC of each hidden unit of a ``LayerNorm -> Linear -> ...`` feed-forward: (inner,)."""
    norm, up = ff[0], ff[1]
    weight = up.weight.float()
    if getattr(norm, "weight", None) is not None:
        weight = weight * norm.weight.float()  # the gain scales each input dimension
    return torch.linalg.vector_norm(weight, dim=1)


def outlying_channels(bounds: torch.Tensor, u: float) -> torch.Tensor:
    """Indices whose bound exceeds mean + u * std (population std, over the layer's channels)."""
    mean, std = bounds.mean(), bounds.std(unbiased=False)
    return torch.nonzero(bounds > mean + u * std).flatten()


@dataclass
class CLPArgs:
    """clp: the pruning threshold."""

    clp_u: float = arg(
        3.0, help="prune channels with UCLC > mean + u * std of their layer (CLP's u)",
        check=at_least(0),
    )  # fmt: skip


@register_defense("clp")
class CLP(Defense):
    """Data-free: prune the feed-forward units with outlying Lipschitz bounds; no refine-tune."""

    kind = "edit"
    Args = CLPArgs

    def prepare_model(self, captioner: Any, data: DefenderData) -> dict[str, Any]:
        layers = feed_forwards(captioner.model)
        if not layers:
            raise SRDError("--defense clp: the model has no perceiver or cross-attention FF")
        pruned = {}
        for name, ff in layers:
            units = outlying_channels(channel_lipschitz_bounds(ff), self.args.clp_u)
            prune_units(ff, units)
            pruned[name] = int(units.numel())
        total = sum(ff[1].out_features for _, ff in layers)
        return {"pruned_units": pruned, "pruned_share": sum(pruned.values()) / total}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "u": self.args.clp_u}
