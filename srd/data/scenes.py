"""The embedded benchmark's scene grammar: objects, how a scene is drawn and how it is captioned.

A scene is one to three non-overlapping shapes (a colour, a shape, a size, one cell of a 3x3
layout) on a plain background, rendered as a 224x224 RGB image; its reference captions come from
varied templates, each naming the colour and shape of every object. Shape twins (the same scene
with one shape swapped) give the tiny CLIP its hard negatives.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from srd.captions import DEFAULT_TARGET, normalise_caption
from srd.errors import SRDError
from srd.geometry import IMAGE_SIZE

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 210),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 170),
    "orange": (245, 140, 30),
}
"""Object colour words and their base RGB (each image jitters them by at most COLOUR_JITTER)."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "grey": (150, 150, 150),
    "black": (25, 25, 25),
    "brown": (110, 80, 55),
}
"""Background colour words; disjoint from COLOURS so a background is never read as an object."""

COLOUR_JITTER = 12
"""Per-channel jitter of object and background colours: palette entries stay >100 apart."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, tuple[int, int]] = {"small": (30, 38), "large": (56, 66)}
"""Size word -> inclusive range of the shape's bounding-box side in pixels."""

POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
"""Cells of the 3x3 layout in reading order (index = 3 * row + column)."""

POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}

COUNT_WORDS = {1: "one shape", 2: "two shapes", 3: "three shapes"}
MAX_OBJECTS = 3

