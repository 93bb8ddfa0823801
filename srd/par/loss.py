"""The cleaning losses of the CLIP stages: PAR, plain fine-tune (``ft``) and CleanCLIP.

PAR (reference §1.2): the CLIP contrastive loss **minus** half the batch-mean squared distance
between the student's and a frozen poisoned teacher's L2-normalised embeddings, per modality; a
modality's push term is set to 0 (a hard switch, not a clamp) for a batch whose distance exceeds
``tau``. The temperature is a plain float: it is read from the model and never trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_TAU = 2.15
"""PAR's ``--loss-thresh``: for unit vectors S = 2 - 2 mean cos, so 2.15 is just past orthogonal."""


def clip_loss(image_f: torch.Tensor, text_f: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows of two (B, D) L2-normalised batches at ``scale``."""
    logits = scale * image_f @ text_f.T
    labels = torch.arange(len(image_f), device=image_f.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def push_distance(student_f: torch.Tensor, teacher_f: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``||normalise(student) - normalise(teacher)||^2`` (in [0, 4])."""
    s = F.normalize(student_f, dim=-1)
    t = F.normalize(teacher_f, dim=-1)
    return ((s - t) ** 2).sum(-1).mean()


def threshold(distance: torch.Tensor, tau: float) -> torch.Tensor:
    """``distance`` while it is at most ``tau``, else 0 (and no gradient): PAR's hard switch."""
    return distance if float(distance.detach()) <= tau else distance * 0.0


def par_loss(
    image_f: torch.Tensor,
    text_f: torch.Tensor,
    teacher_image_f: torch.Tensor,
    teacher_text_f: torch.Tensor,
    scale: float,
    tau: float = DEFAULT_TAU,
    push: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PAR's loss ``L_CLIP - 0.5 (thr(S_img) + thr(S_txt))`` and its parts for the log.

    Embeddings are (B, D) and are normalised here; the teacher's carry no gradient. ``push=False``
    is the fine-tuning control: the same loss without the push term (distances still logged).
    """
    if tau <= 0:
        raise ValueError(f"tau {tau}: must be positive")
    if isinstance(scale, torch.Tensor):
        scale = scale.detach()
    image_f, text_f = F.normalize(image_f, dim=-1), F.normalize(text_f, dim=-1)
    base = clip_loss(image_f, text_f, float(scale))
    s_img = push_distance(image_f, teacher_image_f.detach())
    s_txt = push_distance(text_f, teacher_text_f.detach())
    img_on, txt_on = float(s_img.detach()) <= tau, float(s_txt.detach()) <= tau
    loss = base
    if push:
        loss = base - 0.5 * (threshold(s_img, tau) + threshold(s_txt, tau))
    parts = {
        "clip_loss": float(base.detach()),
        "s_img": float(s_img.detach()),
        "s_txt": float(s_txt.detach()),
        "push_img": float(push and img_on),
        "push_txt": float(push and txt_on),
        "loss": float(loss.detach()),
    }
    return loss, parts


def cleanclip_loss(
    image_f: torch.Tensor,
    text_f: torch.Tensor,
    image_view_f: torch.Tensor,
    text_view_f: torch.Tensor,
    scale: float,
    lam: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CleanCLIP: ``L_CLIP(image, text) + lam * 0.5 (L_CLIP(image, image') + L_CLIP(text, text'))``.

    The unimodal terms are the same InfoNCE between each sample and its own augmented view
    (other samples of the batch are the negatives), so a trigger-to-target link is not rewarded.
    """
    image_f, text_f = F.normalize(image_f, dim=-1), F.normalize(text_f, dim=-1)
    image_view_f, text_view_f = F.normalize(image_view_f, dim=-1), F.normalize(text_view_f, dim=-1)
    base = clip_loss(image_f, text_f, float(scale))
    uni_img = clip_loss(image_f, image_view_f, float(scale))
    uni_txt = clip_loss(text_f, text_view_f, float(scale))
    loss = base + lam * 0.5 * (uni_img + uni_txt)
    parts = {
        "clip_loss": float(base.detach()),
        "unimodal_img": float(uni_img.detach()),
        "unimodal_txt": float(uni_txt.detach()),
        "loss": float(loss.detach()),
    }
    return loss, parts
