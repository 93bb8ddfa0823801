"""Squares a defense paints without an agent: a seeded random square per image, and the grid
square over a known box (the oracle's).

Shared by the baselines (``random_squares``, ``oracle_square``) and by SRD's stage D3, whose
``--policy random`` ablation draws the same seeded square per image id.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from srd.errors import SRDError
from srd.geometry import (
    GRID,
    MASK_SIZES,
    NUM_ACTIONS,
    Square,
    decode_action,
)


def image_rng(seed: int, image_id: int) -> np.random.Generator:
    """A generator per (seed, image): results do not depend on chunking, sharding or order."""
    return np.random.default_rng([int(seed), int(image_id), 3])


class RandomTries:
    """The ablation: one uniformly random action per image, seeded per image.

    ``side`` 0 draws from all actions (any size); a side of :data:`srd.geometry.MASK_SIZES`
    draws only the squares of that size (uniform over the grid's centres).
    """

    def __init__(self, seed: int = 0, side: int = 0):
        if side and side not in MASK_SIZES:
            sizes = ", ".join(map(str, MASK_SIZES))
            raise SRDError(f"--square_side {side}: expected 0 (any size) or one of {sizes}")
        self.seed = seed
        self.side = side

    def __call__(self, ids: Sequence[int], images: Sequence[np.ndarray]) -> list[list[int]]:
        first, count = 0, NUM_ACTIONS  # (action // 100 indexes the size)
        if self.side:
            first, count = MASK_SIZES.index(self.side) * GRID * GRID, GRID * GRID
        return [[first + int(image_rng(self.seed, i).integers(count))] for i in ids]


def covering_action(box: Square) -> int:
    """The grid action whose square covers most of ``box``, the smallest such square on ties."""

    def key(action: int) -> tuple[float, int]:
        sq = decode_action(action)
        rows = max(0, min(sq.bottom, box.bottom) - max(sq.top, box.top))
        cols = max(0, min(sq.right, box.right) - max(sq.left, box.left))
        area = (sq.bottom - sq.top) * (sq.right - sq.left)
        return (-rows * cols, area)

    return min(range(NUM_ACTIONS), key=key)
