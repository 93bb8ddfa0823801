"""The vision tower: an open_clip model's visual part, as OpenFlamingo reads it.

Faithful to the published OpenFlamingo models (reference §3.2, B5): OpenAI CLIP weights were
trained with QuickGELU, so a tag whose weights need it builds the tower with QuickGELU (open_clip
itself only warns) and a tag that contradicts the config is refused; the perceiver reads the
patch tokens *before* the tower's final LayerNorm (``ln_post``), as OpenFlamingo was trained
(``--vision_tokens post_ln`` takes them after it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from PIL import Image

from srd.captioner.args import VISION_TOKENS, none_if_unset
from srd.captioner.clip import MODEL_CONFIG_DIR, register_model_configs
from srd.captioner.weights import read_state_dict
from srd.errors import SRDError

log = logging.getLogger(__name__)


def tower_tokens(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Patch tokens (B, N, D) of an open_clip visual tower for normalised pixels (B, C, H, W).

    ViT towers give their patch tokens (``output_tokens``); ModifiedResNet towers (the embedded
    tiny CLIP) give the cells of their last feature map, before the attention pool, as tokens.
    """
    if isinstance(visual, ModifiedResNet):
        x = visual.stem(pixels)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        return x.flatten(2).transpose(1, 2)
    return visual(pixels)[1]


def vision_width(name: str) -> int:
    """Width of the tokens :func:`tower_tokens` returns for open_clip config ``name``."""
    cfg = open_clip.get_model_config(name)["vision_cfg"]
    if isinstance(cfg.get("layers"), (list, tuple)):  # ModifiedResNet: width * 32 channels
        return int(cfg["width"]) * 32
    return int(cfg["width"])


def images_to_vision_x(images: Sequence[np.ndarray], image_transform: Any) -> torch.Tensor:
    """Apply the open_clip image transform to uint8 RGB arrays -> (B, 1, 1, C, H, W)."""
    tensors = [image_transform(Image.fromarray(np.asarray(im, dtype=np.uint8))) for im in images]
    return torch.stack(tensors).unsqueeze(1).unsqueeze(1)


def quick_gelu_for(name: str, tag: str | None) -> bool:
    """Whether the tower must be built with QuickGELU to fit the weights of open_clip ``tag``.

    OpenAI's CLIP weights were trained with QuickGELU, but open_clip's ``ViT-L-14`` config uses
    GELU and only warns when they meet: the features are then silently wrong. A tag that needs
    QuickGELU turns it on; a config with QuickGELU and a tag trained without it is refused.
    """
    model_cfg = open_clip.get_model_config(name) or {}
    tag_cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    model_quick, tag_quick = bool(model_cfg.get("quick_gelu")), bool(tag_cfg.get("quick_gelu"))
    if tag_cfg and model_quick and not tag_quick:
        raise SRDError(
            f"--vision_encoder_pretrained {tag}: these weights were trained with GELU but "
            f"--vision_encoder_path {name} uses QuickGELU"
        )
    return tag_quick or model_quick


def set_vision_tokens(visual: torch.nn.Module, vision_tokens: str, name: str) -> None:
    """Make ``visual(x)[1]`` the patch tokens before (``pre_ln``) or after ``ln_post``.

    open_clip's VisionTransformer applies ``ln_post`` to every token unless
    ``final_ln_after_pool`` is set, in which case only the pooled token is normalised.
    """
    if vision_tokens not in VISION_TOKENS:
        raise SRDError(f"--vision_tokens {vision_tokens}: expected one of {VISION_TOKENS}")
    if isinstance(visual, ModifiedResNet):
        # the tokens are the last feature map, before the attention pool: no ln_post to skip
        if vision_tokens != "pre_ln":
            raise SRDError(
                f"--vision_tokens {vision_tokens}: {name} is a ResNet tower (its tokens are the "
                "feature map before pooling); only pre_ln applies"
            )
        return
    if not hasattr(visual, "final_ln_after_pool") or getattr(visual, "attn_pool", None):
        raise SRDError(
            f"--vision_encoder_path {name}: not a plain ViT tower, its patch tokens cannot be "
            "taken around ln_post (--vision_tokens)"
        )
    visual.final_ln_after_pool = vision_tokens == "pre_ln"
    visual.output_tokens = True


def build_vision_encoder(
    name: str, pretrained: str | None, vision_tokens: str = "pre_ln"
) -> tuple[torch.nn.Module, Any, int]:
    """(visual tower, eval image transform, feature width) from an open_clip config.

    ``pretrained`` is an open_clip tag (downloaded by open_clip), a weights file (the visual
    tower's state dict, or a whole CLIP state dict whose ``visual.`` keys are used), or None.
    """
    register_model_configs()
    if name not in open_clip.list_models():
        raise SRDError(
            f"--vision_encoder_path {name}: unknown vision config "
            f"(shipped: {sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))}; "
            "or any open_clip model name)"
        )
    pretrained = none_if_unset(pretrained)
    is_file = pretrained is not None and (os.sep in pretrained or Path(pretrained).suffix)
    tag = None if is_file else pretrained
    quick_gelu = quick_gelu_for(name, tag)
    # Weights from a file are loaded below: open_clip's "No pretrained weights loaded ... Model
    # initialized randomly." would tell a user the opposite of what happens, so it is dropped.
    quiet = _DropRandomInitWarning() if is_file else None
    root = logging.getLogger()
    if quiet:
        root.addFilter(quiet)
    try:
        clip, _, transform = open_clip.create_model_and_transforms(
            name, pretrained=tag, force_quick_gelu=quick_gelu
        )
    except RuntimeError as exc:
        raise SRDError(f"--vision_encoder_pretrained {pretrained}: {exc}") from None
    finally:
        if quiet:
            root.removeFilter(quiet)
    if quick_gelu:
        log.info("vision tower %s built with QuickGELU (weights %s)", name, tag)
    visual = clip.visual
    set_vision_tokens(visual, vision_tokens, name)
    if is_file:
        state = read_state_dict(pretrained, "--vision_encoder_pretrained")
        if any(k.startswith("visual.") for k in state):
            state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        try:
            visual.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise SRDError(
                f"--vision_encoder_pretrained {pretrained}: does not fit {name} ({first})"
            ) from None
        log.info("vision tower weights loaded from %s", pretrained)
    return visual, transform, vision_width(name)


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's random-initialisation warning (root logger) while weights that are
    loaded from a file right after are built."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


def clip_like(visual: torch.nn.Module) -> torch.nn.Module:
    """Flamingo's constructor takes a CLIP model and keeps its ``.visual``."""
    holder = torch.nn.Module()
    holder.visual = visual
    return holder
