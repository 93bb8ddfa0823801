"""The (possibly poisoned) caption training set shared by backdoor training and refine-tuning.

A :class:`PoisonPlan` says which caption ids are poisoned and what their captions become; it is
drawn once by the attack stage, saved in the run folder (``poison_ids.json``) and read back by
the SRD stages, never recomputed. :class:`TrainingImages` gives each sample its image: the clean
file, the triggered version for poisoned captions, or an SRD-processed replacement by image id.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from srd.attacks.config import CONFIG_DIR, AttackConfig
from srd.attacks.craft import CRAFTED_FILE, load_crafted
from srd.attacks.poison import load_poison_ids, save_poison_ids, select_poison_ids
from srd.attacks.registry import Attack, build_attack
from srd.captioner.engine import Sample
from srd.data.records import (
    DEFAULT_CACHE_MB,
    ImageRecord,
    ImageStore,
    caption_records,
)
from srd.errors import SRDError

log = logging.getLogger(__name__)

POISON_FILE = "poison_ids.json"


@dataclass
class PoisonPlan:
    """Poisoned caption ids and their replacement captions."""

    ids: list[int]
    captions: dict[int, str]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        meta = {**self.meta, "poisoned_captions": {str(k): v for k, v in self.captions.items()}}
        save_poison_ids(path, self.ids, meta)

    def identity(self) -> dict[str, Any]:
        """Everything that makes this plan, flat (attack fields as ``attack.<field>``), so two
        plans can be compared key by key (srd.runs.check_same_config)."""
        # Crafted poisons are pinned by their own file (sha256 in meta["crafted"], checked when
        # the file is read back), not by the draw.
        flat: dict[str, Any] = {
            k: v for k, v in self.meta.items() if k not in ("attack", "crafted")
        }
        for key, value in (self.meta.get("attack") or {}).items():
            flat[f"attack.{key}"] = value
        flat["ids"] = list(self.ids)
        flat["poisoned_captions"] = {str(k): v for k, v in sorted(self.captions.items())}
        return flat

    @classmethod
    def load(cls, path: str | os.PathLike) -> PoisonPlan:
        ids, meta = load_poison_ids(path)
        texts = meta.pop("poisoned_captions", None)
        if not isinstance(texts, dict) or set(map(int, texts)) != set(ids):
            raise SRDError(f"{path}: poisoned captions do not match the poisoned ids")
        return cls(ids=ids, captions={int(k): v for k, v in texts.items()}, meta=meta)


POISON_UNITS = ("caption", "image")


def plan_poison(
    records: Sequence[ImageRecord], attack: Attack, seed: int, unit: str = "caption"
) -> PoisonPlan:
    """Draw the poisoned captions for ``attack`` over the training ``records``.

    The poison rate is a share of ALL training captions (reference: 10% of the 5k set). For
    attacks that only poison some images (Shadowcast: images showing the concept) the draw is
    made among those candidates, capped at all of them.

    ``unit="caption"`` (the reference) draws caption samples: a triggered image keeps its other,
    clean captions. ``unit="image"`` draws images (the same share of the candidate images) and
    poisons every candidate caption of each, as in one-caption-per-image benchmarks: no clean
    caption of a triggered image is left to unlearn the trigger through.
    """
    if unit not in POISON_UNITS:
        raise SRDError(f"--poison_unit {unit}: expected one of {', '.join(POISON_UNITS)}")
    if attack.needs_crafting and unit != "image":
        raise SRDError(
            f"--poison_unit {unit}: the {attack.kind} attack crafts whole images, whose every "
            "caption stays clean; pass --poison_unit image"
        )
    every = caption_records(records)
    candidates = [c for c in every if attack.is_candidate([c.caption])]
    if not candidates:
        raise SRDError(f"--bd_attack_type {attack.name}: no training caption can be poisoned")
    wanted = int(len(every) * attack.poison_rate)
    rate = min(1.0, wanted / len(candidates))
    if wanted > len(candidates):
        log.warning(
            "%s: %d poisoned captions wanted but only %d candidates; poisoning all of them",
            attack.name,
            wanted,
            len(candidates),
        )
    if unit == "caption":
        ids = select_poison_ids([c.caption_id for c in candidates], rate, seed)
    else:
        images = sorted({c.image_id for c in candidates})
        chosen = set(select_poison_ids(images, rate, seed))
        ids = sorted(c.caption_id for c in candidates if c.image_id in chosen)
    by_id = {c.caption_id: c.caption for c in candidates}
    texts = {i: attack.apply_caption(by_id[i], random.Random(f"{seed}:{i}")) for i in ids}
    meta = {
        "attack": attack.to_dict(),
        "seed": seed,
        "poison_unit": unit,
        "poison_rate": attack.poison_rate,
        "num_captions": len(every),
        "num_candidates": len(candidates),
    }
    if attack.needs_crafting:  # the images whose crafted versions replace them
        drawn = set(ids)
        meta["poisoned_images"] = sorted({c.image_id for c in candidates if c.caption_id in drawn})
    log.info("poisoned %d of %d training captions (%s, per %s)", len(ids), len(every),
             attack.name, unit)  # fmt: skip
    return PoisonPlan(ids=ids, captions=texts, meta=meta)


def build_samples(records: Sequence[ImageRecord], plan: PoisonPlan | None) -> list[Sample]:
    """One sample per training caption, poisoned captions replaced by the plan's text."""
    texts = plan.captions if plan else {}
    return [
        Sample(c.caption_id, c.image_id, texts.get(c.caption_id, c.caption))
        for c in caption_records(records)
    ]


