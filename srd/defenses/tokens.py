"""Test-time visual-token pruning: zero the vision tokens that draw anomalous attention.

PurMM (Kong et al., AAAI 2026; ``WinzhengKong/PurMM``) purifies a backdoored multimodal LM at
test time in three stages: (1) locate the visual tokens with abnormal attention, (2) keep those
the deep layers confirm, (3) zero their components in the visual embeddings. In LLaVA the
visual tokens are read by the LM's self-attention; in OpenFlamingo the patch tokens of the
vision tower are read by the perceiver resampler, whose latents the LM's gated cross-attention
reads. The analogue here acts on the tower's patch tokens, the perceiver's input:

* attention a_l[j] of token j in perceiver layer l: the softmax attention of the latents on it
  (keys = the tokens and the latents, as the layer computes them), averaged over heads and
  latents;
* anomalous in layer l: robust z-score z_l[j] = (a_l[j] - median_j a_l) / (1.4826 MAD_j a_l)
  above ``--token_z`` (ours: PurMM's own threshold rule was not available offline);
* pruned: anomalous in the first layer (stage 1) and in the last (the deep-layer cue, stage
  2); their token vectors are set to zero (stage 3) and the perceiver then runs on the pruned
  tokens. One perceiver pass per image finds them (no text, no training).

The evaluation's record gets the count of pruned tokens per input image and per token position (row
by row over the tower's patch grid: where the pruning falls, e.g. on a corner trigger's patch).
The counts cover every perceiver pass of the evaluation (clean and triggered images, each beam
and sampled caption).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from open_flamingo.src.helpers import PerceiverAttention

from srd.config import arg
from srd.defenses.registry import Defense, register_defense
from srd.errors import SRDError
from srd.flags import positive


@dataclass
class TokenArgs:
    """token_prune: how far above the image's other tokens a token's attention must be."""

    token_z: float = arg(
        3.5, help="robust z-score (median / MAD) above which a token's attention is anomalous",
        check=positive(),
    )  # fmt: skip


@torch.no_grad()
def media_attention(
    layer: PerceiverAttention, x: torch.Tensor, latents: torch.Tensor
) -> torch.Tensor:
    """Attention of the latents on each media token in one perceiver layer, averaged over heads
    and latents: (b, T, n_media). The layer's own softmax (over media tokens and latents)."""
    x, lat = layer.norm_media(x), layer.norm_latents(latents)
    q = layer.to_q(lat) * layer.scale
    k, _ = layer.to_kv(torch.cat((x, lat), dim=-2)).chunk(2, dim=-1)
    q = rearrange(q, "b t n (h d) -> b h t n d", h=layer.heads)
    k = rearrange(k, "b t n (h d) -> b h t n d", h=layer.heads)
    attn = torch.einsum("bhtid,bhtjd->bhtij", q, k).softmax(dim=-1)
    return attn[..., : x.shape[-2]].mean(dim=(1, 3))


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """(v - median) / (1.4826 MAD) along the last axis (0 where the MAD is 0; torch's median,
    the lower of the two middle values for an even count)."""
    med = values.median(dim=-1, keepdim=True).values
    mad = (values - med).abs().median(dim=-1, keepdim=True).values * 1.4826
    return torch.where(mad > 0, (values - med) / mad.clamp(min=1e-12), torch.zeros_like(values))


class TokenPruner:
    """A forward pre-hook of the perceiver: find the anomalous tokens, zero them."""

    def __init__(self, perceiver: torch.nn.Module, z: float):
        self.perceiver, self.z = perceiver, z
        self.layers = [attn for attn, _ in perceiver.layers]
        self.inputs = 0
        self.pruned = 0
        self.inputs_pruned = 0
        self.tokens = 0
        self.by_position: list[int] = []
        self._probing = False
        self._seen: list[torch.Tensor] = []

    def _record(self, module: Any, args: tuple[Any, ...]) -> None:
        if self._probing:
            self._seen.append(media_attention(module, *args))

    def prunable(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mask of the tokens to zero, shaped as ``tokens`` without the feature axis."""
        b, t, f, v = tokens.shape[:4]
        self._seen, self._probing = [], True
        try:
            self.perceiver(tokens)
        finally:
            self._probing = False
        first, last = self._seen[0], self._seen[-1]  # (b, t, f * v)
        mask = (robust_z(first) > self.z) & (robust_z(last) > self.z)
        return mask.reshape(b, t, f, v)

    def __call__(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._probing:
            return None
        tokens = args[0]
        with torch.no_grad():
            mask = self.prunable(tokens)
        per_image = mask.flatten(1).sum(dim=1)
        self.inputs += int(per_image.numel())
        self.pruned += int(per_image.sum())
        self.inputs_pruned += int((per_image > 0).sum())
        self.tokens = int(mask[0].numel())
        by_position = mask.flatten(1).sum(dim=0).tolist()
        if len(self.by_position) != len(by_position):
            self.by_position = [0] * len(by_position)
        self.by_position = [a + int(b) for a, b in zip(self.by_position, by_position, strict=True)]
        return (tokens.masked_fill(mask.unsqueeze(-1), 0.0), *args[1:])

    def attach(self) -> list[Any]:
        hooks = [layer.register_forward_pre_hook(self._record) for layer in self.layers]
        return [*hooks, self.perceiver.register_forward_pre_hook(self)]

    def report(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "tokens_per_image": self.tokens,
            "mean_pruned_per_input": self.pruned / max(self.inputs, 1),
            "inputs_with_a_pruned_token": self.inputs_pruned,
            "pruned_by_position": self.by_position,
        }


@register_defense("token_prune")
class TokenPrune(Defense):
    """Zero the vision tokens whose perceiver attention is anomalous in the first and the last
    layer (PurMM's three stages, on OpenFlamingo's perceiver input)."""

    kind = "test_time"
    Args = TokenArgs

    def patch_model(self, captioner: Any) -> None:
        perceiver = getattr(captioner.model, "perceiver", None)
        if perceiver is None or not getattr(perceiver, "layers", None):
            raise SRDError("--defense token_prune: the model has no perceiver resampler")
        self.pruner = TokenPruner(perceiver, self.args.token_z)
        self.pruner.attach()

    def test_time_report(self) -> dict[str, Any]:
        return {"token_pruning": self.pruner.report()} if hasattr(self, "pruner") else {}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "token_z": self.args.token_z}
