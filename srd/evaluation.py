"""Captioning many images, split over processes and gathered by image id.

Every process captions ``ids[rank::world_size]`` (no padding, so no duplicates), then the
per-process dicts are gathered and merged by id. All prompts have the same length, so a
caption does not depend on which other images share its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm import tqdm

from srd.model import Captioner

log = logging.getLogger(__name__)


def caption_ids(
    captioner: Captioner,
    ids: Sequence[int],
    load_fn: Callable[[int], np.ndarray],
    batch_size: int = 32,
    num_beams: int = 3,
    max_new_tokens: int = 20,
    desc: str = "captioning",
) -> dict[int, str]:
    """Caption the images ``load_fn(id)`` for every id; returns {id: caption} on every process."""
    state = PartialState()
    mine = list(ids)[state.process_index :: state.num_processes]
    out: dict[int, str] = {}
    bar = tqdm(total=len(mine), desc=desc, disable=not state.is_main_process)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        texts = captioner.caption(
            [load_fn(i) for i in chunk],
            batch_size=batch_size,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
        )
        out.update(zip(chunk, texts, strict=True))
        bar.update(len(chunk))
    bar.close()
    if state.num_processes > 1:
        merged: dict[int, str] = {}
        for part in gather_object([out]):
            merged.update(part)
        out = merged
    missing = set(ids) - set(out)
    if missing:
        raise RuntimeError(f"captioning lost {len(missing)} ids (e.g. {min(missing)})")
    return {i: out[i] for i in ids}
