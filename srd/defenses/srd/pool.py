"""The RL mask pool (stage D1): surrogate-triggered training images with baseline SFS scores.

The defender does not know the real trigger, so the pool stamps every chosen training image with
a *surrogate* trigger (:func:`srd.attacks.triggers.stamp_random_noise`, seeded per image) and
records the backdoored captioner's caption of it, a clean reference caption of the same image, and
the baseline ``S_sem``/``S_flu`` of that caption (reference §8, §15 item 14). Stage D2 reads it back
as a :class:`StreamedPool`.

A pool is a folder of per-rank shards (reference: one pickle of every image, gathered to rank 0;
here safe formats, and no pixels)::

    pool-00000-of-00002.json   one shard per D1 process, entries sorted by id: ids, base_sem,
    pool-00001-of-00002.json   base_flu, references, vlm_captions, checksums (CRC-32 of each
                               pool image), surrogate boxes (surrogate pools only)
    pool.json                  manifest: shard count and entry counts, the source (and, for a
                               surrogate pool only, the surrogate trigger and its seed), the data
                               flags, the run's config hash and record (meta)
    DONE                       written last

No image is stored: a pool image is a function of the training image file, its id and the
seed (or, for a ``data`` pool, the recorded poison plan), so D2 re-derives it when the
environment needs it and checks it against the recorded checksum. Each shard is written
atomically by its process; the manifest and the marker come last, from the main process.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from srd.attacks.triggers import NOISE_PATCH_SIZE, SURROGATE_MEAN, SURROGATE_STD, stamp_random_noise
from srd.defenses.srd.env import PoolRecord
from srd.errors import SRDError
from srd.io import DONE_MARKER, ensure_dir, is_finished, mark_finished, read_json, write_json

log = logging.getLogger(__name__)

POOL_FORMAT = "srd-mask-pool-v2"
SHARD_FORMAT = "srd-mask-pool-shard-v2"
POOL_JSON = "pool.json"
LEGACY_IMAGES = "images.npz"
"""The image file of format v1 pools; removed when a pool folder is rebuilt."""
_SHARD_RE = re.compile(r"^pool-(\d+)-of-(\d+)\.json$")

SURROGATE_CONFIG: dict[str, Any] = {
    "trigger": "random_noise",
    "size": NOISE_PATCH_SIZE,
    "mean": SURROGATE_MEAN,
    "std": SURROGATE_STD,
    "placement": "a random corner with p = 1/2, else a uniformly random position",
    "rng": "numpy default_rng([seed, image_id])",
}
"""What the surrogate trigger is (recorded, with its seed, in every surrogate pool; reference
§15 item 9)."""

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


def image_checksum(image: np.ndarray) -> int:
    """CRC-32 of an image's uint8 bytes: D2 checks that the image it re-derives is the one that
    D1 scored (a changed image file or poison plan is caught, not silently trained on)."""
    return zlib.crc32(np.ascontiguousarray(image, dtype=np.uint8).tobytes())


@dataclass
class PoolRow:
    """One pool entry before saving: the checksum of its image (224, 224, 3) and its scores."""

    image_id: int
    checksum: int
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
    ``score_fn(captions, references) -> (S_sem (N,), S_flu (N,))``. Only one chunk of images
    is held at a time; a row keeps the stamped image's checksum, not its pixels.
    """

    def stamp(image_id: int) -> tuple[np.ndarray, list[int] | None]:
        clean = load_fn(image_id)
        stamped = surrogate_image(clean, image_id, seed)
        return stamped, changed_box(clean, stamped)

    return score_pool_rows(
        ids, stamp, caption_fn, reference_fn, score_fn, chunk_size, progress, "D1 pool"
    )


def score_pool_rows(
    ids: Sequence[int],
    image_fn: Callable[[int], tuple[np.ndarray, list[int] | None]],
    caption_fn: CaptionFn,
    reference_fn: CaptionFn,
    score_fn: ScoreFn,
    chunk_size: int,
    progress: bool,
    desc: str,
) -> list[PoolRow]:
    """One :class:`PoolRow` per id, in chunks: ``image_fn(id) -> (pool image, surrogate box or
    None)``; both captioners see the pool image, ``score_fn`` scores their captions."""
    if chunk_size < 1:
        raise SRDError(f"--caption_batch_size {chunk_size}: must be at least 1")
    rows: list[PoolRow] = []
    starts = range(0, len(ids), chunk_size)
    for start in tqdm(starts, desc=desc, unit="chunk", disable=not progress):
        chunk = [int(i) for i in ids[start : start + chunk_size]]
        images, boxes = zip(*(image_fn(i) for i in chunk), strict=True)
        vlm = list(caption_fn(list(images)))
        refs = list(reference_fn(list(images)))
        if len(vlm) != len(chunk) or len(refs) != len(chunk):
            raise ValueError(f"{len(vlm)}/{len(refs)} captions for {len(chunk)} images")
        sem, flu = score_fn(vlm, refs)
        for k, image_id in enumerate(chunk):
            rows.append(
                PoolRow(
                    image_id=image_id,
                    checksum=image_checksum(images[k]),
                    vlm_caption=vlm[k],
                    reference=refs[k],
                    base_sem=float(sem[k]),
                    base_flu=float(flu[k]),
                    surrogate_box=boxes[k],
                )
            )
    return rows


