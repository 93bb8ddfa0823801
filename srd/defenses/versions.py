"""Which version of each training image a refine-tune defense trains on, and the one painter
of its squares (:class:`VersionImages`, SRD's D4 and every baseline alike).

The defender's data holds, per caption, the clean image or (for a poisoned caption) the
triggered one. Refine-tune defenses train one image per image id (reference §11, B15), so an
image with a poisoned caption needs one version:

* ``triggered`` (ours): always the triggered version, so the triggered image is
  retrained with its ~4 clean captions;
* ``first_occurrence`` (the reference): the version of the image's first stored occurrence.
  The reference keeps the first entry of its with-replacement draw; here the draw is a seeded
  permutation of the caption ids (each caption of an image equally likely to come first, as
  under the reference's draw, and every image covered). It is triggered only when that first
  caption is a poisoned one (~1 time in 5 with 5 captions and one poisoned).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from srd.captioner.engine import Sample
from srd.data.records import ImageStore, caption_records
from srd.defenses.registry import IMAGE_VERSIONS, DefenderData
from srd.errors import SRDError
from srd.geometry import RED, apply_action


def first_occurrences(data: DefenderData, seed: int) -> dict[int, int]:
    """{image id: caption id of its first occurrence in a seeded permutation of the captions}."""
    captions = caption_records(data.records)
    order = np.random.default_rng([int(seed), 11]).permutation(len(captions))
    first: dict[int, int] = {}
    for k in order:
        c = captions[int(k)]
        first.setdefault(c.image_id, c.caption_id)
    return first


def triggered_images(data: DefenderData, mode: str, seed: int) -> set[int]:
    """Ids of the images whose triggered version the refine-tune uses under ``mode``."""
    poisoned = set(data.plan.ids)
    if mode == "triggered":
        return {c.image_id for c in caption_records(data.records) if c.caption_id in poisoned}
    if mode == "first_occurrence":
        return {i for i, c in first_occurrences(data, seed).items() if c in poisoned}
    raise SRDError(f"--image_version {mode}: expected one of {', '.join(IMAGE_VERSIONS)}")


class VersionImages:
    """Image provider: one version per image id (triggered or clean), optionally one square
    (red unless ``colour`` says otherwise).

    ``provider(sample) -> uint8 (224, 224, 3)``; ``provider.version(image_id)`` is the image
    before any square (the "original" the quality metrics compare against).
    """

    def __init__(
        self,
        data: DefenderData,
        triggered: set[int],
        mask_actions: Mapping[int, int] | None = None,
        colour: tuple[int, int, int] = RED,
    ):
        self.colour = tuple(colour)
        self.store = ImageStore(data.records, data.cache_mb)
        self.attack = data.attack
        self.triggered = set(triggered)
        self.mask_actions = {int(k): int(v) for k, v in (mask_actions or {}).items()}

    def version(self, image_id: int) -> np.ndarray:
        image = self.store(image_id)
        if image_id in self.triggered:
            return self.attack.apply_image(image)
        return image

    def processed(self, image_id: int) -> np.ndarray:
        image = self.version(image_id)
        if image_id in self.mask_actions:
            return apply_action(image, self.mask_actions[image_id], self.colour)
        return image

    def __call__(self, sample: Sample) -> np.ndarray:
        return self.processed(sample.image_id)


def image_ids(data: DefenderData) -> Sequence[int]:
    return [r.image_id for r in data.records]