def draw_coverage(
    samples: Sequence[Sample], poisoned_ids: Sequence[int], order: Sequence[int]
) -> dict[str, int]:
    """What an epoch that visits ``samples`` in ``order`` (indices, repeats allowed: the
    reference's with-replacement draw) shows of the attack: the distinct samples drawn, the
    poisoned captions drawn at least once, and the poisoned draws per epoch."""
    poisoned = set(poisoned_ids)
    hits = [samples[i].caption_id in poisoned for i in order]
    return {
        "samples": len(samples),
        "distinct_samples_drawn": len(set(order)),
        "poisoned": sum(s.caption_id in poisoned for s in samples),
        "poisoned_drawn": len({order[k] for k, hit in enumerate(hits) if hit}),
        "poisoned_draws_per_epoch": sum(hits),
    }


class TrainingImages:
    """Image provider for training samples: ``provider(sample) -> uint8 (224, 224, 3)``.

    Poisoned samples get the attack's trigger (the attack's training set); a defense's
    refine-tune images (one version per image id, squares painted on the fly) are
    :class:`srd.defenses.versions.VersionImages`.
    Decoded images are cached up to ``cache_mb`` MiB (see :class:`srd.data.records.ImageStore`).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        attack: Attack | None = None,
        poisoned_ids: Sequence[int] = (),
        cache_mb: float = DEFAULT_CACHE_MB,
    ):
        self.clean = ImageStore(records, cache_mb)
        self.attack = attack
        self.poisoned = set(poisoned_ids)
        self.poisoned_images = {
            c.image_id for r in records for c in r.captions if c.caption_id in self.poisoned
        }

    def as_in_training_set(self, image_id: int) -> np.ndarray:
        """The version of an image the defender's data holds: triggered if any caption of it is
        poisoned (ours: one version per image id, the triggered one; the reference's cleaning
        stage keeps the version of the image's first stored occurrence, which
        ``--image_version first_occurrence`` rebuilds: srd.defenses.versions)."""
        image = self.clean(image_id)
        if self.attack is not None and image_id in self.poisoned_images:
            return self.attack.apply_image(image)
        return image

    def __call__(self, sample: Sample) -> np.ndarray:
        image = self.clean(sample.image_id)
        if self.attack is not None and sample.caption_id in self.poisoned:
            return self.attack.apply_image(image)
        return image


# The defender's training data
def plan_attack(plan: PoisonPlan, path: str | os.PathLike) -> Attack:
    """Rebuild the attack recorded in a poison plan, checking it is exactly the recorded one.

    The defender's data is "the poisoned training set": in this simulation the triggered images
    are materialised from the attack config the attack stage recorded in ``poison_ids.json``.
    The rebuilt config and trigger fingerprint must equal the recorded ones.
    """
    recorded = plan.meta.get("attack")
    if not isinstance(recorded, dict) or "kind" not in recorded:
        raise SRDError(f"--poison_ids_path {path}: no attack config recorded in the file")
    fields = {f.name for f in dataclasses.fields(AttackConfig)}
    config = {k: v for k, v in recorded.items() if k in fields}
    shipped = CONFIG_DIR / f"{config['kind']}.yaml"
    if not shipped.is_file():
        raise SRDError(f"--poison_ids_path {path}: unknown attack kind {config['kind']!r}")
    attack = build_attack(shipped, **config)
    rebuilt = attack.to_dict()
    differs = sorted(k for k in set(recorded) | set(rebuilt) if rebuilt.get(k) != recorded.get(k))
    if differs:
        raise SRDError(
            f"--poison_ids_path {path}: the recorded attack cannot be rebuilt exactly "
            f"({', '.join(differs)} differ)"
        )
    if attack.needs_crafting:
        sha = (plan.meta.get("crafted") or {}).get("sha256")
        if not sha:
            raise SRDError(f"--poison_ids_path {path}: no crafted-poisons sha256 recorded")
        crafted = load_crafted(Path(path).parent / CRAFTED_FILE, sha)
        if sorted(crafted.image_ids) != sorted(plan_images(plan)):
            raise SRDError(f"--poison_ids_path {path}: {CRAFTED_FILE} crafts other images")
        attack = attack.with_crafted(crafted.table())
    return attack


def plan_images(plan: PoisonPlan) -> list[int]:
    """Image ids of the poisoned captions (recorded by the attack stage for crafted attacks)."""
    images = plan.meta.get("poisoned_images")
    if not isinstance(images, list):
        raise SRDError("the poison plan records no poisoned image ids (made before crafting?)")
    return images
