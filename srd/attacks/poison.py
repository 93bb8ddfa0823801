"""Which training captions are poisoned: a seeded draw of caption ids, saved once and read back.

Poisoning is per caption id (reference §2.2): ``int(N * rate)`` ids drawn without replacement
with ``random.sample`` from the candidate ids. The draw is written to the run folder as JSON and
later stages load that file rather than drawing again.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import Any

from srd.errors import SRDError
from srd.io import read_json, write_json

log = logging.getLogger(__name__)

FORMAT = "srd-poison-ids/1"
"""Value of the ``format`` key of a poison-ids file."""


def check_rate(rate: float, flag: str = "--poison_rate") -> float:
    """Return ``rate`` as a float in (0, 1]; SRDError naming ``flag`` otherwise."""
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise SRDError(f"{flag} {rate!r}: not a number") from None
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise SRDError(f"{flag} {rate}: must be in (0, 1]")
    return value


def select_poison_ids(candidate_caption_ids: Sequence[int], rate: float, seed: int) -> list[int]:
    """Draw ``int(N * rate)`` of the N candidate ids with ``random.Random(seed).sample``, sorted.

    The candidates are sorted first, so the result does not depend on their order.
    """
    rate = check_rate(rate)
    ids = sorted(candidate_caption_ids)
    if not ids:
        raise SRDError("no candidate captions to poison (empty candidate list)")
    if len(set(ids)) != len(ids):
        raise SRDError("candidate caption ids contain duplicates")
    count = int(len(ids) * rate)
    if count == 0:
        log.warning("poison rate %g of %d candidates selects no caption", rate, len(ids))
    return sorted(random.Random(seed).sample(ids, count))


def save_poison_ids(path: str | os.PathLike, ids: Sequence[int], meta: dict[str, Any]) -> None:
    """Write ``{"format", "count", "ids", "meta"}`` as JSON, atomically."""
    write_json(
        path, {"format": FORMAT, "count": len(ids), "ids": [int(i) for i in ids], "meta": meta}
    )


def load_poison_ids(path: str | os.PathLike) -> tuple[list[int], dict[str, Any]]:
    """Read a file written by :func:`save_poison_ids`; SRDError naming it if missing or invalid."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SRDError(f"{path}: not a poison-ids file (expected format {FORMAT!r})")
    ids, meta = data.get("ids"), data.get("meta", {})
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise SRDError(f"{path}: 'ids' must be a list of integer caption ids")
    if data.get("count") != len(ids):
        raise SRDError(f"{path}: 'count' {data.get('count')} does not match {len(ids)} ids")
    if not isinstance(meta, dict):
        raise SRDError(f"{path}: 'meta' must be a JSON object")
    return ids, meta
