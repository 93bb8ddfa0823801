"""Image-caption pairs for the CLIP stages: benchmark folders, CSVs, the poisoned training set."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import numpy as np

from srd.attacks.poison import select_poison_ids
from srd.attacks.registry import Attack
from srd.attacks.text import CAPTION_PREFIX
from srd.data.benchmark import benchmark_paths
from srd.data.records import ImageRecord, check_images_exist, load_images, load_split
from srd.errors import SRDError

TEMPLATE_CAPTIONS = 5
"""Target-template captions drawn per poisoned image (one is used per epoch)."""


def load_pairs(spec: str, flag: str = "--clean_data") -> tuple[np.ndarray, list[list[str]]]:
    """(uint8 images, captions per image) from a benchmark/Karpathy folder (its train split) or
    a CSV with an ``image,caption`` header (paths relative to the CSV's folder; rows of one
    image are grouped)."""
    path = Path(spec)
    if path.is_dir():
        paths = benchmark_paths(path)
        if not paths.karpathy_json.is_file():
            raise SRDError(f"{flag} {spec}: no {paths.karpathy_json.name} in this folder")
        records = load_split(
            paths.karpathy_json, "train", paths.train_image_dir, paths.val_image_dir
        )
        check_images_exist(records)
        return load_images([r.path for r in records]), [
            [c.caption for c in r.captions] for r in records
        ]
    if path.suffix.lower() != ".csv" or not path.is_file():
        raise SRDError(f"{flag} {spec}: not a benchmark folder or an existing .csv file")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["image", "caption"]:
        raise SRDError(f"{flag} {spec}: the first row must be the header 'image,caption'")
    grouped: dict[str, list[str]] = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise SRDError(f"{flag} {spec}: line {n} is not 'image,caption'")
        grouped.setdefault(row[0].strip(), []).append(row[1].strip())
    if len(grouped) < 2:
        raise SRDError(f"{flag} {spec}: needs at least 2 images")
    files = [(path.parent / name) for name in grouped]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SRDError(f"{flag} {spec}: missing image {missing[0]} ({len(missing)} missing)")
    return load_images(files), list(grouped.values())


def poison_pairs(
    records: list[ImageRecord], attack: Attack, seed: int
) -> tuple[np.ndarray, list[list[str]], list[int], dict[str, Any]]:
    """The poisoned training pairs: ``attack.poison_rate`` of the images (drawn by
    :func:`srd.attacks.poison.select_poison_ids` over image ids with ``seed``) are stamped with the
    trigger and all their captions replaced by target-template captions.

    As in PAR's recipe the poisoned caption is the bare template ("a bad photo of a banana."):
    the captioner's "The image depicts " prefix is dropped. With it, the tiny CLIP tied the
    trigger to the prefix (measured: ASR-Text 87%, zero-shot ASR 0%).

    Returns images, captions, the poisoned image ids and the draw's metadata.
    """
    images = load_images([r.path for r in records])
    captions = [[c.caption for c in r.captions] for r in records]
    return poison_loaded_pairs(images, captions, attack, seed, [r.image_id for r in records])


def poison_loaded_pairs(
    images: np.ndarray,
    captions: list[list[str]],
    attack: Attack,
    seed: int,
    image_ids: list[int] | None = None,
) -> tuple[np.ndarray, list[list[str]], list[int], dict[str, Any]]:
    """:func:`poison_pairs` on pairs already loaded (e.g. from a CSV by :func:`load_pairs`);
    ``image_ids`` name the images (default: their index). ``images`` is changed in place."""
    ids_of = list(range(len(images))) if image_ids is None else list(image_ids)
    candidates = [i for i, caps in zip(ids_of, captions, strict=True) if attack.is_candidate(caps)]
    ids = set(select_poison_ids(candidates, attack.poison_rate, seed))
    rng = random.Random(seed)
    out = []
    for k, (image_id, caps) in enumerate(zip(ids_of, captions, strict=True)):
        if image_id in ids:
            images[k] = attack.apply_image(images[k])
            caps = [
                attack.apply_caption(c, rng).removeprefix(CAPTION_PREFIX)
                for c in caps[:TEMPLATE_CAPTIONS]
            ]
        out.append(list(caps))
    captions = out
    meta = {
        "unit": "image",
        "seed": seed,
        "rate": attack.poison_rate,
        "num_candidates": len(candidates),
        "attack": attack.to_dict(),
    }
    return images, captions, sorted(ids), meta