# --------------------------------------------------------------------------------------------
# Writing: one shard per process, then the manifest


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def shard_file(shard_id: int, num_shards: int) -> str:
    """File name of one D1 shard: ``pool-00001-of-00004.json``."""
    return f"pool-{shard_id:05d}-of-{num_shards:05d}.json"


def shard_paths(folder: str | os.PathLike) -> list[Path]:
    """The shard files present in a pool folder, by name."""
    return sorted(p for p in Path(folder).glob("pool-*.json") if _SHARD_RE.match(p.name))


def pool_files(folder: str | os.PathLike) -> list[Path]:
    """Every file of a pool folder, the "finished" signals first (the order to delete them)."""
    folder = Path(folder)
    return [folder / DONE_MARKER, folder / POOL_JSON, folder / LEGACY_IMAGES, *shard_paths(folder)]


def write_pool_shard(
    folder: str | os.PathLike,
    shard_id: int,
    num_shards: int,
    rows: Sequence[PoolRow],
    config_hash: str,
    source: str,
) -> Path:
    """Write one process's shard atomically (entries sorted by id); returns its path.

    A shard may be empty (more processes than pool images). ``config_hash`` identifies the D1
    run (:func:`srd.defenses.srd.shards.config_hash` of its resolved config): the manifest and D2
    refuse
    shards of another run.
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard {shard_id} outside [0, {num_shards})")
    rows = sorted(rows, key=lambda r: r.image_id)
    ids = [int(r.image_id) for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("pool rows must have unique image ids")
    shard: dict[str, Any] = {
        "format": SHARD_FORMAT,
        "shard_id": shard_id,
        "num_shards": num_shards,
        "config_hash": config_hash,
        "source": source,
        "num_images": len(rows),
        "ids": ids,
        "base_sem": [_json_float(r.base_sem) for r in rows],
        "base_flu": [_json_float(r.base_flu) for r in rows],
        "references": [r.reference for r in rows],
        "vlm_captions": [r.vlm_caption for r in rows],
        "checksums": [int(r.checksum) for r in rows],
    }
    if source == "surrogate":
        shard["surrogate_boxes"] = [r.surrogate_box for r in rows]
    path = ensure_dir(folder, "--save_data_path") / shard_file(shard_id, num_shards)
    write_json(path, shard)
    return path


def finish_pool(
    folder: str | os.PathLike,
    num_shards: int,
    config_hash: str,
    source: str,
    seed: int | None = None,
    data: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    expected_ids: Sequence[int] | None = None,
) -> Path:
    """Check every shard of the run and write the manifest, then ``DONE`` (main process only).

    ``source`` is ``surrogate`` (``seed``: the surrogate trigger's seed, recorded with
    :data:`SURROGATE_CONFIG`) or ``data`` (no surrogate block). ``data`` holds the data flags
    D2 re-derives the images from; ``expected_ids`` (when given) must each be in exactly one
    shard.
    """
    folder = Path(folder)
    manifest: dict[str, Any] = {
        "format": POOL_FORMAT,
        "source": source,
        "num_shards": num_shards,
        "config_hash": config_hash,
    }
    entries = read_pool_entries(folder, manifest)
    if not entries["ids"]:
        raise SRDError(f"--save_data_path {folder}: refusing to write an empty pool")
    if expected_ids is not None and sorted(int(i) for i in expected_ids) != entries["ids"]:
        raise SRDError(f"--save_data_path {folder}: the shards do not hold the chosen pool ids")
    manifest["num_images"] = len(entries["ids"])
    manifest["shards"] = [
        {"file": shard_file(k, num_shards), "num_images": n}
        for k, n in enumerate(entries["counts"])
    ]
    if source == "surrogate":
        if seed is None:
            raise ValueError("a surrogate pool needs the seed of its trigger")
        manifest["surrogate"] = {**SURROGATE_CONFIG, "seed": int(seed)}
    manifest["data"] = dict(data or {})
    manifest["meta"] = dict(meta or {})
    write_json(folder / POOL_JSON, manifest)
    mark_finished(folder)
    log.info("wrote a pool of %d images in %d shard(s) to %s", len(entries["ids"]), num_shards,
             folder)  # fmt: skip
    return folder


def save_pool(
    folder: str | os.PathLike,
    rows: Sequence[PoolRow],
    meta: Mapping[str, Any] | None = None,
    source: str = "surrogate",
    seed: int | None = 0,
    data: Mapping[str, Any] | None = None,
    config_hash: str = "",
) -> Path:
    """One process's whole pool: old files removed (marker first), one shard, the manifest."""
    if not rows:
        raise SRDError(f"{folder}: refusing to write an empty pool")
    folder = ensure_dir(folder, "--save_data_path")
    for path in pool_files(folder):
        path.unlink(missing_ok=True)
    write_pool_shard(folder, 0, 1, rows, config_hash, source)
    return finish_pool(folder, 1, config_hash, source, seed, data, meta)


