"""Loaders for captioned images: the Karpathy split JSON, COCO caption annotations, image files.

They read real COCO (Karpathy ``dataset_coco.json`` + ``captions_val2014.json`` + the
``train2014``/``val2014`` folders) and the synthetic benchmark of :mod:`srd.data.benchmark` alike.
Records are keyed by ids (COCO image id = Karpathy ``cocoid``, caption id = ``sentid``).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from srd.config import arg
from srd.data.scenes import SceneObject
from srd.errors import SRDError
from srd.flags import at_least
from srd.geometry import IMAGE_SIZE
from srd.io import read_json

log = logging.getLogger(__name__)

KARPATHY_FLAG = "--coco_karpathy_json_path"
ANNOTATIONS_FLAG = "--coco_annotations_json_path"
SPLITS = ("train", "val", "test", "restval")
"""Karpathy split names; asking for "train" also returns "restval" images."""


@dataclass(frozen=True)
class CaptionRecord:
    """One reference caption (``caption_id`` = COCO annotation id = Karpathy sentid)."""

    caption_id: int
    image_id: int
    caption: str


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split with its reference captions (sorted by caption id).

    ``objects`` is the ground-truth scene of a synthetic benchmark image, None for real COCO.
    """

    image_id: int
    path: Path
    split: str
    captions: tuple[CaptionRecord, ...]
    objects: tuple[SceneObject, ...] | None = None


