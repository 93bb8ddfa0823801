"""The embedded default's data: a deterministic benchmark of captioned coloured-shape scenes.

Every image is a 224x224 RGB PNG showing one to three non-overlapping shapes (a colour, a shape,
a size, one cell of a 3x3 layout) on a plain background. Every image has several reference
captions made from varied templates; each caption names the colour and shape of every object.
The files are laid out the way real COCO is used here (Karpathy split JSON, COCO caption
annotations JSON, ``train2014``/``val2014`` image folders), so :mod:`srd.data.records` reads both
alike. The Karpathy JSON carries one extra field per image, ``objects``, the ground-truth scene.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from srd.captions import words
from srd.data.attributes import most_common_caption
from srd.data.scenes import CAPTION_TEMPLATES, render_scene, sample_scene, scene_captions
from srd.errors import SRDError
from srd.geometry import IMAGE_SIZE
from srd.io import atomic_path, ensure_dir, read_json, write_json

log = logging.getLogger(__name__)


BENCHMARK_VERSION = 1
"""Bumped whenever the same seed would draw different images or captions."""
# Split -> (cocoid offset, seed stream). Fixed offsets keep a split's ids and scenes the same
# whatever the other splits' sizes are.
_SPLITS = {"train": (1_000_000, 0), "val": (2_000_000, 1), "test": (3_000_000, 2)}
_MAX_PER_SPLIT = 999_999
_MAX_CAPTIONS = 10  # sentid = cocoid * 10 + k

KARPATHY_JSON = "dataset_coco.json"
VAL_ANNOTATIONS_JSON = "captions_val2014.json"
TRAIN_ANNOTATIONS_JSON = "captions_train2014.json"
CONFIG_JSON = "benchmark.json"
TRAIN_DIR = "train2014"
VAL_DIR = "val2014"


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything that determines the benchmark's bytes (written to benchmark.json)."""

    seed: int = 0
    num_train: int = 3000
    num_val: int = 100
    num_test: int = 300
    captions_per_image: int = 5
    version: int = BENCHMARK_VERSION

    def validate(self) -> None:
        """SRDError naming the flag of the first bad value."""
        for name in ("num_train", "num_val", "num_test"):
            value = getattr(self, name)
            if not 1 <= value <= _MAX_PER_SPLIT:
                raise SRDError(f"--{name} {value}: must be between 1 and {_MAX_PER_SPLIT}")
        if not 3 <= self.captions_per_image <= len(CAPTION_TEMPLATES):
            raise SRDError(
                f"--captions_per_image {self.captions_per_image}: must be between 3 and "
                f"{len(CAPTION_TEMPLATES)}"
            )
        if self.seed < 0:
            raise SRDError(f"--seed {self.seed}: must be non-negative")


@dataclass(frozen=True)
class BenchmarkPaths:
    """Where a benchmark's files are; the names follow the COCO flags of the evaluation stage."""

    root: Path
    karpathy_json: Path  # --coco_karpathy_json_path
    annotations_json: Path  # --coco_annotations_json_path (val + test images)
    train_annotations_json: Path
    train_image_dir: Path  # --coco_train_image_dir_path
    val_image_dir: Path  # --coco_val_image_dir_path
    config_json: Path


def benchmark_paths(out_dir: str | os.PathLike) -> BenchmarkPaths:
    """The file layout of a benchmark folder (nothing is checked or created)."""
    root = Path(out_dir)
    return BenchmarkPaths(
        root=root,
        karpathy_json=root / KARPATHY_JSON,
        annotations_json=root / VAL_ANNOTATIONS_JSON,
        train_annotations_json=root / TRAIN_ANNOTATIONS_JSON,
        train_image_dir=root / TRAIN_DIR,
        val_image_dir=root / VAL_DIR,
        config_json=root / CONFIG_JSON,
    )


# --------------------------------------------------------------------------- generation


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split][1], index]))


