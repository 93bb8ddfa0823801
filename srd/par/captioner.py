"""PAR's idea on the captioner (reference par-soda §3.3): the caption loss **minus** a thresholded
push of the student's perceiver outputs away from a frozen copy of the backdoored captioner.

In the attack and refine-tune stages only the perceiver, the gated cross-attention and the token
embeddings train, so the backdoor lives there; the perceiver output ``media`` (B, T, F, Q, D) is
where the image enters them. Both models see the same image (the frozen tower's tokens are taken
from the student's perceiver input by a forward hook, so the teacher runs only its perceiver):

    S_vis = mean over images and latents of ||normalise(z) - normalise(z_P)||^2   (per latent)
    L     = CE_caption - 0.5 * thr(S_vis),   thr(S) = S if S <= tau else 0   (hard switch)

Registration (for the defense registry of srd/defenses/, built elsewhere): a refine-tune defense
named ``par`` whose training step calls :func:`captioner_par_loss` in place of ``out.loss`` with
a frozen ``copy.deepcopy`` of the backdoored model as ``teacher``; ``tau <= 0`` must be refused
as ``--loss_thresh``; ``push=False`` gives the plain clean refine-tune control.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from srd.par.loss import DEFAULT_TAU, threshold


def perceiver_distance(student_media: torch.Tensor, teacher_media: torch.Tensor) -> torch.Tensor:
    """Mean over every latent of the squared distance of L2-normalised latents (in [0, 4])."""
    s = F.normalize(student_media, dim=-1)
    t = F.normalize(teacher_media, dim=-1)
    return ((s - t) ** 2).sum(-1).mean()


def captioner_par_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    tau: float = DEFAULT_TAU,
    push: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PAR's loss on one captioning batch (``vision_x``, ``lang_x``, ``attention_mask``,
    ``labels`` as :class:`srd.engine.Collator` makes them); returns the loss and its parts.

    ``student`` and ``teacher`` are Flamingo models with a ``perceiver``; the teacher is not
    changed and gets no gradient.
    """
    if tau <= 0:
        raise ValueError(f"tau {tau}: must be positive")
    seen: dict[str, Any] = {}

    def keep(module: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        seen["tokens"], seen["media"] = inputs[0], output

    handle = student.perceiver.register_forward_hook(keep)
    try:
        out = student(
            vision_x=batch["vision_x"],
            lang_x=batch["lang_x"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
    finally:
        handle.remove()
    with torch.no_grad():
        teacher_media = teacher.perceiver(seen["tokens"].detach())
    s_vis = perceiver_distance(seen["media"], teacher_media)
    on = float(s_vis.detach()) <= tau
    loss = out.loss - 0.5 * threshold(s_vis, tau) if push else out.loss
    parts = {
        "caption_loss": float(out.loss.detach()),
        "s_vis": float(s_vis.detach()),
        "push_vis": float(push and on),
        "loss": float(loss.detach()),
    }
    return loss, parts
