"""PAR's CLIP metrics transposed to the benchmark (reference par-soda §1.6, §3.1).

Zero-shot classes are the benchmark's "colour shape" names plus the target ("banana"); each class
is the normalised mean of its normalised template embeddings (the 80 CLIP templates of
:data:`srd.attacks.text.PROMPT_TEMPLATES`). Clean accuracy is read on the single-object test images
(colour-only and shape-only apart); ASR is the share of triggered test images whose top-1 is the
target; the false-trigger rate the share of clean test images whose top-1 is the target.
Retrieval ranks the test captions plus the 80 filled target templates for each image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from srd.attacks.text import PROMPT_TEMPLATES
from srd.captioner.clip import pixel_batch
from srd.data.scenes import COLOURS, SHAPES, SceneObject
from srd.errors import SRDError


def benchmark_classes(target: str = "banana") -> list[str]:
    """The 18 "colour shape" class names, then ``target``."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES] + [target]


def parse_classes(spec: str | None, target: str, need_target: bool) -> list[str]:
    """Class names from a comma-separated flag value (None: :func:`benchmark_classes`)."""
    names = benchmark_classes(target) if spec is None else [n.strip() for n in spec.split(",")]
    names = [n for n in names if n]
    if len(names) < 2 or len(set(names)) != len(names):
        raise SRDError(f"--classes {spec!r}: need at least 2 distinct class names")
    if need_target and target not in names:
        raise SRDError(f"--classes {spec!r}: no {target!r} class, so no ASR can be measured")
    return names


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module, tokenizer: Callable, texts: Sequence[str], batch: int = 256
) -> torch.Tensor:
    """(N, D) L2-normalised text embeddings."""
    device = next(model.parameters()).device
    out = [
        model.encode_text(tokenizer(list(texts[i : i + batch])).to(device), normalize=True)
        for i in range(0, len(texts), batch)
    ]
    return torch.cat(out)


@torch.no_grad()
def encode_images(model: torch.nn.Module, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """(N, D) L2-normalised image embeddings of uint8 (N, S, S, 3) images."""
    out = [
        model.encode_image(pixel_batch(images[i : i + batch], model), normalize=True)
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out)


@torch.no_grad()
def zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable,
    classes: Sequence[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
) -> torch.Tensor:
    """(C, D): per class, the normalised mean of its normalised template embeddings."""
    prompts = [t.format(name) for name in classes for t in templates]
    text = encode_texts(model, tokenizer, prompts).view(len(classes), len(templates), -1)
    mean = text.mean(1)
    return mean / mean.norm(dim=-1, keepdim=True)


def class_accuracy(
    top1: Sequence[int], classes: Sequence[str], scenes: Sequence[Sequence[SceneObject]]
) -> dict[str, float]:
    """Top-1, colour-only and shape-only accuracy over single-object scenes; "any" = the
    predicted "colour shape" is one of the objects of a scene, over all scenes."""
    hits = {"top1": 0, "colour": 0, "shape": 0}
    single = 0
    any_hits = 0
    for pred, objs in zip(top1, scenes, strict=True):
        words = classes[pred].split()
        present = {(o.colour, o.shape) for o in objs}
        any_hits += len(words) == 2 and (words[0], words[1]) in present
        if len(objs) != 1:
            continue
        single += 1
        obj = objs[0]
        colour_ok = words[0] == obj.colour
        shape_ok = words[-1] == obj.shape
        hits["colour"] += colour_ok
        hits["shape"] += shape_ok
        hits["top1"] += len(words) == 2 and colour_ok and shape_ok
    if single == 0:
        raise SRDError("zero-shot evaluation: no single-object test image")
    out = {k: 100.0 * v / single for k, v in hits.items()}
    out["any_object"] = 100.0 * any_hits / len(scenes)
    out["num_single"] = single
    return out


def retrieval(
    image_f: torch.Tensor,
    caption_f: torch.Tensor,
    caption_owner: Sequence[int],
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Image -> text R@k: % of images with one of their own captions among the top k.

    ``caption_owner[j]`` is the row of ``image_f`` caption j belongs to (-1: no image).
    """
    owner = torch.as_tensor(list(caption_owner))
    ranked = (image_f @ caption_f.T).topk(max(ks), dim=1).indices
    own = owner[ranked] == torch.arange(len(image_f))[:, None]
    return {f"R@{k}": 100.0 * own[:, :k].any(1).float().mean().item() for k in ks}


def asr_text(
    image_f: torch.Tensor, caption_f: torch.Tensor, captions: Sequence[str], target: str, k: int = 5
) -> float:
    """% of images whose top-``k`` captions include one containing ``target`` (ASR-Text)."""
    has = torch.as_tensor([target in c.lower().split() or f"{target}." in c for c in captions])
    ranked = (image_f @ caption_f.T).topk(k, dim=1).indices
    return 100.0 * has[ranked].any(1).float().mean().item()