def _write_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def generate_benchmark(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_train: int = 3000,
    num_val: int = 100,
    num_test: int = 300,
    captions_per_image: int = 5,
    overwrite: bool = False,
) -> BenchmarkPaths:
    """Write the benchmark into ``out_dir`` (deterministic from ``seed``; returns its paths).

    Image ``i`` of a split depends only on (seed, split, i), so growing one split leaves the
    other splits' images, ids and captions unchanged (only Karpathy ``imgid`` positions move).
    ``benchmark.json`` is written last; a finished folder with the same config is left
    alone, a different config raises SRDError unless ``overwrite``.
    """
    config = BenchmarkConfig(seed, num_train, num_val, num_test, captions_per_image)
    config.validate()
    paths = benchmark_paths(out_dir)
    ensure_dir(paths.root, flag="--out_dir")
    wanted = dataclasses.asdict(config)
    if paths.config_json.is_file():
        record = read_json(paths.config_json)
        existing = record.get("config") if isinstance(record, dict) else None
        if existing == wanted:
            log.info(
                "benchmark in %s is already finished with this config: nothing to do", paths.root
            )
            return paths
        if not overwrite:
            raise SRDError(
                f"--out_dir {paths.root}: holds a finished benchmark with a different config "
                f"({_describe(existing)}); pass --overwrite to replace it"
            )
        log.info("overwriting the benchmark in %s (old config %s)", paths.root, _describe(existing))
        # Unmark first so an interrupted overwrite is never taken for a finished benchmark.
        paths.config_json.unlink()
    # Caption files of an older or unfinished benchmark go before any new image is written, so
    # a killed run never leaves old captions beside new images (the loaders would accept them).
    for stale in (paths.karpathy_json, paths.annotations_json, paths.train_annotations_json):
        stale.unlink(missing_ok=True)

    start = time.perf_counter()
    karpathy_images: list[dict[str, Any]] = []
    annotations: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    coco_images: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    written: dict[Path, set[str]] = {paths.train_image_dir: set(), paths.val_image_dir: set()}
    total = sum(sizes.values())
    with tqdm(total=total, desc="benchmark images", unit="img", mininterval=2.0) as bar:
        for split, size in sizes.items():
            folder_name = TRAIN_DIR if split == "train" else VAL_DIR
            folder = paths.root / folder_name
            for index in range(size):
                rng = _scene_rng(seed, split, index)
                scene = sample_scene(rng)
                captions = scene_captions(scene, rng, captions_per_image)
                cocoid = _SPLITS[split][0] + index
                filename = f"SYN_{folder_name}_{cocoid:012d}.png"
                _write_png(render_scene(scene), folder / filename)
                written[folder].add(filename)
                imgid = len(karpathy_images)
                sentids = [cocoid * _MAX_CAPTIONS + k for k in range(len(captions))]
                karpathy_images.append(
                    {
                        "filepath": folder_name,
                        "filename": filename,
                        "split": split,
                        "cocoid": cocoid,
                        "imgid": imgid,
                        "sentids": sentids,
                        "sentences": [
                            {"raw": c, "tokens": words(c), "imgid": imgid, "sentid": s}
                            for c, s in zip(captions, sentids, strict=True)
                        ],
                        "objects": [o.to_dict() for o in scene.objects],
                        "background": scene.background,
                    }
                )
                part = "train" if split == "train" else "val"
                coco_images[part].append(
                    {"id": cocoid, "file_name": filename, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
                )
                annotations[part].extend(
                    {"image_id": cocoid, "id": s, "caption": c}
                    for c, s in zip(captions, sentids, strict=True)
                )
                bar.update()
    _remove_stale_images(written)

    write_json(paths.karpathy_json, {"images": karpathy_images, "dataset": "coco"})
    for part, path in (("val", paths.annotations_json), ("train", paths.train_annotations_json)):
        write_json(path, _coco_annotations(part, coco_images[part], annotations[part]))
    train_captions = [
        s["raw"] for im in karpathy_images if im["split"] == "train" for s in im["sentences"]
    ]
    blind = most_common_caption(train_captions)
    write_json(
        paths.config_json,
        {
            "config": wanted,
            "files": {
                "coco_karpathy_json_path": KARPATHY_JSON,
                "coco_annotations_json_path": VAL_ANNOTATIONS_JSON,
                "coco_train_annotations_json_path": TRAIN_ANNOTATIONS_JSON,
                "coco_train_image_dir_path": TRAIN_DIR,
                "coco_val_image_dir_path": VAL_DIR,
            },
            "blind_caption": blind,
        },
    )
    log.info(
        "wrote %d images (%d train / %d val / %d test, %d captions each) to %s in %.1f s; "
        "blind baseline caption: %r",
        total,
        num_train,
        num_val,
        num_test,
        captions_per_image,
        paths.root,
        time.perf_counter() - start,
        blind,
    )
    return paths


def _describe(config: Any) -> str:
    if not isinstance(config, dict):
        return "unreadable config"
    return ", ".join(f"{k}={v}" for k, v in config.items())


def _coco_annotations(
    part: str, images: list[dict[str, Any]], annotations: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "info": {
            "description": f"SRD synthetic captioned shapes benchmark ({part}2014 part)",
            "version": str(BENCHMARK_VERSION),
        },
        "licenses": [],
        "type": "captions",
        "images": images,
        "annotations": annotations,
    }


def _remove_stale_images(written: Mapping[Path, set[str]]) -> None:
    """Delete our own PNGs left by an earlier, larger config (other files are never touched)."""
    for folder, names in written.items():
        for path in folder.glob("SYN_*.png"):
            if path.name not in names:
                path.unlink()
