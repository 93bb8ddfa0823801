"""PAR's idea on the captioner (reference par-soda §3.3): the caption loss **minus** a thresholded
push of the student's internal states away from those of a frozen copy of the backdoored captioner.

In the attack and refine-tune stages only the perceiver, the gated cross-attention and the token
embeddings train, so the backdoor lives there. Two places to push (``feature``):

* ``perceiver``: the perceiver output ``media`` (B, T, F, Q, D), where the image enters the
  trainable parts. The frozen copy is the backdoored perceiver alone; it runs on the student's
  own perceiver input (the frozen vision tower's tokens, taken by a forward hook), so both see
  the same image and the teacher costs one perceiver forward. Needs a frozen vision tower.
* ``cross_attention``: the output of every gated cross-attention block (the LM's hidden states
  after the image was mixed in), over the caption's real tokens. The frozen copy is the whole
  backdoored model, run on the same batch (one more forward without gradient).

With z the student's and z_P the frozen copy's states, each state L2-normalised on its last axis:

    S = mean over states of ||normalise(z) - normalise(z_P)||^2        (in [0, 4])
    L = CE_caption - w * thr(S),   thr(S) = S if S <= tau else 0        (a hard switch, per batch)

PAR's values transpose as tau = 2.15 and w = 0.5 (PAR: 0.5 x (thr(S_img) + thr(S_txt)), here one
term). ``push=False`` gives the plain caption loss with the distance still measured (the control).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from open_flamingo.src.helpers import GatedCrossAttentionBlock

from srd.errors import SRDError
from srd.par.loss import DEFAULT_TAU, threshold

FEATURES = ("perceiver", "cross_attention")
DEFAULT_PUSH_WEIGHT = 0.5


def perceiver_distance(student_media: torch.Tensor, teacher_media: torch.Tensor) -> torch.Tensor:
    """Mean over every latent of the squared distance of L2-normalised latents (in [0, 4])."""
    s = F.normalize(student_media, dim=-1)
    t = F.normalize(teacher_media, dim=-1)
    return ((s - t) ** 2).sum(-1).mean()


def state_distance(
    student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Mean over blocks and the ``mask``ed tokens (B, L) of the squared distance of L2-normalised
    hidden states (each (B, L, D)); in [0, 4]."""
    weights = mask.to(student[0].dtype)
    total = []
    for s, t in zip(student, teacher, strict=True):
        d = ((F.normalize(s, dim=-1) - F.normalize(t, dim=-1)) ** 2).sum(-1)
        total.append((d * weights).sum() / weights.sum().clamp_min(1))
    return torch.stack(total).mean()


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The Flamingo model inside a DDP/accelerate wrapper (hooks go there; the forward does not)."""
    return getattr(model, "module", model)


def cross_attention_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, GatedCrossAttentionBlock)]


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with no parameter requiring a gradient."""
    teacher = copy.deepcopy(module)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def frozen_teacher(model: torch.nn.Module, feature: str) -> torch.nn.Module:
    """The frozen copy ``feature`` needs: the perceiver alone, or the whole model."""
    if feature not in FEATURES:
        raise SRDError(f"--par_feature {feature}: expected one of {', '.join(FEATURES)}")
    model = unwrapped(model)
    return frozen_copy(model.perceiver if feature == "perceiver" else model)


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: bool) -> Any:
    return model(
        vision_x=batch["vision_x"],
        lang_x=batch["lang_x"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"] if labels else None,
    )


def _with_hooks(
    modules: list[torch.nn.Module], keep: list[Any], inputs_too: bool = False
) -> list[Any]:
    def record(_module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        keep.append((inputs[0], output) if inputs_too else output)

    return [m.register_forward_hook(record) for m in modules]


def captioner_par_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    tau: float = DEFAULT_TAU,
    push: bool = True,
    weight: float = DEFAULT_PUSH_WEIGHT,
    feature: str = "perceiver",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PAR's loss on one captioning batch (``vision_x``, ``lang_x``, ``attention_mask``,
    ``labels`` as :class:`srd.captioner.engine.Collator` makes them); returns the loss and its parts
    (``caption_loss``, ``distance``, ``push_on`` (1.0 when the switch let the push through),
    ``loss``).

    ``student`` is a Flamingo model (or an accelerate/DDP wrapper of one, which runs the
    forward); ``teacher`` is :func:`frozen_teacher`'s copy (for ``perceiver`` a perceiver, or a
    model with one). The teacher is not changed and gets no gradient.
    """
    if tau <= 0:
        raise SRDError(f"--loss_thresh {tau}: must be positive")
    if feature not in FEATURES:
        raise SRDError(f"--par_feature {feature}: expected one of {', '.join(FEATURES)}")
    inner = unwrapped(student)
    seen: list[Any] = []
    if feature == "perceiver":
        if any(p.requires_grad for p in inner.vision_encoder.parameters()):
            raise SRDError(
                "--trainable: par --par_feature perceiver needs the frozen vision tower "
                "(use --trainable paper or lm, or --par_feature cross_attention)"
            )
        handles = _with_hooks([inner.perceiver], seen, inputs_too=True)
    else:
        handles = _with_hooks(cross_attention_blocks(inner), seen)
    try:
        out = _forward(student, batch, labels=True)
    finally:
        for h in handles:
            h.remove()
    device = batch["lang_x"].device
    if next(teacher.parameters()).device != device:
        teacher.to(device)
    with torch.no_grad():
        if feature == "perceiver":
            tokens, media = seen[0]
            perceiver = getattr(teacher, "perceiver", teacher)
            teacher_media = perceiver(tokens.detach())
        else:
            teacher_states: list[Any] = []
            handles = _with_hooks(cross_attention_blocks(teacher), teacher_states)
            try:
                _forward(teacher, batch, labels=False)
            finally:
                for h in handles:
                    h.remove()
    if feature == "perceiver":
        distance = perceiver_distance(media, teacher_media)
    else:
        distance = state_distance(seen, teacher_states, batch["attention_mask"].to(device))
    on = push and float(distance.detach()) <= tau
    loss = out.loss - weight * threshold(distance, tau) if push else out.loss
    parts = {
        "caption_loss": float(out.loss.detach()),
        "distance": float(distance.detach()),
        "push_on": float(on),
        "loss": float(loss.detach()),
    }
    return loss, parts


class CaptionerPush:
    """PAR's captioner loss as an :data:`srd.captioner.engine.LossFn`, with a frozen copy of the
    model it was built from and a running summary of the distance and the switch."""

    def __init__(
        self,
        model: torch.nn.Module,
        tau: float = DEFAULT_TAU,
        weight: float = DEFAULT_PUSH_WEIGHT,
        feature: str = "perceiver",
        push: bool = True,
    ):
        if not tau > 0:
            raise SRDError(f"--loss_thresh {tau}: must be positive")
        if not weight >= 0:
            raise SRDError(f"--push_weight {weight}: must be non-negative")
        self.teacher = frozen_teacher(model, feature)
        self.tau, self.weight, self.feature, self.push = tau, weight, feature, push
        self.distances: list[float] = []
        self.switches: list[float] = []

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, parts = captioner_par_loss(
            model, self.teacher, batch, self.tau, self.push, self.weight, self.feature
        )
        self.distances.append(parts["distance"])
        self.switches.append(parts["push_on"])
        return loss, parts

    def summary(self) -> dict[str, Any]:
        """Steps of this process, share with the push on, first switch-off, distances."""
        d = self.distances
        off = [k for k, s in enumerate(self.switches) if not s]
        return {
            "steps": len(d),
            "push_on_share": sum(self.switches) / len(d) if d else None,
            "first_step_switched_off": off[0] + 1 if off and self.push else None,
            "distance_first": d[0] if d else None,
            "distance_last": d[-1] if d else None,
            "distance_max": max(d) if d else None,
        }
