"""The embedded default's tiny CLIP: contrastive pretraining, export and zero-shot probes.

OpenFlamingo's vision tower is a CLIP image encoder trained contrastively on image-text pairs and
then frozen. The embedded default makes its tower the same way: an open_clip model from a JSON
config (``srd/captioner/configs/tiny-clip.json``: a small ModifiedResNet at the native 224x224
input, so a 20-px trigger or a 30-px shape reaches the network unaveraged) trained with open_clip's
``ClipLoss`` on the benchmark's image-caption pairs. It is saved as an ordinary open_clip state
dict (safetensors) with its JSON config beside it; the captioner loads its ``visual`` part through
the usual ``--vision_encoder_path/--vision_encoder_pretrained`` flags and keeps it frozen, and the
PAR stages use the whole model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss

from srd.captioner.weights import write_safetensors_file
from srd.config import arg
from srd.data.scenes import (
    COLOURS,
    SHAPES,
    SceneObject,
    render_scene,
    scene_from_render,
    shape_twin,
    twin_caption,
)
from srd.errors import SRDError
from srd.flags import COUNT, Range, at_least, between, positive
from srd.io import atomic_path, ensure_dir

log = logging.getLogger(__name__)

CLIP_CONFIG = "tiny-clip"
"""The shipped open_clip config of the embedded default's CLIP."""
CLIP_WEIGHTS = "clip.safetensors"
CLIP_CONFIG_JSON = "open_clip_config.json"

ZERO_SHOT_TEMPLATE = "a picture of one shape: {} on a {} background."
"""Prompt of the attribute probe: one of the benchmark's own caption templates."""


@dataclass
class ClipTrainArgs:
    """Tiny CLIP: contrastive pretraining on the benchmark's image-caption pairs."""

    clip_model: str = arg(
        CLIP_CONFIG, help="open_clip config name (srd/captioner/configs or open_clip)"
    )
    clip_batch_size: int = arg(
        128,
        help="contrastive batch size (image-caption pairs)",
        check=Range(low=2, why="a contrastive batch needs two pairs"),
    )
    clip_epochs: int = arg(
        24,
        help="epochs; each epoch pairs every image with one of its captions (and its shape twin "
        "in train/pretrain_clip.py, where shape emerges only after ~15 epochs: see the README)",
        check=COUNT,
    )
    clip_learning_rate: float = arg(
        2e-3, help="peak learning rate (AdamW, warm-up + cosine)", check=positive()
    )
    clip_weight_decay: float = arg(0.1, help="AdamW weight decay", check=at_least(0))
    clip_warmup_ratio: float = arg(
        0.05, help="share of the steps spent warming up", check=between(0, 1, high_open=True)
    )
    clip_group_batches: int = arg(
        0,
        help="hard-negative batches (ours): runs of this many images whose captions name the "
        "same colour and background words sit together in a batch, so shape must tell them "
        "apart; 0 = plain random batches",
        check=at_least(0),
    )
    clip_shape_negatives: float = arg(
        0.0,
        help="weight of an extra shape-swapped hard-negative caption term (NegCLIP-style; ours, "
        "an ablation: it did not make the tower learn shape in 12 epochs); 0 = plain CLIP loss",
        check=at_least(0),
    )

    def validate(self) -> None:
        model_config(self.clip_model)
        for name in ("clip_batch_size", "clip_epochs"):
            if getattr(self, name) < 1:
                raise SRDError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.clip_batch_size < 2:
            raise SRDError("--clip_batch_size: a contrastive batch needs at least 2 pairs")
        if not self.clip_learning_rate > 0:
            raise SRDError(f"--clip_learning_rate {self.clip_learning_rate}: must be positive")
        if not 0 <= self.clip_warmup_ratio < 1:
            raise SRDError(f"--clip_warmup_ratio {self.clip_warmup_ratio}: must be in [0, 1)")
        if self.clip_shape_negatives < 0:
            raise SRDError(
                f"--clip_shape_negatives {self.clip_shape_negatives}: must be non-negative"
            )


_SHAPE_WORD = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")


