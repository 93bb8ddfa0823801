"""The order in which an epoch visits the training samples, when it is not the loader's shuffle.

``--epoch_captions_per_image`` (:class:`CaptionsPerImage`: fewer caption samples per image and
epoch, a fresh seeded draw each epoch) and ``--epoch_sampling fixed_replacement``
(:class:`FixedDrawWithReplacement`: the reference's one draw with replacement, replayed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from torch.utils.data import Sampler

from srd.errors import SRDError


class Sample(Protocol):
    """A training sample as the samplers see it (srd.captioner.engine.Sample)."""

    image_id: int


class EpochFlags(Protocol):
    """The flags that choose the sampler (srd.captioner.engine.TrainArgs)."""

    epoch_captions_per_image: int
    epoch_sampling: str
    seed: int


EPOCH_SAMPLINGS = ("shuffle", "fixed_replacement")
"""--epoch_sampling: ours, and the reference's fixed draw with replacement."""


class CaptionsPerImage(Sampler[int]):
    """Each epoch, ``per_image`` of every image's samples (all of an image with fewer), drawn
    without replacement, in a shuffled order; a fresh draw per epoch, seeded by (seed, epoch).

    An epoch is then ``per_image`` passes over the images instead of one pass over every caption
    sample: the same images, fewer steps, and each sample's share of the epoch unchanged in
    expectation (a poisoned sample is drawn ``per_image / n`` of the epochs, n = its image's
    caption count). Every process of a launch draws the same list (accelerate shards it).
    """

    def __init__(self, samples: Sequence[Sample], per_image: int, seed: int):
        if per_image < 1:
            raise SRDError(f"--epoch_captions_per_image {per_image}: expected 1 or more (0: all)")
        groups: dict[int, list[int]] = {}
        for index, sample in enumerate(samples):
            groups.setdefault(sample.image_id, []).append(index)
        self.groups = [np.asarray(g) for g in groups.values()]
        self.per_image = per_image
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(min(self.per_image, len(g)) for g in self.groups)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        drawn = [
            g if len(g) <= self.per_image else rng.choice(g, self.per_image, replace=False)
            for g in self.groups
        ]
        order = np.concatenate(drawn)[rng.permutation(len(self))]
        return iter(order.tolist())


class FixedDrawWithReplacement(Sampler[int]):
    """The reference's epochs (its B14, B21): one seeded draw of ``n`` indices of ``n`` with
    replacement, the same list every epoch (its sampler's epoch was never advanced), so about
    1/e of the samples (37%) are never seen and others are seen twice or more."""

    def __init__(self, n: int, seed: int):
        self.order = np.random.default_rng(seed).integers(0, n, size=n).tolist()

    def set_epoch(self, epoch: int) -> None:  # the reference's draw does not change
        pass

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order)


def epoch_sampler(samples: Sequence[Sample], args: EpochFlags) -> Sampler[int] | None:
    """The sampler of ``--epoch_captions_per_image`` / ``--epoch_sampling`` (None: shuffle)."""
    if args.epoch_sampling == "fixed_replacement":
        if args.epoch_captions_per_image:
            raise SRDError(
                f"--epoch_captions_per_image {args.epoch_captions_per_image}: only with "
                "--epoch_sampling shuffle (the reference's draw takes every sample's chance)"
            )
        return FixedDrawWithReplacement(len(samples), args.seed)
    if args.epoch_captions_per_image:
        return CaptionsPerImage(samples, args.epoch_captions_per_image, args.seed)
    return None