# --------------------------------------------------------------------------------------------
# Reading: the manifest, the shards, and the images on demand


def read_pool_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest (``pool.json``) of a finished pool; SRDError naming the file otherwise."""
    folder = Path(folder)
    path = folder / POOL_JSON
    if not folder.is_dir():
        raise SRDError(f"--save_data_path {folder}: pool folder not found (run stage D1 first)")
    if not is_finished(folder):
        raise SRDError(f"--save_data_path {folder}: pool is unfinished (no {DONE_MARKER} marker)")
    info = read_json(path, flag="--save_data_path")
    if not isinstance(info, dict) or info.get("format") != POOL_FORMAT:
        got = info.get("format") if isinstance(info, dict) else None
        raise SRDError(
            f"--save_data_path {path}: not a mask pool of format {POOL_FORMAT!r} (got {got!r}; "
            "rebuild it with stage D1 --overwrite)"
        )
    for key, kind in (("num_shards", int), ("shards", list), ("num_images", int)):
        if not isinstance(info.get(key), kind):
            raise SRDError(f"--save_data_path {path}: '{key}' missing or not a {kind.__name__}")
    shards = info["shards"]
    if len(shards) != info["num_shards"] or not all(isinstance(e, dict) for e in shards):
        raise SRDError(f"--save_data_path {path}: 'shards' does not list {info['num_shards']} "
                       "shards")  # fmt: skip
    return info


_COLUMNS = ("base_sem", "base_flu", "references", "vlm_captions", "checksums")


def baseline_scores(entries: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The pool's baseline S_sem and S_flu (float arrays in id order; NaN where a baseline
    caption was empty and stored as None)."""
    sem, flu = (
        np.array([np.nan if v is None else float(v) for v in entries[k]], dtype=np.float64)
        for k in ("base_sem", "base_flu")
    )
    return sem, flu