def swap_shapes(caption: str, rng: np.random.Generator) -> str:
    """The caption with every shape word replaced by another shape (the hard negative)."""

    def other(match: re.Match[str]) -> str:
        choices = [s for s in SHAPES if s != match.group(1)]
        return choices[int(rng.integers(len(choices)))]

    return _SHAPE_WORD.sub(other, caption)


def caption_colour_key(captions: Sequence[str]) -> tuple[str, ...]:
    """Colour and background words an image's captions name (shape words left out)."""
    from srd.data.scenes import BACKGROUNDS

    vocab = set(COLOURS) | set(BACKGROUNDS)
    return tuple(sorted({w for c in captions for w in re.findall(r"[a-z]+", c.lower())} & vocab))


def grouped_order(
    captions: Sequence[Sequence[str]], run: int, rng: np.random.Generator
) -> np.ndarray:
    """A permutation of the images in which runs of ``run`` images share a colour key.

    Images are shuffled within their key group, cut into runs, and the runs shuffled: a batch
    then holds several same-colour images that only shape, size or position can tell apart.
    """
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, caps in enumerate(captions):
        groups.setdefault(caption_colour_key(caps), []).append(i)
    runs = []
    for key in sorted(groups):
        members = [groups[key][j] for j in rng.permutation(len(groups[key]))]
        runs.extend(members[k : k + run] for k in range(0, len(members), run))
    return np.array([i for r in (runs[j] for j in rng.permutation(len(runs))) for i in r])


