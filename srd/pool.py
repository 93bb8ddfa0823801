"""The RL mask pool (stage D1): surrogate-triggered training images with baseline SFS scores.

The defender does not know the real trigger, so the pool stamps every chosen training image with
a *surrogate* trigger (:func:`srd.triggers.stamp_random_noise`, seeded per image) and records the
backdoored captioner's caption of it, a clean reference caption of the same image, and the
baseline ``S_sem``/``S_flu`` of that caption (reference §8, §15 item 14). Stage D2 reads it back
as a :class:`srd.rl.env.MaskPool`.

A pool is a folder (reference: one pickle; here safe formats only)::

    images.npz   images: uint8 (N, 224, 224, 3), the surrogate-triggered images
    pool.json    ids, base_sem, base_flu, references, vlm_captions, surrogate boxes and config,
                 and the run record (meta)
    DONE         written last

Rows are keyed by image id; every list in ``pool.json`` is aligned with ``ids``.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from srd.errors import SRDError
from srd.geometry import IMAGE_SIZE
from srd.io import (
    DONE_MARKER,
    atomic_path,
    ensure_dir,
    is_finished,
    mark_finished,
    read_json,
    write_json,
)
from srd.rl.env import MaskPool
from srd.triggers import NOISE_PATCH_SIZE, SURROGATE_MEAN, SURROGATE_STD, stamp_random_noise

log = logging.getLogger(__name__)

POOL_FORMAT = "srd-mask-pool-v1"
POOL_IMAGES = "images.npz"
POOL_JSON = "pool.json"

SURROGATE_CONFIG: dict[str, Any] = {
    "trigger": "random_noise",
    "size": NOISE_PATCH_SIZE,
    "mean": SURROGATE_MEAN,
    "std": SURROGATE_STD,
    "placement": "a random corner with p = 1/2, else a uniformly random position",
    "rng": "numpy default_rng([seed, image_id])",
}
"""What the surrogate trigger is (recorded in every pool; reference §15 item 9)."""

CaptionFn = Callable[[list[np.ndarray]], list[str]]
ScoreFn = Callable[[list[str], list[str]], tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------------------------
# Building the pool


def choose_pool_ids(ids: Sequence[int], pool_size: int, seed: int) -> list[int]:
    """A seeded choice of ``pool_size`` training image ids (-1: all), sorted."""
    ids = sorted(int(i) for i in ids)
    if pool_size == -1 or pool_size == len(ids):
        return ids
    if not 1 <= pool_size <= len(ids):
        raise SRDError(f"--pool_size {pool_size}: must be -1 (all) or in [1, {len(ids)}]")
    pick = np.random.default_rng(seed).choice(len(ids), size=pool_size, replace=False)
    return sorted(ids[i] for i in pick)


def surrogate_image(image: np.ndarray, image_id: int, seed: int) -> np.ndarray:
    """The image with the surrogate trigger, seeded per image (independent of batching)."""
    return stamp_random_noise(image, np.random.default_rng([seed, int(image_id)]))


def changed_box(before: np.ndarray, after: np.ndarray) -> list[int] | None:
    """[top, bottom, left, right) of the pixels that differ, or None when none do."""
    rows, cols = np.nonzero(np.any(before != after, axis=-1))
    if len(rows) == 0:
        return None
    return [int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1]


@dataclass
class PoolRow:
    """One pool entry before saving: the triggered image (224, 224, 3) and its scores."""

    image_id: int
    image: np.ndarray
    vlm_caption: str
    reference: str
    base_sem: float
    base_flu: float
    surrogate_box: list[int] | None


def build_pool_rows(
    ids: Sequence[int],
    load_fn: Callable[[int], np.ndarray],
    caption_fn: CaptionFn,
    reference_fn: CaptionFn,
    score_fn: ScoreFn,
    seed: int,
    chunk_size: int = 64,
    progress: bool = True,
) -> list[PoolRow]:
    """Stamp, caption (backdoored VLM and clean reference) and score ``ids`` in chunks.

    ``load_fn(id)`` gives the clean training image; ``caption_fn`` is the backdoored captioner,
    ``reference_fn`` the clean reference captioner (both see the stamped image, reference §7.2),
    ``score_fn(captions, references) -> (S_sem (N,), S_flu (N,))``.
    """
    if chunk_size < 1:
        raise SRDError(f"--caption_batch_size {chunk_size}: must be at least 1")
    rows: list[PoolRow] = []
    starts = range(0, len(ids), chunk_size)
    for start in tqdm(starts, desc="D1 pool", unit="chunk", disable=not progress):
        chunk = [int(i) for i in ids[start : start + chunk_size]]
        clean = [load_fn(i) for i in chunk]
        stamped = [surrogate_image(im, i, seed) for im, i in zip(clean, chunk, strict=True)]
        vlm = list(caption_fn(stamped))
        refs = list(reference_fn(stamped))
        if len(vlm) != len(chunk) or len(refs) != len(chunk):
            raise ValueError(f"{len(vlm)}/{len(refs)} captions for {len(chunk)} images")
        sem, flu = score_fn(vlm, refs)
        for k, image_id in enumerate(chunk):
            rows.append(
                PoolRow(
                    image_id=image_id,
                    image=stamped[k],
                    vlm_caption=vlm[k],
                    reference=refs[k],
                    base_sem=float(sem[k]),
                    base_flu=float(flu[k]),
                    surrogate_box=changed_box(clean[k], stamped[k]),
                )
            )
    return rows


# --------------------------------------------------------------------------------------------
# Saving and loading


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def save_pool(
    folder: str | os.PathLike, rows: Sequence[PoolRow], meta: Mapping[str, Any] | None = None
) -> Path:
    """Write a pool folder (``images.npz``, ``pool.json``, then ``DONE``); rows sorted by id.

    Each file is written atomically; the marker comes last, so a killed writer never leaves a
    pool that :func:`load_pool` accepts.
    """
    if not rows:
        raise SRDError(f"{folder}: refusing to write an empty pool")
    rows = sorted(rows, key=lambda r: r.image_id)
    ids = [r.image_id for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("pool rows must have unique image ids")
    folder = ensure_dir(folder, "--save_data_path")
    (folder / DONE_MARKER).unlink(missing_ok=True)
    images = np.stack([np.asarray(r.image, dtype=np.uint8) for r in rows])
    with atomic_path(folder / POOL_IMAGES) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, images=images)
    write_json(
        folder / POOL_JSON,
        {
            "format": POOL_FORMAT,
            "num_images": len(rows),
            "ids": ids,
            "base_sem": [_json_float(r.base_sem) for r in rows],
            "base_flu": [_json_float(r.base_flu) for r in rows],
            "references": [r.reference for r in rows],
            "vlm_captions": [r.vlm_caption for r in rows],
            "surrogate": {**SURROGATE_CONFIG, "boxes": [r.surrogate_box for r in rows]},
            "meta": dict(meta or {}),
        },
    )
    mark_finished(folder)
    log.info("wrote a pool of %d images to %s", len(rows), folder)
    return folder


def read_pool_info(folder: str | os.PathLike) -> dict[str, Any]:
    """``pool.json`` of a finished pool (no images); SRDError naming the file otherwise."""
    folder = Path(folder)
    path = folder / POOL_JSON
    if not folder.is_dir():
        raise SRDError(f"--save_data_path {folder}: pool folder not found (run stage D1 first)")
    if not is_finished(folder):
        raise SRDError(f"--save_data_path {folder}: pool is unfinished (no {DONE_MARKER} marker)")
    info = read_json(path, flag="--save_data_path")
    if not isinstance(info, dict) or info.get("format") != POOL_FORMAT:
        raise SRDError(f"--save_data_path {path}: not a mask pool (format {POOL_FORMAT!r})")
    n = len(info.get("ids") or [])
    for key in ("base_sem", "base_flu", "references", "vlm_captions"):
        values = info.get(key)
        if not isinstance(values, list) or len(values) != n:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise SRDError(f"--save_data_path {path}: '{key}' has {got} entries for {n} ids")
    return info


def load_pool(folder: str | os.PathLike) -> MaskPool:
    """Read a pool folder written by :func:`save_pool` as a :class:`MaskPool`.

    SRDError naming the file for a missing or unfinished folder, unreadable files, and arrays
    whose lengths or shapes do not agree.
    """
    folder = Path(folder)
    info = read_pool_info(folder)
    path = folder / POOL_IMAGES
    if not path.is_file():
        raise SRDError(f"--save_data_path {path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data["images"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SRDError(f"--save_data_path {path}: cannot read pool images ({reason})") from None
    n = len(info["ids"])
    if images.ndim != 4 or images.shape[0] != n:
        raise SRDError(
            f"--save_data_path {path}: holds {images.shape[0] if images.ndim else 0} images "
            f"but {POOL_JSON} lists {n} ids"
        )
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or images.dtype != np.uint8:
        raise SRDError(
            f"--save_data_path {path}: images are {images.dtype} {images.shape[1:]}, "
            f"expected uint8 ({IMAGE_SIZE}, {IMAGE_SIZE}, 3)"
        )

    def floats(key: str) -> np.ndarray:
        return np.array([np.nan if v is None else float(v) for v in info[key]], dtype=np.float64)

    return MaskPool(
        images=images,
        base_sem=floats("base_sem"),
        base_flu=floats("base_flu"),
        references=info["references"],
        ids=[str(i) for i in info["ids"]],
        source=str(folder / POOL_JSON),
    )
