"""Image geometry shared by triggers, the red-mask action space and figures.

Everything is defined on the paper's 224x224 RGB canvas, whatever resolution the vision
encoder later resizes to. This module is the single source of truth for the mask grid.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

IMAGE_SIZE = 224
"""Side of the canvas on which triggers and masks are defined (pixels)."""

GRID = 10
"""Centres per axis of the mask grid (10x10 centres)."""

MASK_SIZES: tuple[int, ...] = (20, 40, 60, 80, 200)
"""Side lengths of the red squares, in pixels; action // (GRID*GRID) indexes this tuple."""

MASK_COLOURS: dict[str, tuple[int, int, int]] = {"red": (255, 0, 0), "cyan": (0, 255, 255)}
"""Colours a mask may be painted in. ``red`` is the reference's and every stage's default;
``cyan`` is ours, for the mask-colour ablation (``train/defend.py --mask_colour``): a colour
that no object or background of the embedded benchmark has, so a square cannot pass for one."""

RED = MASK_COLOURS["red"]
"""Colour painted by every mask unless a stage is told otherwise."""

NUM_ACTIONS = GRID * GRID * len(MASK_SIZES)
"""500 discrete actions: 10x10 centres times 5 sizes."""


class Square(NamedTuple):
    """A clipped square on the canvas: rows [top, bottom) x cols [left, right)."""

    top: int
    bottom: int
    left: int
    right: int


def grid_centres() -> list[int]:
    """Centre coordinates along one axis: int(g * 22.4 + 11.2) for g in 0..9."""
    step = IMAGE_SIZE / GRID
    return [int(g * step + step / 2) for g in range(GRID)]


def decode_action(action: int) -> Square:
    """Map an action in [0, 500) to its clipped square.

    gx = a % 10, gy = (a // 10) % 10, size index = a // 100 (reference decoding).
    """
    action = int(action)
    if not 0 <= action < NUM_ACTIONS:
        raise ValueError(f"action {action} outside [0, {NUM_ACTIONS})")
    centres = grid_centres()
    cx = centres[action % GRID]
    cy = centres[(action // GRID) % GRID]
    side = MASK_SIZES[action // (GRID * GRID)]
    half = side // 2
    return Square(
        top=max(cy - half, 0),
        bottom=min(cy + half, IMAGE_SIZE),
        left=max(cx - half, 0),
        right=min(cx + half, IMAGE_SIZE),
    )


def paint_square(
    image: np.ndarray, square: Square, colour: tuple[int, int, int] = RED
) -> np.ndarray:
    """A copy of an HxWx3 uint8 image with ``square`` filled in ``colour`` (default: red)."""
    out = np.array(image, dtype=np.uint8, copy=True)
    out[square.top : square.bottom, square.left : square.right] = colour
    return out


def apply_action(image: np.ndarray, action: int, colour: tuple[int, int, int] = RED) -> np.ndarray:
    """Paint the square of ``action`` on a copy of ``image`` (masks never accumulate)."""
    return paint_square(image, decode_action(action), colour)
