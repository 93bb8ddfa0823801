"""The small CNN classifier SODA analyses, its split at ``--ana_layer``, and its files.

The network is an ``nn.Sequential`` of blocks; ``--ana_layer k`` cuts it after block ``k``:
``features = blocks[:k+1]`` gives the hidden vector h (flattened), ``head = blocks[k+1:]``
maps h to logits. The default layer is the last hidden one, where the head is one
``nn.Linear`` (as at every layer the SODA authors used); ``ana_layer = num_blocks - 3`` puts a
ReLU MLP in the head, which makes the attribution data-dependent.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from srd.errors import SRDError
from srd.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
MEAN, STD = 0.5, 0.25
"""Input normalisation: x = (pixel / 255 - MEAN) / STD, the space reconstruction works in."""


@dataclass(frozen=True)
class ClassifierSpec:
    """Architecture of the classifier (saved beside its weights)."""

    num_classes: int = 18
    width: int = 16
    hidden: int = 64
    resolution: int = 48


def _conv(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    # Global max (not average) pooling: the object covers a few cells of a plain background, and
    # averaging diluted it (clean accuracy 55% vs 85% after 8 epochs, one measurement each).
    layers.append(nn.MaxPool2d(2) if pool else nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten()))
    return nn.Sequential(*layers)


def build_classifier(spec: ClassifierSpec) -> nn.Sequential:
    """conv blocks (w, 2w, 4w, 4w; the last max-pooled globally) -> Linear+ReLU -> Linear."""
    w = spec.width
    return nn.Sequential(
        _conv(3, w, True),
        _conv(w, 2 * w, True),
        _conv(2 * w, 4 * w, True),
        _conv(4 * w, 4 * w, False),
        nn.Sequential(nn.Linear(4 * w, spec.hidden), nn.ReLU(inplace=True)),
        nn.Linear(spec.hidden, spec.num_classes),
    )


def default_layer(model: nn.Sequential) -> int:
    """The last hidden layer: the head after it is the final ``nn.Linear``."""
    return len(model) - 2


def analysed_layer(model: nn.Sequential, ana_layer: int) -> int:
    """The layer ``--ana_layer`` names: -1 is the last hidden one; others are checked."""
    return default_layer(model) if ana_layer == -1 else check_layer(model, ana_layer)


def check_layer(model: nn.Sequential, ana_layer: int) -> int:
    """``ana_layer`` if the network can be cut after that block; SRDError naming the flag."""
    last = len(model) - 2
    if not 0 <= ana_layer <= last:
        raise SRDError(
            f"--ana_layer {ana_layer}: no such layer (the classifier has hidden layers 0..{last})"
        )
    return ana_layer


class Features(nn.Module):
    """Input -> flattened hidden vector h of the analysed layer (N features)."""

    def __init__(self, blocks: nn.Sequential):
        super().__init__()
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).flatten(1)


class Head(nn.Module):
    """Flattened hidden vector -> logits (restores the block's output shape first)."""

    def __init__(self, blocks: nn.Sequential, shape: tuple[int, ...]):
        super().__init__()
        self.blocks = blocks
        self.shape = shape

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.blocks(h.view(h.shape[0], *self.shape))


def split_model(model: nn.Sequential, ana_layer: int, resolution: int) -> tuple[Features, Head]:
    """(features, head) with ``head(features(x)) == model(x)``; shares the model's modules."""
    check_layer(model, ana_layer)
    front = nn.Sequential(*model[: ana_layer + 1])
    back = nn.Sequential(*model[ana_layer + 1 :])
    modes = [m.training for m in model.modules()]
    with torch.no_grad():
        front.eval()  # a shape probe must not touch BatchNorm statistics
        shape = tuple(front(torch.zeros(1, 3, resolution, resolution)).shape[1:])
    for module, mode in zip(model.modules(), modes, strict=True):
        module.training = mode
    features, head = Features(front), Head(back, shape)
    for wrapper in (features, head, front, back):
        wrapper.training = model.training
    return features, head


def to_input(images: Any) -> torch.Tensor:
    """uint8 (N, R, R, 3) array or tensor -> normalised float (N, 3, R, R)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def save_classifier(
    run_dir: str | os.PathLike, model: nn.Module, spec: ClassifierSpec, meta: dict
) -> None:
    """Weights as safetensors + ``model.json`` (spec and meta), each written atomically."""
    run_dir = Path(run_dir)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(run_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(run_dir / MODEL_JSON, {"spec": asdict(spec), **meta})


def load_classifier(
    run_dir: str | os.PathLike, flag: str = "--in_model"
) -> tuple[nn.Sequential, ClassifierSpec, dict]:
    """(model in eval mode, spec, model.json) of a run folder; SRDError naming ``flag``."""
    run_dir = Path(run_dir)
    record = read_json(run_dir / MODEL_JSON, flag=flag)
    try:
        spec = ClassifierSpec(**record["spec"])
    except (KeyError, TypeError) as exc:
        raise SRDError(f"{flag} {run_dir}: bad model.json ({exc})") from None
    path = run_dir / WEIGHTS
    if not path.is_file():
        raise SRDError(f"{flag} {run_dir}: no {WEIGHTS}")
    model = build_classifier(spec)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:  # e.g. truncated
        raise SRDError(f"{flag} {path}: damaged weights file ({str(exc)[:200]})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise SRDError(f"{flag} {path}: weights do not fit the spec ({str(exc)[:200]})") from None
    return model.eval(), spec, record
