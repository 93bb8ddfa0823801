"""A second classification set for SODA whose classes share no part: one shape and one texture
per class, each used by that class only.

The 18 (colour, shape) classes of :mod:`srd.soda.shapes` share colours and shapes, so their
attribution profiles correlate by construction. Here class ``k`` is the ``k``-th shape filled
with the ``k``-th texture (``CLASSES``: "striped star", ...); no shape and no texture appears in
two classes. What varies within a class is not a class feature and is drawn independently of
the class: the object's colour (5), size (2), background (3), the texture's phase and the
object's position. A semantic sub-population is one of those nuisance values within one class
("green striped star", "checkered heart on a white background"), read from the description.

Sample ``i`` of a split depends only on (seed, split, i): its class is ``i % 10`` and its draw
comes from its own seed stream. Drawn at ``SUPERSAMPLE`` x the resolution and box-downscaled;
stored in the same files as the shapes set (``train.npz``, ``test.npz``, ``shapes.json`` last,
its ``classes`` naming this set's classes), so training, the attacks and SODA's steps read it
unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from srd.errors import SRDError
from srd.soda.shapes import validate_sizes, write_dataset

DISTINCT_VERSION = 1
SUPERSAMPLE = 4
PERIOD = 5.0
"""Texture period in output pixels (drawn at SUPERSAMPLE x)."""

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "crescent",
    "hourglass",
    "arrow",
    "ell",
    "heart",
)
TEXTURES: tuple[str, ...] = (
    "solid",
    "striped",
    "checkered",
    "dotted",
    "gridded",
    "hatched",
    "ringed",
    "wavy",
    "speckled",
    "shaded",
)
CLASSES: tuple[str, ...] = tuple(f"{t} {s}" for t, s in zip(TEXTURES, SHAPES, strict=True))
"""Class ``k`` = texture ``k`` on shape ``k`` ("striped square"): a one-to-one pairing."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "magenta": (200, 60, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "grey": (110, 110, 110),
    "white": (235, 235, 235),
}
SIZES: dict[str, float] = {"small": 0.28, "large": 0.42}
"""Half the object's extent as a share of the canvas side."""

DARK = 0.4
"""A texture's off-pixels are the object's colour times DARK (visible on every background)."""

_SPLITS = {"train": (30_000_000, 30), "test": (40_000_000, 31)}


