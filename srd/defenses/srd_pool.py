"""SRD's RL-pool variants (stage D1): where the agent's training images come from.

* ``surrogate`` (the reference, :func:`srd.pool.build_pool_rows`): clean training images stamped
  with the seeded noise-patch surrogate trigger.
* ``data``: the defender's own training images as its data holds them (triggered when a caption
  of the image is poisoned), no surrogate. Still trigger-agnostic: the defender does not know
  which images carry a trigger, but the real trigger may fire on the pool, so the reward can
  see what a square over it does to the caption.

Both give :class:`srd.pool.PoolRow` rows for :func:`srd.pool.save_pool` (a ``data`` pool's rows
have no surrogate box; ``pool.json``'s meta records ``pool_source``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from srd.errors import SRDError
from srd.pool import CaptionFn, PoolRow, ScoreFn

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
    if chunk_size < 1:
        raise SRDError(f"--caption_batch_size {chunk_size}: must be at least 1")
    rows: list[PoolRow] = []
    starts = range(0, len(ids), chunk_size)
    for start in tqdm(starts, desc="D1 pool (data)", unit="chunk", disable=not progress):
        chunk = [int(i) for i in ids[start : start + chunk_size]]
        images = [version_fn(i) for i in chunk]
        vlm = list(caption_fn(images))
        refs = list(reference_fn(images))
        if len(vlm) != len(chunk) or len(refs) != len(chunk):
            raise ValueError(f"{len(vlm)}/{len(refs)} captions for {len(chunk)} images")
        sem, flu = score_fn(vlm, refs)
        rows += [
            PoolRow(i, images[k], vlm[k], refs[k], float(sem[k]), float(flu[k]), None)
            for k, i in enumerate(chunk)
        ]
    return rows
