"""Single-object scenes of the benchmark as an 18-class (colour, shape) classification set.

Each image is drawn by :func:`srd.data.scenes.sample_single_scene` and
:func:`srd.data.scenes.render_scene` on the 224 canvas, then downscaled (box filter) to
``resolution``. Sample ``i`` of a split depends only on (seed, split, i): its class is
``i % 18`` and its scene comes from its own seed stream. A split is one npz file (uint8
images, labels, ids) beside ``shapes.json`` (config, class names, per-id attributes and
descriptions), written last.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from srd.data.scenes import COLOURS, SHAPES, render_scene, sample_single_scene
from srd.errors import SRDError
from srd.io import atomic_path, ensure_dir, read_json, write_json

log = logging.getLogger(__name__)

SHAPES_VERSION = 1
CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
"""Class names, "colour shape", colour-major (index = 3 * colour + shape)."""

CONFIG_JSON = "shapes.json"
_SPLITS = {"train": (10_000_000, 10), "test": (20_000_000, 11)}


def class_index(name: str, flag: str = "--target", classes: Sequence[str] = CLASSES) -> int:
    """Index of a class of ``classes`` given by name ("yellow triangle") or number; SRDError
    naming ``flag``."""
    text = str(name).strip().lower()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(classes):
            raise SRDError(f"{flag} {name}: class out of range (0..{len(classes) - 1})")
        return index
    if text not in classes:
        raise SRDError(f"{flag} {name!r}: unknown class (known: {', '.join(classes)})")
    return list(classes).index(text)


def check_class(index: int, flag: str, num_classes: int = len(CLASSES)) -> int:
    """``index`` if it is a class index, else SRDError naming ``flag``."""
    if not 0 <= int(index) < num_classes:
        raise SRDError(f"{flag} {index}: class out of range (0..{num_classes - 1})")
    return int(index)


def validate_sizes(config: Any) -> None:
    """SRDError naming the flag when a data set config's seed, sizes or resolution is out of
    range (the shapes set's and the distinct set's configs alike)."""
    for name in ("per_class_train", "per_class_test"):
        if not 1 <= getattr(config, name) <= 100_000:
            raise SRDError(f"--{name} {getattr(config, name)}: must be between 1 and 100000")
    if not 16 <= config.resolution <= 224:
        raise SRDError(f"--resolution {config.resolution}: must be between 16 and 224")
    if config.seed < 0:
        raise SRDError(f"--seed {config.seed}: must be non-negative")


@dataclass(frozen=True)
class ShapesConfig:
    """Everything that determines the classification set's bytes."""

    seed: int = 0
    per_class_train: int = 150
    per_class_test: int = 200
    resolution: int = 48
    version: int = SHAPES_VERSION

    def validate(self) -> None:
        validate_sizes(self)


@dataclass
class ShapesSplit:
    """One split: images (N, R, R, 3) uint8, labels (N,), ids (N,), and per-sample text."""

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    descriptions: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray) -> ShapesSplit:
        keep = np.flatnonzero(mask)
        return ShapesSplit(
            self.images[keep],
            self.labels[keep],
            self.ids[keep],
            [self.descriptions[i] for i in keep],
        )


def describe(colour: str, shape: str, size: str, background: str, position: str) -> str:
    """The canonical description a semantic attack's concept is matched against."""
    return f"a {size} {colour} {shape} on a {background} background {position}"


def render_sample(
    seed: int, split: str, index: int, resolution: int
) -> tuple[np.ndarray, int, str]:
    """(image, label, description) of sample ``index`` of ``split``."""
    label = index % len(CLASSES)
    colour, shape = CLASSES[label].split()
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split][1], index]))
    scene = sample_single_scene(rng, colour, shape)
    image = render_scene(scene)
    if resolution != image.width:
        image = image.resize((resolution, resolution), Image.Resampling.BOX)
    obj = scene.objects[0]
    text = describe(obj.colour, obj.shape, obj.size, scene.background, obj.position)
    return np.asarray(image, dtype=np.uint8), label, text


def generate_shapes(
    out_dir: str | os.PathLike, config: ShapesConfig, overwrite: bool = False
) -> Path:
    """Write ``train.npz``, ``test.npz`` and ``shapes.json`` (last) to ``out_dir``.

    A finished folder with the same config is left alone; another config raises SRDError
    unless ``overwrite`` (then the config file is removed first, so an interrupted rebuild is
    never taken for finished).
    """
    config.validate()
    per_class = {"train": config.per_class_train, "test": config.per_class_test}
    return write_dataset(
        out_dir,
        dataclasses.asdict(config),
        CLASSES,
        {split: (count * len(CLASSES), _SPLITS[split][0]) for split, count in per_class.items()},
        lambda split, i: render_sample(config.seed, split, i, config.resolution),
        overwrite,
    )


def write_dataset(
    out_dir: str | os.PathLike,
    config: dict[str, Any],
    classes: Sequence[str],
    splits: dict[str, tuple[int, int]],
    sample: Callable[[str, int], tuple[np.ndarray, int, str]],
    overwrite: bool,
) -> Path:
    """A data folder in the format every SODA stage reads: per split (name -> (count, first
    id)) ``<split>.npz`` of ``sample(split, i)`` = (image, label, description), then
    ``shapes.json`` (``config`` and ``classes``), written last. A folder finished with the same
    config is left alone; another config needs ``overwrite``."""
    root = ensure_dir(out_dir, "--data_dir")
    cfg_path = root / CONFIG_JSON
    if cfg_path.is_file():
        existing = read_json(cfg_path).get("config")
        if existing == config:
            log.info("data in %s already built with this config", root)
            return root
        if not overwrite:
            raise SRDError(
                f"--data_dir {root}: holds shapes data with another config ({existing}); pass "
                "--overwrite to rebuild it (models trained on it no longer match)"
            )
        cfg_path.unlink()
    start = time.perf_counter()
    for split, (n, first_id) in splits.items():
        images, labels, texts = [], np.empty(n, np.int64), []
        for i in range(n):
            image, labels[i], text = sample(split, i)
            images.append(image)
            texts.append(text)
        ids = first_id + np.arange(n, dtype=np.int64)
        with atomic_path(root / f"{split}.npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(
                    handle,
                    images=np.stack(images).astype(np.uint8),
                    labels=labels,
                    ids=ids,
                    descriptions=np.array(texts),
                )
    write_json(cfg_path, {"config": config, "classes": list(classes)})
    log.info("wrote data to %s in %.1f s", root, time.perf_counter() - start)
    return root


def load_split(data_dir: str | os.PathLike, split: str) -> ShapesSplit:
    """Read one split of a finished shapes folder; SRDError naming the folder otherwise."""
    root = Path(data_dir)
    if not (root / CONFIG_JSON).is_file():
        raise SRDError(f"--data_dir {root}: no finished shapes data (run train/soda_data.py)")
    path = root / f"{split}.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            return ShapesSplit(
                data["images"], data["labels"], data["ids"], [str(t) for t in data["descriptions"]]
            )
    except (OSError, KeyError, ValueError) as exc:
        raise SRDError(f"{path}: unreadable shapes split ({exc})") from None


def data_config(data_dir: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(data_dir) / CONFIG_JSON, flag="--data_dir")["config"]


def data_classes(data_dir: str | os.PathLike) -> tuple[str, ...]:
    """The class names a finished data folder was built with (its ``shapes.json``)."""
    return tuple(read_json(Path(data_dir) / CONFIG_JSON, flag="--data_dir")["classes"])