def shape_negative_loss(
    image_f: torch.Tensor, text_f: torch.Tensor, negative_f: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Mean over pairs of -log p(true caption | image) against its shape-swapped version."""
    pos = scale * (image_f * text_f).sum(-1)
    neg = scale * (image_f * negative_f).sum(-1)
    return torch.nn.functional.softplus(neg - pos).mean()


MODEL_CONFIG_DIR = Path(__file__).parent / "configs"
"""open_clip configs shipped with the project (registered on first use)."""


def register_model_configs() -> None:
    """Make the shipped open_clip configs (``tiny-clip``, ``tiny-vit``) known to open_clip."""
    known = set(open_clip.list_models())
    if any(p.stem not in known for p in MODEL_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def clip_model_name(spec: str) -> str:
    """The open_clip config name of ``spec``: a name (shipped or built into open_clip, e.g.
    ``ViT-B-32``, ``RN50``) or the path of an open_clip JSON config, registered under its stem."""
    register_model_configs()
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise SRDError(f"--clip_model {spec}: config file not found")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SRDError(f"--clip_model {spec}: not a JSON config ({exc})") from None
        if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
            raise SRDError(f"--clip_model {spec}: not an open_clip config (embed_dim, "
                           "vision_cfg, text_cfg)")  # fmt: skip
        open_clip.add_model_config(path)
        return path.stem
    return spec


def model_config(name: str) -> dict[str, Any]:
    """The open_clip JSON config of ``name`` (see :func:`clip_model_name`)."""
    cfg = open_clip.get_model_config(clip_model_name(name))
    if cfg is None:
        raise SRDError(f"--clip_model {name}: unknown open_clip config")
    return cfg


def create_clip(name: str, seed: int) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    """A randomly initialised open_clip model (seeded) and its tokenizer."""
    model_config(name)
    name = clip_model_name(name)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    return model, open_clip.get_tokenizer(name)


def pixel_batch(images: np.ndarray | torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """uint8 (B, S, S, 3) images already at the tower's size -> normalised (B, 3, S, S) floats.

    Equal to open_clip's eval transform for such images (resizing to the same size is a copy),
    without a PIL round trip per image.
    """
    x = torch.as_tensor(np.asarray(images))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    if x.dim() != 4 or x.shape[1] != size or x.shape[2] != size or x.shape[3] != 3:
        raise SRDError(f"images of shape {tuple(x.shape)}: expected (B, {size}, {size}, 3)")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    device = next(model.parameters()).device
    x = x.to(device).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean.to(device)) / std.to(device)


class TwinMaker:
    """Shape twins of training images (``srd.data.scenes.shape_twin``) for minimal-pair batches."""

    def __init__(self, images: np.ndarray, scenes: Sequence[Sequence[SceneObject] | None]) -> None:
        if len(scenes) != len(images) or any(not s for s in scenes):
            raise SRDError(
                "--clip_shape_twins needs the embedded benchmark's scene of every training image "
                "(the Karpathy JSON's 'objects'); these data have none"
            )
        self.scenes = []
        for i, (image, objects) in enumerate(zip(images, scenes, strict=True)):
            try:
                self.scenes.append(scene_from_render(image, objects))  # type: ignore[arg-type]
            except SRDError as exc:
                raise SRDError(f"--clip_shape_twins: training image {i}: {exc}") from None

    def make(
        self, idx: Sequence[int], texts: Sequence[str], rng: np.random.Generator
    ) -> tuple[np.ndarray, list[str]]:
        """Twin images (uint8) and captions of ``images[idx]`` captioned ``texts``."""
        pixels, captions = [], []
        for i, text in zip(idx, texts, strict=True):
            scene = self.scenes[int(i)]
            twin = shape_twin(scene, rng)
            pixels.append(np.asarray(render_scene(twin)))
            captions.append(twin_caption(text, scene, twin))
        return np.stack(pixels), captions


def train_clip(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    images: np.ndarray,
    captions: Sequence[Sequence[str]],
    args: ClipTrainArgs,
    seed: int,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    twin_scenes: Sequence[Sequence[SceneObject] | None] | None = None,
) -> list[dict[str, Any]]:
    """Contrastive training with ``ClipLoss``; returns one log entry per epoch.

    ``images[i]`` (uint8 224x224x3) is paired each epoch with one of ``captions[i]`` drawn by a
    seeded generator; batches are a seeded permutation of the images. Given ``twin_scenes``
    (the benchmark's objects of each image), each batch holds ``clip_batch_size // 2`` images and
    their shape twins (:class:`TwinMaker`): minimal pairs that only shape tells apart.
    """
    args.validate()
    if len(images) != len(captions) or len(images) < 2:
        raise SRDError("CLIP pretraining needs at least 2 images, each with its captions")
    twins = None if twin_scenes is None else TwinMaker(images, twin_scenes)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    loss_fn = ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.clip_weight_decay}, {"params": rest}],
        lr=args.clip_learning_rate,
        weight_decay=0.0,
    )
    batch = min(args.clip_batch_size, len(images))
    if twins is not None:
        batch = max(1, min(args.clip_batch_size // 2, len(images)))  # + as many twins
    steps_per_epoch = len(images) // batch  # drop the ragged last batch: contrastive sizes vary
    total = steps_per_epoch * args.clip_epochs
    warmup = max(1, int(total * args.clip_warmup_ratio))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.clip_learning_rate * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return args.clip_learning_rate * 0.5 * (1 + math.cos(math.pi * progress))

    history = []
    step = 0
    model.train()
    for epoch in range(args.clip_epochs):
        if args.clip_group_batches:
            order = grouped_order(captions, args.clip_group_batches, rng)
        else:
            order = rng.permutation(len(images))
        choice = [int(rng.integers(len(captions[i]))) for i in range(len(images))]
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            texts = [captions[i][choice[i]] for i in idx]
            batch_images = images[idx]
            if twins is not None:
                twin_images, twin_texts = twins.make(idx, texts, rng)
                batch_images = np.concatenate([batch_images, twin_images])
                texts = texts + twin_texts
            pixels = pixel_batch(batch_images, model)
            text = tokenizer(texts).to(pixels.device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            image_f, text_f, scale = model(pixels, text)[:3]
            loss = loss_fn(image_f, text_f, scale)
            if args.clip_shape_negatives > 0:
                negatives = tokenizer([swap_shapes(t, rng) for t in texts]).to(pixels.device)
                negative_f = model.encode_text(negatives, normalize=True)
                loss = loss + args.clip_shape_negatives * shape_negative_loss(
                    image_f, text_f, negative_f, scale
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # as CLIP: the temperature may not exceed 100
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            step += 1
        entry = {"epoch": epoch, "step": step, "loss": float(np.mean(losses))}
        entry["logit_scale"] = float(model.logit_scale.detach().exp())
        history.append(entry)
        log.info(
            "clip epoch %d: loss %.4f (scale %.1f)", epoch, entry["loss"], entry["logit_scale"]
        )
        if on_epoch is not None:
            on_epoch(entry)
    model.eval()
    return history


def attribute_prompts() -> tuple[list[str], list[tuple[str, str]]]:
    """One prompt per (colour, shape) pair, for every background (averaged per pair)."""
    from srd.data.scenes import BACKGROUNDS

    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    prompts = []
    for colour, shape in pairs:
        article = "an" if colour[0] in "aeiou" else "a"
        for background in BACKGROUNDS:
            prompts.append(ZERO_SHOT_TEMPLATE.format(f"{article} {colour} {shape}", background))
    return prompts, pairs


@torch.no_grad()
def zero_shot_attributes(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    images: np.ndarray,
    scenes: Sequence[Sequence[SceneObject]],
    batch_size: int = 64,
) -> dict[str, float]:
    """Zero-shot (colour, shape) classification of the single-object images among ``images``.

    Each pair's text embedding is the mean over the background words of the benchmark's
    one-shape template. Returns the share of single-object images whose top-1 pair has the right
    colour, the right shape and both (chance: 1/6, 1/3, 1/18), and how many were probed.
    """
    model.eval()
    single = [i for i, objs in enumerate(scenes) if len(objs) == 1]
    if not single:
        raise SRDError("zero-shot probe: no single-object image among the probe images")
    prompts, pairs = attribute_prompts()
    device = next(model.parameters()).device
    text = model.encode_text(tokenizer(prompts).to(device), normalize=True)
    text = text.view(len(pairs), -1, text.shape[-1]).mean(1)
    text = text / text.norm(dim=-1, keepdim=True)
    hits = {"colour": 0, "shape": 0, "pair": 0}
    for start in range(0, len(single), batch_size):
        idx = single[start : start + batch_size]
        feats = model.encode_image(pixel_batch(images[idx], model), normalize=True)
        top = (feats @ text.T).argmax(dim=1).tolist()
        for i, t in zip(idx, top, strict=True):
            obj = scenes[i][0]
            colour_ok, shape_ok = pairs[t][0] == obj.colour, pairs[t][1] == obj.shape
            hits["colour"] += colour_ok
            hits["shape"] += shape_ok
            hits["pair"] += colour_ok and shape_ok
    out = {k: v / len(single) for k, v in hits.items()}
    out["num_images"] = len(single)
    return out


def save_clip(model: torch.nn.Module, name: str, out_dir: str | os.PathLike) -> Path:
    """Write ``clip.safetensors`` (the whole open_clip state dict, its config in the metadata)
    and ``open_clip_config.json`` beside it; returns the weights path."""
    out = ensure_dir(out_dir)
    cfg = model_config(name)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"open_clip_model": name, "config": json.dumps(cfg)}
    write_safetensors_file(out / CLIP_WEIGHTS, state, metadata)
    with atomic_path(out / CLIP_CONFIG_JSON) as tmp:
        tmp.write_text(json.dumps({"model": name, **cfg}, indent=2) + "\n", encoding="utf-8")
    return out / CLIP_WEIGHTS


def load_clip(
    name: str, path: str | os.PathLike, flag: str = "--clip_checkpoint"
) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    """An open_clip model of config ``name`` with the weights of ``path`` (strict): a
    safetensors or torch state dict (open_clip's released ``.bin``/``.safetensors`` files, an
    open_clip training checkpoint); OpenAI's TorchScript ``.pt`` files are refused (not weights
    only: convert them once with ``open_clip.create_model(name, pretrained=file)``)."""
    from srd.captioner.weights import read_state_dict

    model, tokenizer = create_clip(name, seed=0)
    state = read_state_dict(path, flag)
    # open_clip training checkpoints: {"state_dict": {"module.<key>": ...}, "epoch": ...}
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SRDError(f"{flag} {path}: does not fit the {name} config ({first})") from None
    model.eval()
    return model, tokenizer