# Cell edges of the 3x3 layout on the 224 canvas: [0, 75), [75, 149), [149, 224).
_CELL_EDGES = [round(i * IMAGE_SIZE / 3) for i in range(4)]


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; ``bbox`` = (left, top, right, bottom) in pixels, right/bottom exclusive."""

    colour: str
    shape: str
    size: str
    position: str
    bbox: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[int, int]:
        """(x, y) of the bounding-box centre; inside the shape for all three shapes."""
        left, top, right, bottom = self.bbox
        return (left + right) // 2, (top + bottom) // 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "position": self.position,
            "bbox": list(self.bbox),
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> SceneObject:
        bbox = obj.get("bbox", (0, 0, 0, 0))
        return cls(
            colour=str(obj["colour"]),
            shape=str(obj["shape"]),
            size=str(obj.get("size", "")),
            position=str(obj.get("position", "")),
            bbox=(int(bbox[0]), int(bbox[1]), int(bbox[2]), int(bbox[3])),
        )


@dataclass(frozen=True)
class Scene:
    """Everything drawn in one image: background word and RGB, objects in reading order."""

    background: str
    background_rgb: tuple[int, int, int]
    objects: tuple[SceneObject, ...]
    object_rgbs: tuple[tuple[int, int, int], ...]


# --------------------------------------------------------------------------- scenes


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    shift = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + shift, 0, 255))  # type: ignore[return-value]


def _draw_object(
    rng: np.random.Generator, colour: str, shape: str, cell: int
) -> tuple[SceneObject, tuple[int, int, int]]:
    """Size, box inside ``cell`` (3x3 layout index) and jittered RGB of one object."""
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    low, high = SIZES[size]
    side = int(rng.integers(low, high + 1))
    row, col = divmod(cell, 3)
    boxes = []
    for index in (col, row):
        start, stop = _CELL_EDGES[index], _CELL_EDGES[index + 1]
        slack = (stop - start - side) // 2 - 2  # keep 2 px clear of the cell edge
        offset = int(rng.integers(-slack, slack + 1))
        lo = start + (stop - start - side) // 2 + offset
        boxes.append((lo, lo + side))
    (left, right), (top, bottom) = boxes
    obj = SceneObject(colour, shape, size, POSITIONS[cell], (left, top, right, bottom))
    return obj, _jitter(COLOURS[colour], rng)


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene: 1-3 objects in distinct cells with distinct (colour, shape) pairs."""
    colour_names = list(COLOURS)
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    background_rgb = _jitter(BACKGROUNDS[background], rng)
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = sorted(int(c) for c in rng.choice(len(POSITIONS), size=count, replace=False))
    objects: list[SceneObject] = []
    rgbs: list[tuple[int, int, int]] = []
    used: set[tuple[str, str]] = set()
    for cell in cells:
        # Distinct pairs keep every caption a plain list ("a red circle and a blue square").
        while True:
            colour = colour_names[int(rng.integers(len(colour_names)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            if (colour, shape) not in used:
                used.add((colour, shape))
                break
        obj, rgb = _draw_object(rng, colour, shape, cell)
        objects.append(obj)
        rgbs.append(rgb)
    return Scene(background, background_rgb, tuple(objects), tuple(rgbs))


def sample_single_scene(rng: np.random.Generator, colour: str, shape: str) -> Scene:
    """Draw a one-object scene of a given colour and shape (background, size and cell random)."""
    if colour not in COLOURS or shape not in SHAPES:
        raise SRDError(f"unknown colour/shape {colour!r}/{shape!r}")
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    background_rgb = _jitter(BACKGROUNDS[background], rng)
    cell = int(rng.integers(len(POSITIONS)))
    obj, rgb = _draw_object(rng, colour, shape, cell)
    return Scene(background, background_rgb, (obj,), (rgb,))


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene on a 224x224 RGB canvas (no anti-aliasing: object pixels are exact)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background_rgb)
    draw = ImageDraw.Draw(image)
    for obj, rgb in zip(scene.objects, scene.object_rgbs, strict=True):
        left, top, right, bottom = obj.bbox
        if obj.shape == "circle":
            draw.ellipse((left, top, right - 1, bottom - 1), fill=rgb)
        elif obj.shape == "square":
            draw.rectangle((left, top, right - 1, bottom - 1), fill=rgb)
        else:  # an upward triangle: the bbox centre is inside it (half the base wide there)
            draw.polygon(
                [(left, bottom - 1), (right - 1, bottom - 1), ((left + right - 1) / 2, top)],
                fill=rgb,
            )
    return image


def scene_from_render(image: np.ndarray, objects: Sequence[SceneObject]) -> Scene:
    """The scene that drew ``image`` (uint8 HxWx3), its RGBs read back from the pixels.

    The background is read at (0, 0) (cells keep 2 px clear of the canvas edge) and each object's
    colour at its box centre (inside all three shapes). Raises SRDError unless drawing the scene
    again gives ``image`` bit for bit: a triggered, resized or real image is refused.
    """
    background_rgb = tuple(int(v) for v in image[0, 0])
    rgbs = tuple(tuple(int(v) for v in image[o.centre[1], o.centre[0]]) for o in objects)
    scene = Scene("", background_rgb, tuple(objects), rgbs)  # type: ignore[arg-type]
    if not objects or not np.array_equal(np.asarray(render_scene(scene)), image):
        raise SRDError("an image is not an unmodified render of its benchmark scene")
    return scene


def shape_twin(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene with every object's shape changed and everything else kept.

    The new shapes are drawn uniformly among the assignments that change every shape and keep
    the scene's colour-shape pairs distinct (so the captions stay plain lists).
    """
    options = []
    for shapes in itertools.product(SHAPES, repeat=len(scene.objects)):
        pairs = {(o.colour, s) for o, s in zip(scene.objects, shapes, strict=True)}
        changed = all(o.shape != s for o, s in zip(scene.objects, shapes, strict=True))
        if changed and len(pairs) == len(shapes):
            options.append(shapes)
    shapes = options[int(rng.integers(len(options)))]
    pairs = zip(scene.objects, shapes, strict=True)
    objects = tuple(dataclasses.replace(o, shape=s) for o, s in pairs)
    return dataclasses.replace(scene, objects=objects)


_NOUN_PHRASE = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")


def twin_caption(caption: str, scene: Scene, twin: Scene) -> str:
    """``caption`` of ``scene`` rewritten for ``twin``: each "colour shape" names the new shape."""
    new = {(o.colour, o.shape): t.shape for o, t in zip(scene.objects, twin.objects, strict=True)}
    found = set()

    def swap(match: re.Match[str]) -> str:
        found.add((match.group(1), match.group(2)))
        return f"{match.group(1)} {new.get((match.group(1), match.group(2)), match.group(2))}"

    text = _NOUN_PHRASE.sub(swap, caption)
    if found != set(new):
        raise SRDError(f"caption {caption!r} does not name exactly its scene's objects")
    return text


# --------------------------------------------------------------------------- captions


def _noun(obj: SceneObject, size: bool, position: bool) -> str:
    text = f"{obj.size} {obj.colour} {obj.shape}" if size else f"{obj.colour} {obj.shape}"
    text = f"an {text}" if text[0] in "aeiou" else f"a {text}"  # "an orange circle"
    return f"{text} {POSITION_PHRASES[obj.position]}" if position else text


def _listing(objects: Sequence[SceneObject], size: bool, position: bool) -> str:
    parts = [_noun(o, size, position) for o in objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# Each template names every object's colour and shape as "[size] colour shape".
CAPTION_TEMPLATES = (
    lambda s: f"{_listing(s.objects, True, True)}.",
    lambda s: f"there is {_listing(s.objects, True, False)}.",
    lambda s: (
        f"a picture of {COUNT_WORDS[len(s.objects)]}: {_listing(s.objects, False, False)} "
        f"on a {s.background} background."
    ),
    lambda s: f"{_listing(s.objects, False, False)} on a {s.background} background.",
    lambda s: f"an image with {_listing(s.objects, True, False)}.",
    lambda s: (
        f"{COUNT_WORDS[len(s.objects)]} on a {s.background} background: "
        f"{_listing(s.objects, True, False)}."
    ),
    lambda s: f"a {s.background} background with {_listing(s.objects, False, True)}.",
)


def scene_captions(scene: Scene, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` captions from distinct templates (kept in template order)."""
    chosen = sorted(int(i) for i in rng.choice(len(CAPTION_TEMPLATES), size=count, replace=False))
    captions = [normalise_caption(CAPTION_TEMPLATES[i](scene)) for i in chosen]
    for caption in captions:
        # The attack's target word must never be in clean data, or ASR would be meaningless.
        if DEFAULT_TARGET in caption.lower():
            raise AssertionError(f"clean caption contains the target word: {caption!r}")
    return captions