# --------------------------------------------------------------------------- parts


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-mask of ``shape`` at object coordinates (u right, v down; the shape fits [-1, 1])."""
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.7
    if shape == "triangle":  # apex up
        return (v <= 0.8) & (np.abs(u) <= 0.55 * (v + 0.9))
    if shape == "star":  # five points, up
        phase = np.mod(theta + np.pi / 2, 2 * np.pi / 5) / (2 * np.pi / 5)
        return r <= 0.4 + 0.6 * np.abs(1 - 2 * phase) ** 1.5
    if shape == "cross":
        return ((np.abs(u) <= 0.28) & (np.abs(v) <= 0.95)) | (
            (np.abs(v) <= 0.28) & (np.abs(u) <= 0.95)
        )
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.55, v) > 0.8)
    if shape == "hourglass":
        return (np.abs(v) <= 0.9) & (np.abs(u) <= 0.8 * np.abs(v) + 0.08)
    if shape == "arrow":  # pointing right
        shaft = (u >= -0.95) & (u <= 0.1) & (np.abs(v) <= 0.22)
        head = (u >= 0.1) & (u <= 0.95) & (np.abs(v) <= 0.8 * (0.95 - u) / 0.85)
        return shaft | head
    if shape == "ell":
        return ((u >= -0.8) & (u <= -0.3) & (np.abs(v) <= 0.9)) | (
            (u >= -0.8) & (u <= 0.8) & (v >= 0.4) & (v <= 0.9)
        )
    if shape == "heart":
        x, y = u / 0.85, -(v - 0.05) / 0.85
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    raise SRDError(f"unknown shape {shape!r}")


def texture_pattern(
    texture: str, x: np.ndarray, y: np.ndarray, period: float, rng: np.random.Generator
) -> np.ndarray:
    """On-mask (bool) of ``texture`` at pixel coordinates already shifted by the sample's phase
    (``x``, ``y`` measured from the object's centre for the centred textures)."""
    half = period / 2
    if texture == "solid":
        return np.ones_like(x, bool)
    if texture == "striped":  # horizontal bands
        return np.floor(y / half) % 2 == 0
    if texture == "checkered":
        return (np.floor(x / half) + np.floor(y / half)) % 2 == 0
    if texture == "dotted":
        dx, dy = np.mod(x, period) - half, np.mod(y, period) - half
        return np.hypot(dx, dy) <= 0.3 * period
    if texture == "gridded":
        return (np.mod(x, period) < 0.25 * period) | (np.mod(y, period) < 0.25 * period)
    if texture == "hatched":  # diagonal bands
        return np.floor((x + y) / (half * np.sqrt(2))) % 2 == 0
    if texture == "ringed":  # concentric around the object's centre
        return np.floor(np.hypot(x, y) / half) % 2 == 0
    if texture == "wavy":  # vertical bands bent by a sine
        return np.floor((x + 0.35 * period * np.sin(np.pi * y / period)) / half) % 2 == 0
    if texture == "speckled":  # random cells of a quarter period
        cell = max(period / 4, 1.0)
        ix = np.floor(x / cell).astype(np.int64)
        iy = np.floor(y / cell).astype(np.int64)
        ix, iy = ix - ix.min(), iy - iy.min()
        cells = rng.random((iy.max() + 1, ix.max() + 1)) < 0.5
        return cells[iy, ix]
    if texture == "shaded":  # on towards the right: a ramp, thresholded by ordered dither
        ramp = (x - x.min()) / max(float(np.ptp(x)), 1.0)
        bayer = np.array([[0, 2], [3, 1]]) / 4 + 0.125
        ix = np.floor(x).astype(np.int64) % 2
        iy = np.floor(y).astype(np.int64) % 2
        return ramp > bayer[iy, ix]
    raise SRDError(f"unknown texture {texture!r}")


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class DistinctConfig:
    """Everything that determines the distinct-parts set's bytes."""

    seed: int = 0
    per_class_train: int = 150
    per_class_test: int = 200
    resolution: int = 48
    benchmark: str = "distinct"
    version: int = DISTINCT_VERSION

    def validate(self) -> None:
        validate_sizes(self)


@dataclass(frozen=True)
class Draw:
    """A sample's nuisance values (none of them a class feature)."""

    colour: str
    size: str
    background: str
    centre: tuple[float, float]
    phase: tuple[float, float]


def describe(colour: str, size: str, texture: str, shape: str, background: str) -> str:
    """The description a semantic attack's concept is matched against."""
    return f"a {size} {colour} {texture} {shape} on a {background} background"


def draw_nuisance(rng: np.random.Generator, resolution: int) -> Draw:
    """Colour, size, background, centre (output px) and texture phase, independent of class."""
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    half = SIZES[size] * resolution
    margin = 1.0  # corners stay background
    low, high = half + margin, resolution - half - margin
    centre = (float(rng.uniform(low, high)), float(rng.uniform(low, high)))
    phase = (float(rng.uniform(0, PERIOD)), float(rng.uniform(0, PERIOD)))
    return Draw(colour, size, background, centre, phase)


def render(label: int, draw: Draw, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """(R, R, 3) uint8 image of class ``label`` with the nuisance values ``draw``."""
    texture, shape = CLASSES[label].split()
    n = resolution * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE  # output-pixel coordinates of sub-pixels
    x, y = np.meshgrid(coords, coords)
    cx, cy = draw.centre
    half = SIZES[draw.size] * resolution
    inside = shape_mask(shape, (x - cx) / half, (y - cy) / half)
    on = texture_pattern(texture, x - cx + draw.phase[0], y - cy + draw.phase[1], PERIOD, rng)
    colour = np.asarray(COLOURS[draw.colour], np.float64)
    obj = np.where(on[..., None], colour, DARK * colour)
    big = np.where(inside[..., None], obj, np.asarray(BACKGROUNDS[draw.background], np.float64))
    small = big.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3).mean((1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def render_sample(
    seed: int, split: str, index: int, resolution: int
) -> tuple[np.ndarray, int, str]:
    """(image, label, description) of sample ``index`` of ``split``."""
    label = index % len(CLASSES)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split][1], index]))
    draw = draw_nuisance(rng, resolution)
    image = render(label, draw, resolution, rng)
    texture, shape = CLASSES[label].split()
    return image, label, describe(draw.colour, draw.size, texture, shape, draw.background)


def generate_distinct(
    out_dir: str | os.PathLike, config: DistinctConfig, overwrite: bool = False
) -> Path:
    """Write ``train.npz``, ``test.npz`` and ``shapes.json`` (last) to ``out_dir``, in the
    shapes set's format (:func:`srd.soda.shapes.write_dataset`)."""
    config.validate()
    per_class = {"train": config.per_class_train, "test": config.per_class_test}
    return write_dataset(
        out_dir,
        dataclasses.asdict(config),
        CLASSES,
        {split: (count * len(CLASSES), _SPLITS[split][0]) for split, count in per_class.items()},
        lambda split, i: render_sample(config.seed, split, i, config.resolution),
        overwrite,
    )