def _image_record(
    entry: Any, where: str, train_image_dir: Path, val_image_dir: Path
) -> ImageRecord:
    try:
        image_id = int(entry["cocoid"])
        image_dir = train_image_dir if entry["filepath"] == "train2014" else val_image_dir
        captions = tuple(
            sorted(
                (
                    CaptionRecord(int(s["sentid"]), image_id, str(s["raw"]))
                    for s in entry["sentences"]
                ),
                key=lambda c: c.caption_id,
            )
        )
        objects = entry.get("objects")
        scene = None if objects is None else tuple(SceneObject.from_dict(o) for o in objects)
        return ImageRecord(
            image_id, image_dir / str(entry["filename"]), str(entry["split"]), captions, scene
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise SRDError(f"{where}: malformed image entry ({type(exc).__name__}: {exc})") from None


def load_split(
    karpathy_json_path: str | os.PathLike,
    split: str,
    train_image_dir: str | os.PathLike,
    val_image_dir: str | os.PathLike,
    flag: str = KARPATHY_FLAG,
) -> list[ImageRecord]:
    """Images of one Karpathy split, sorted by image id.

    ``split`` is "train" (which also takes "restval" images, as in the Karpathy convention),
    "val", "test" or "restval". The image path is ``train_image_dir/filename`` when the entry's
    filepath is "train2014", else ``val_image_dir/filename``. SRDError (naming ``flag`` and the
    file) when the JSON is missing or malformed, the split is unknown or empty, or ids repeat.
    """
    path = Path(karpathy_json_path)
    where = f"{flag} {path}"
    if split not in SPLITS:
        raise SRDError(f"{where}: unknown split {split!r} (known: {', '.join(SPLITS)})")
    data = read_json(path, flag=flag)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SRDError(f'{where}: not a Karpathy split file (no "images" list)')
    wanted = {"train", "restval"} if split == "train" else {split}
    records = [
        _image_record(entry, where, Path(train_image_dir), Path(val_image_dir))
        for entry in data["images"]
        if isinstance(entry, dict) and entry.get("split") in wanted
    ]
    if not records:
        raise SRDError(f"{where}: split {split!r} is absent or empty")
    records.sort(key=lambda r: r.image_id)
    image_ids = [r.image_id for r in records]
    if len(set(image_ids)) != len(image_ids):
        raise SRDError(f"{where}: repeated image ids (cocoid) in split {split!r}")
    caption_ids = [c.caption_id for r in records for c in r.captions]
    if len(set(caption_ids)) != len(caption_ids):
        raise SRDError(f"{where}: repeated caption ids (sentid) in split {split!r}")
    log.info("%s: %d images, %d captions in split %r", path, len(records), len(caption_ids), split)
    return records


def load_references(
    annotations_json_path: str | os.PathLike, flag: str = ANNOTATIONS_FLAG
) -> dict[int, list[str]]:
    """COCO caption annotations -> {image id: captions in annotation-id order}, sorted by id."""
    path = Path(annotations_json_path)
    where = f"{flag} {path}"
    data = read_json(path, flag=flag)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise SRDError(f'{where}: not a COCO caption annotations file (no "annotations" list)')
    try:
        annotations = sorted(
            ((int(a["image_id"]), int(a["id"]), str(a["caption"])) for a in data["annotations"]),
            key=lambda a: (a[0], a[1]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SRDError(f"{where}: malformed annotation ({type(exc).__name__}: {exc})") from None
    if not annotations:
        raise SRDError(f"{where}: no caption annotations")
    references: dict[int, list[str]] = {}
    for image_id, _, caption in annotations:
        references.setdefault(image_id, []).append(caption)
    return references


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 RGB of shape (224, 224, 3), bicubic-resized when needed."""
    path = Path(path)
    if not path.is_file():
        raise SRDError(f"{path}: missing image file")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SRDError(f"{path}: cannot read image ({exc})") from None
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def load_images(paths: Iterable[str | os.PathLike]) -> np.ndarray:
    """Stack :func:`load_image` of each path: uint8 array of shape (N, 224, 224, 3)."""
    images = [load_image(p) for p in paths]
    if not images:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return np.stack(images)


def check_images_exist(records: Sequence[ImageRecord]) -> None:
    """Fail fast, before a long run, with SRDError naming the first missing image file."""
    missing = [r.path for r in records if not r.path.is_file()]
    if missing:
        raise SRDError(
            f"{missing[0]}: missing image file ({len(missing)} of {len(records)} images missing; "
            "check --coco_train_image_dir_path / --coco_val_image_dir_path)"
        )


def caption_records(images: Iterable[ImageRecord]) -> list[CaptionRecord]:
    """All captions of ``images`` in one list, sorted by caption id."""
    return sorted((c for image in images for c in image.captions), key=lambda c: c.caption_id)


DEFAULT_CACHE_MB = 512
"""Default image cache (MiB per process/worker): holds the embedded benchmark (~3,500 images)."""

EMBEDDED_DATA = Path("data/synthetic")
"""Where ``train/prepare_data.py`` writes the embedded default benchmark."""


@dataclass
class DataArgs:
    """Dataset: Karpathy split JSON, COCO caption annotations and image folders."""

    coco_train_image_dir_path: str = arg(
        str(EMBEDDED_DATA / "train2014"), help="folder of training images (COCO train2014)"
    )
    coco_val_image_dir_path: str = arg(
        str(EMBEDDED_DATA / "val2014"), help="folder of val/test images (COCO val2014)"
    )
    coco_karpathy_json_path: str = arg(
        str(EMBEDDED_DATA / "dataset_coco.json"), help="Karpathy split JSON (dataset_coco.json)"
    )
    coco_annotations_json_path: str = arg(
        str(EMBEDDED_DATA / "captions_val2014.json"),
        help="COCO caption annotations for evaluation (captions_val2014.json)",
    )
    image_cache_mb: float = arg(
        DEFAULT_CACHE_MB,
        help="decoded-image cache per process and per data-loader worker, in MiB (0: none)",
        check=at_least(0),
    )

    def read_paths(self) -> dict[str, str]:
        """What training reads: the split JSON and both image folders (COCO's "restval" images
        live in val2014), by flag name (``srd.runs.input_digests``)."""
        return {
            "coco_karpathy_json_path": self.coco_karpathy_json_path,
            "coco_train_image_dir_path": self.coco_train_image_dir_path,
            "coco_val_image_dir_path": self.coco_val_image_dir_path,
        }

    def split(self, name: str) -> list[ImageRecord]:
        """Image records of one Karpathy split ("train" includes "restval")."""
        return load_split(
            self.coco_karpathy_json_path,
            name,
            self.coco_train_image_dir_path,
            self.coco_val_image_dir_path,
        )


IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3
"""One decoded image (uint8 224x224x3): 150,528 bytes."""


class ImageStore:
    """``store(image_id) -> uint8 (224, 224, 3)``: images of some records, loaded on demand.

    Decoded images are kept in a least-recently-used cache of at most ``cache_mb`` MiB
    (0: no cache). Every process and every DataLoader worker holds its own cache, so the bound
    is per worker: at COCO scale (113k training images, 17 GB decoded) an unbounded cache would
    grow to the whole dataset in each of them.
    """

    def __init__(self, records: Iterable[ImageRecord], cache_mb: float = DEFAULT_CACHE_MB):
        self.paths: dict[int, Path] = {r.image_id: r.path for r in records}
        if cache_mb < 0:
            raise SRDError(f"--image_cache_mb {cache_mb}: expected 0 (no cache) or more")
        self.max_images = int(cache_mb * 2**20 // IMAGE_BYTES)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __call__(self, image_id: int) -> np.ndarray:
        image = self._cache.get(image_id)
        if image is not None:
            self._cache.move_to_end(image_id)
            return image
        image = load_image(self.paths[image_id])
        image.setflags(write=False)  # a cached image is shared: nobody may paint on it
        if self.max_images > 0:
            self._cache[image_id] = image
            if len(self._cache) > self.max_images:
                self._cache.popitem(last=False)
        return image

    def cached(self) -> int:
        """Number of decoded images held now."""
        return len(self._cache)

    def ids(self) -> list[int]:
        return sorted(self.paths)