def read_pool_entries(folder: str | os.PathLike, info: Mapping[str, Any]) -> dict[str, Any]:
    """Every shard of a pool joined in id order: ``{"ids", "counts", *columns}``.

    Refuses (SRDError naming the folder or shard) a missing, stray, unreadable or partial
    shard, a shard of another run (config hash), shard counts that differ from the manifest's,
    and an id in two shards.
    """
    folder = Path(folder)
    where = f"--save_data_path {folder}"
    num_shards = int(info["num_shards"])
    names = [shard_file(k, num_shards) for k in range(num_shards)]
    stray = [p.name for p in shard_paths(folder) if p.name not in names]
    if stray:
        raise SRDError(f"{where}: {stray[0]} is not one of this pool's {num_shards} shard(s)")
    listed = info.get("shards")
    out: dict[str, Any] = {"ids": [], "counts": [], **{c: [] for c in _COLUMNS}}
    boxes: list[Any] = []
    for k, name in enumerate(names):
        path = folder / name
        if not path.is_file():
            raise SRDError(f"{where}: shard {name} missing ({num_shards} shard(s) expected)")
        shard = read_json(path, flag="--save_data_path")
        if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT:
            raise SRDError(f"--save_data_path {path}: not a pool shard ({SHARD_FORMAT!r})")
        for key in ("shard_id", "num_shards", "config_hash", "source"):
            expected = k if key == "shard_id" else info[key]
            if shard.get(key) != expected:
                raise SRDError(
                    f"--save_data_path {path}: {key} {shard.get(key)!r}, the pool has "
                    f"{expected!r} (a shard of another D1 run; rebuild the pool)"
                )
        ids = shard.get("ids")
        n = len(ids) if isinstance(ids, list) else -1
        columns = (*_COLUMNS, "surrogate_boxes") if info["source"] == "surrogate" else _COLUMNS
        for key in columns:
            values = shard.get(key)
            if n < 0 or not isinstance(values, list) or len(values) != n:
                got = len(values) if isinstance(values, list) else type(values).__name__
                raise SRDError(f"--save_data_path {path}: '{key}' has {got} entries for {n} ids")
        if listed is not None and listed[k].get("num_images") != n:
            raise SRDError(
                f"--save_data_path {path}: holds {n} entries, {POOL_JSON} lists "
                f"{listed[k].get('num_images')}"
            )
        out["ids"] += [int(i) for i in ids]
        out["counts"].append(n)
        for key in _COLUMNS:
            out[key] += shard[key]
        boxes += shard.get("surrogate_boxes", [])
    order = np.argsort(out["ids"], kind="stable")
    for key in ("ids", *_COLUMNS):
        out[key] = [out[key][i] for i in order]
    if boxes:
        out["surrogate_boxes"] = [boxes[i] for i in order]
    if len(set(out["ids"])) != len(out["ids"]):
        dup = next(i for a, i in zip(out["ids"], out["ids"][1:], strict=False) if a == i)
        raise SRDError(f"{where}: image id {dup} is in two shards")
    if "num_images" in info and info["num_images"] != len(out["ids"]):
        raise SRDError(f"{where}: the shards hold {len(out['ids'])} entries, {POOL_JSON} lists "
                       f"{info['num_images']}")  # fmt: skip
    return out


class StreamedPool:
    """The RL pool as D2 reads it: every entry's id, baselines and reference caption in memory,
    its image re-derived on demand by ``image_fn(image_id)`` (whose cache bounds the memory)
    and checked against the checksum D1 recorded. ``info`` is the pool's manifest.

    The interface :class:`srd.defenses.srd.env.RedMaskEnv` uses, as
    :class:`srd.defenses.srd.env.MaskPool`'s:
    ``len(pool)``, ``pool[i] -> PoolRecord``, ``ids``, ``base_sem``, ``base_flu``,
    ``references``; entries in image-id order.
    """

    def __init__(
        self,
        entries: Mapping[str, Any],
        image_fn: Callable[[int], np.ndarray],
        info: Mapping[str, Any] | None = None,
        source: str = "mask pool",
    ) -> None:
        self.image_ids = [int(i) for i in entries["ids"]]
        self.ids = [str(i) for i in self.image_ids]
        self.base_sem, self.base_flu = baseline_scores(entries)
        self.references = [str(r) for r in entries["references"]]
        self.vlm_captions = [str(c) for c in entries["vlm_captions"]]
        self.checksums = [int(c) for c in entries["checksums"]]
        self.surrogate_boxes = entries.get("surrogate_boxes")
        self.image_fn = image_fn
        self.info = dict(info or {})  # the manifest: source, data flags, run record (meta)
        self.source = source
        if not self.ids:
            raise SRDError(f"{source}: the pool is empty")

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, index: int) -> np.ndarray:
        """The pool image of entry ``index``: uint8 (224, 224, 3), re-derived and checked."""
        image_id = self.image_ids[index]
        image = self.image_fn(image_id)
        if image_checksum(image) != self.checksums[index]:
            raise SRDError(
                f"{self.source}: the image of id {image_id} differs from the one stage D1 scored "
                "(image file, data flags or poison plan changed since; rebuild the pool)"
            )
        return image

    def __getitem__(self, index: int) -> PoolRecord:
        return PoolRecord(
            id=self.ids[index],
            image=self.image(index),
            base_sem=float(self.base_sem[index]),
            base_flu=float(self.base_flu[index]),
            reference=self.references[index],
        )


def load_pool(folder: str | os.PathLike, image_fn: Callable[[int], np.ndarray]) -> StreamedPool:
    """A finished pool folder as a :class:`StreamedPool` (no image is read here).

    ``image_fn(image_id)`` re-derives a pool image (see
    :func:`srd.defenses.srd.pool_source.pool_image_fn`). SRDError naming the folder or file for a
    missing or unfinished pool and a missing, partial or mismatched set of shards.
    """
    folder = Path(folder)
    info = read_pool_info(folder)
    return StreamedPool(read_pool_entries(folder, info), image_fn, info, str(folder))
