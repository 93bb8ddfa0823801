"""SRD's RL-pool variants (stage D1): where the agent's training images come from.

* ``surrogate`` (the reference, :func:`srd.defenses.srd.pool.build_pool_rows`): clean training
  images stamped with the seeded noise-patch surrogate trigger.
* ``data``: the defender's own training images as its data holds them (triggered when a caption
  of the image is poisoned), no surrogate. Still trigger-agnostic: the defender does not know
  which images carry a trigger, but the real trigger may fire on the pool, so the reward can
  see what a square over it does to the caption.

Both give :class:`srd.defenses.srd.pool.PoolRow` rows for
:func:`srd.defenses.srd.pool.write_pool_shard` (a ``data`` pool's rows have no surrogate box, and
its manifest no surrogate block; ``source`` records which it is). :func:`pool_image_fn`
re-derives either kind's images for stage D2.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from srd.attacks.trainset import PoisonPlan, TrainingImages, plan_attack
from srd.data.records import DataArgs, ImageStore, check_images_exist
from srd.defenses.srd.pool import (
    POOL_JSON,
    CaptionFn,
    PoolRow,
    ScoreFn,
    StreamedPool,
    read_pool_entries,
    read_pool_info,
    score_pool_rows,
    surrogate_image,
)
from srd.errors import SRDError
from srd.io import file_digest, require_files

POOL_SOURCES = ("surrogate", "data")


def data_pool_rows(
    ids: Sequence[int],
    version_fn: Callable[[int], np.ndarray],
    caption_fn: CaptionFn,
    reference_fn: CaptionFn,
    score_fn: ScoreFn,
    chunk_size: int = 64,
    progress: bool = True,
) -> list[PoolRow]:
    """Caption (backdoored VLM and clean reference) and score the defender's images of ``ids``
    (``version_fn(id)``: the image as the defender's data holds it), in chunks."""
    return score_pool_rows(
        ids,
        lambda i: (version_fn(i), None),
        caption_fn,
        reference_fn,
        score_fn,
        chunk_size,
        progress,
        "D1 pool (data)",
    )


def stream_pool(folder: str | os.PathLike, cache_mb: float) -> StreamedPool:
    """Stage D2's view of a finished pool folder: entries read from its shards, images
    re-derived on demand (:func:`pool_image_fn`) with decoded training images cached up to
    ``cache_mb`` MiB."""
    info = read_pool_info(folder)
    entries = read_pool_entries(folder, info)
    image_fn = pool_image_fn(folder, info, entries["ids"], cache_mb)
    return StreamedPool(entries, image_fn, info, str(folder))


def pool_image_fn(
    folder: str | os.PathLike, info: Mapping[str, Any], ids: Sequence[int], cache_mb: float
) -> Callable[[int], np.ndarray]:
    """``image(id)``: a pool image as stage D1 made it, from the training image file (the data
    flags recorded in the manifest ``info``) and the seed (``surrogate``) or the recorded poison
    plan (``data``). Decoded training images are cached up to ``cache_mb`` MiB.

    SRDError naming the file for a data set or poison plan that is gone or changed.
    """
    where = f"--save_data_path {Path(folder) / POOL_JSON}"
    recorded = info.get("data") or {}
    names = [f.name for f in dataclasses.fields(DataArgs) if f.name != "image_cache_mb"]
    if not isinstance(recorded, dict) or any(n not in recorded for n in names):
        raise SRDError(f"{where}: records no data flags to re-derive the images from (rebuild it)")
    data = DataArgs(**{n: recorded[n] for n in names}, image_cache_mb=cache_mb)
    wanted = {int(i) for i in ids}
    records = [r for r in data.split("train") if r.image_id in wanted]
    missing = sorted(wanted - {r.image_id for r in records})
    if missing:
        raise SRDError(
            f"--coco_karpathy_json_path {data.coco_karpathy_json_path}: pool image id "
            f"{missing[0]} is not in its training split ({len(missing)} missing)"
        )
    check_images_exist(records)
    if info["source"] == "surrogate":
        store, seed = ImageStore(records, cache_mb), int(info["surrogate"]["seed"])
        return lambda image_id: surrogate_image(store(image_id), image_id, seed)
    path = info["meta"].get("poison_ids_path")
    require_files(("--poison_ids_path", path))
    if file_digest(path) != info["meta"].get("poison_ids_sha256"):
        raise SRDError(f"--poison_ids_path {path}: changed since stage D1 built the pool")
    plan = PoisonPlan.load(path)
    return TrainingImages(
        records, plan_attack(plan, path), plan.ids, cache_mb=cache_mb
    ).as_in_training_set
