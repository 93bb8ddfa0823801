"""The embedded default's data: a deterministic benchmark of captioned coloured-shape scenes.

Every image is a 224x224 RGB PNG showing one to three non-overlapping shapes (a colour, a shape,
a size, one cell of a 3x3 layout) on a plain background. Every image has several reference
captions made from varied templates; each caption names the colour and shape of every object.
The files are laid out the way real COCO is used here (Karpathy split JSON, COCO caption
annotations JSON, ``train2014``/``val2014`` image folders), so :mod:`srd.data.records` reads both alike.
The Karpathy JSON carries one extra field per image, ``objects``, the ground-truth scene.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from srd.captions import DEFAULT_TARGET, normalise_caption, words
from srd.errors import SRDError
from srd.geometry import IMAGE_SIZE
from srd.io import atomic_path, ensure_dir, read_json, write_json

if TYPE_CHECKING:
    from srd.data.records import ImageRecord

log = logging.getLogger(__name__)

BENCHMARK_VERSION = 1
"""Bumped whenever the same seed would draw different images or captions."""

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
# Split -> (cocoid offset, seed stream). Fixed offsets keep a split's ids and scenes the same
# whatever the other splits' sizes are.
_SPLITS = {"train": (1_000_000, 0), "val": (2_000_000, 1), "test": (3_000_000, 2)}
_MAX_PER_SPLIT = 999_999
_MAX_CAPTIONS = 10  # sentid = cocoid * 10 + k

KARPATHY_JSON = "dataset_coco.json"
VAL_ANNOTATIONS_JSON = "captions_val2014.json"
TRAIN_ANNOTATIONS_JSON = "captions_train2014.json"
CONFIG_JSON = "benchmark.json"
TRAIN_DIR = "train2014"
VAL_DIR = "val2014"


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


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything that determines the benchmark's bytes (written to benchmark.json)."""

    seed: int = 0
    num_train: int = 3000
    num_val: int = 100
    num_test: int = 300
    captions_per_image: int = 5
    version: int = BENCHMARK_VERSION

    def validate(self) -> None:
        """SRDError naming the flag of the first bad value."""
        for name in ("num_train", "num_val", "num_test"):
            value = getattr(self, name)
            if not 1 <= value <= _MAX_PER_SPLIT:
                raise SRDError(f"--{name} {value}: must be between 1 and {_MAX_PER_SPLIT}")
        if not 3 <= self.captions_per_image <= len(_TEMPLATES):
            raise SRDError(
                f"--captions_per_image {self.captions_per_image}: must be between 3 and "
                f"{len(_TEMPLATES)}"
            )
        if self.seed < 0:
            raise SRDError(f"--seed {self.seed}: must be non-negative")


@dataclass(frozen=True)
class BenchmarkPaths:
    """Where a benchmark's files are; the names follow the COCO flags of the evaluation stage."""

    root: Path
    karpathy_json: Path  # --coco_karpathy_json_path
    annotations_json: Path  # --coco_annotations_json_path (val + test images)
    train_annotations_json: Path
    train_image_dir: Path  # --coco_train_image_dir_path
    val_image_dir: Path  # --coco_val_image_dir_path
    config_json: Path


def benchmark_paths(out_dir: str | os.PathLike) -> BenchmarkPaths:
    """The file layout of a benchmark folder (nothing is checked or created)."""
    root = Path(out_dir)
    return BenchmarkPaths(
        root=root,
        karpathy_json=root / KARPATHY_JSON,
        annotations_json=root / VAL_ANNOTATIONS_JSON,
        train_annotations_json=root / TRAIN_ANNOTATIONS_JSON,
        train_image_dir=root / TRAIN_DIR,
        val_image_dir=root / VAL_DIR,
        config_json=root / CONFIG_JSON,
    )


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
_TEMPLATES = (
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
    chosen = sorted(int(i) for i in rng.choice(len(_TEMPLATES), size=count, replace=False))
    captions = [normalise_caption(_TEMPLATES[i](scene)) for i in chosen]
    for caption in captions:
        # The attack's target word must never be in clean data, or ASR would be meaningless.
        if DEFAULT_TARGET in caption.lower():
            raise AssertionError(f"clean caption contains the target word: {caption!r}")
    return captions


# --------------------------------------------------------------------------- generation


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split][1], index]))


def _write_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def generate_benchmark(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_train: int = 3000,
    num_val: int = 100,
    num_test: int = 300,
    captions_per_image: int = 5,
    overwrite: bool = False,
) -> BenchmarkPaths:
    """Write the benchmark into ``out_dir`` (deterministic from ``seed``; returns its paths).

    Image ``i`` of a split depends only on (seed, split, i), so growing one split leaves the
    other splits' images, ids and captions unchanged (only Karpathy ``imgid`` positions move).
    ``benchmark.json`` is written last; a finished folder with the same config is left
    alone, a different config raises SRDError unless ``overwrite``.
    """
    config = BenchmarkConfig(seed, num_train, num_val, num_test, captions_per_image)
    config.validate()
    paths = benchmark_paths(out_dir)
    ensure_dir(paths.root, flag="--out_dir")
    wanted = dataclasses.asdict(config)
    if paths.config_json.is_file():
        record = read_json(paths.config_json)
        existing = record.get("config") if isinstance(record, dict) else None
        if existing == wanted:
            log.info(
                "benchmark in %s is already finished with this config: nothing to do", paths.root
            )
            return paths
        if not overwrite:
            raise SRDError(
                f"--out_dir {paths.root}: holds a finished benchmark with a different config "
                f"({_describe(existing)}); pass --overwrite to replace it"
            )
        log.info("overwriting the benchmark in %s (old config %s)", paths.root, _describe(existing))
        # Unmark first so an interrupted overwrite is never taken for a finished benchmark.
        paths.config_json.unlink()
    # Caption files of an older or unfinished benchmark go before any new image is written, so
    # a killed run never leaves old captions beside new images (the loaders would accept them).
    for stale in (paths.karpathy_json, paths.annotations_json, paths.train_annotations_json):
        stale.unlink(missing_ok=True)

    start = time.perf_counter()
    karpathy_images: list[dict[str, Any]] = []
    annotations: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    coco_images: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    written: dict[Path, set[str]] = {paths.train_image_dir: set(), paths.val_image_dir: set()}
    total = sum(sizes.values())
    with tqdm(total=total, desc="benchmark images", unit="img", mininterval=2.0) as bar:
        for split, size in sizes.items():
            folder_name = TRAIN_DIR if split == "train" else VAL_DIR
            folder = paths.root / folder_name
            for index in range(size):
                rng = _scene_rng(seed, split, index)
                scene = sample_scene(rng)
                captions = scene_captions(scene, rng, captions_per_image)
                cocoid = _SPLITS[split][0] + index
                filename = f"SYN_{folder_name}_{cocoid:012d}.png"
                _write_png(render_scene(scene), folder / filename)
                written[folder].add(filename)
                imgid = len(karpathy_images)
                sentids = [cocoid * _MAX_CAPTIONS + k for k in range(len(captions))]
                karpathy_images.append(
                    {
                        "filepath": folder_name,
                        "filename": filename,
                        "split": split,
                        "cocoid": cocoid,
                        "imgid": imgid,
                        "sentids": sentids,
                        "sentences": [
                            {"raw": c, "tokens": words(c), "imgid": imgid, "sentid": s}
                            for c, s in zip(captions, sentids, strict=True)
                        ],
                        "objects": [o.to_dict() for o in scene.objects],
                        "background": scene.background,
                    }
                )
                part = "train" if split == "train" else "val"
                coco_images[part].append(
                    {"id": cocoid, "file_name": filename, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
                )
                annotations[part].extend(
                    {"image_id": cocoid, "id": s, "caption": c}
                    for c, s in zip(captions, sentids, strict=True)
                )
                bar.update()
    _remove_stale_images(written)

    write_json(paths.karpathy_json, {"images": karpathy_images, "dataset": "coco"})
    for part, path in (("val", paths.annotations_json), ("train", paths.train_annotations_json)):
        write_json(path, _coco_annotations(part, coco_images[part], annotations[part]))
    train_captions = [
        s["raw"] for im in karpathy_images if im["split"] == "train" for s in im["sentences"]
    ]
    blind = most_common_caption(train_captions)
    write_json(
        paths.config_json,
        {
            "config": wanted,
            "files": {
                "coco_karpathy_json_path": KARPATHY_JSON,
                "coco_annotations_json_path": VAL_ANNOTATIONS_JSON,
                "coco_train_annotations_json_path": TRAIN_ANNOTATIONS_JSON,
                "coco_train_image_dir_path": TRAIN_DIR,
                "coco_val_image_dir_path": VAL_DIR,
            },
            "blind_caption": blind,
        },
    )
    log.info(
        "wrote %d images (%d train / %d val / %d test, %d captions each) to %s in %.1f s; "
        "blind baseline caption: %r",
        total,
        num_train,
        num_val,
        num_test,
        captions_per_image,
        paths.root,
        time.perf_counter() - start,
        blind,
    )
    return paths


def _describe(config: Any) -> str:
    if not isinstance(config, dict):
        return "unreadable config"
    return ", ".join(f"{k}={v}" for k, v in config.items())


def _coco_annotations(
    part: str, images: list[dict[str, Any]], annotations: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "info": {
            "description": f"SRD synthetic captioned shapes benchmark ({part}2014 part)",
            "version": str(BENCHMARK_VERSION),
        },
        "licenses": [],
        "type": "captions",
        "images": images,
        "annotations": annotations,
    }


def _remove_stale_images(written: Mapping[Path, set[str]]) -> None:
    """Delete our own PNGs left by an earlier, larger config (other files are never touched)."""
    for folder, names in written.items():
        for path in folder.glob("SYN_*.png"):
            if path.name not in names:
                path.unlink()


# --------------------------------------------------------------------------- scoring


def mentioned_pairs(caption: str) -> set[tuple[str, str]]:
    """(colour, shape) pairs a caption names.

    Rule, on :func:`srd.captions.words` (lower-cased): a colour word of COLOURS names a pair
    with the first shape word ("circle", "square", "triangle" or their plurals) among the next
    two words, unless another colour word comes first. "a small red circle" -> (red, circle);
    "a red large circle" -> (red, circle); "red and blue circles" -> only (blue, circle).
    """
    tokens = words(caption)
    shapes = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES}
    pairs: set[tuple[str, str]] = set()
    for i, token in enumerate(tokens):
        if token not in COLOURS:
            continue
        for following in tokens[i + 1 : i + 3]:
            if following in COLOURS:
                break
            if following in shapes:
                pairs.add((token, shapes[following]))
                break
    return pairs


def object_pairs(objects: Iterable[SceneObject | Mapping[str, Any]]) -> set[tuple[str, str]]:
    """(colour, shape) pairs of a scene's objects (SceneObjects or their JSON dicts)."""
    pairs = set()
    for obj in objects:
        if isinstance(obj, SceneObject):
            pairs.add((obj.colour, obj.shape))
        else:
            pairs.add((str(obj["colour"]), str(obj["shape"])))
    return pairs


def attribute_accuracy(
    predictions: Mapping[int, str], objects: Mapping[int, Sequence[SceneObject | Mapping[str, Any]]]
) -> float:
    """Share of predicted images whose caption names exactly the image's (colour, shape) pairs.

    An image is correct iff ``mentioned_pairs(caption)`` (see its rule) equals the set of
    (colour, shape) pairs of the image's objects: a missing object, a wrong colour or shape,
    or an extra named object all make it wrong. Sizes, positions, counts and the background
    are not scored. Averaged over the image ids of ``predictions``; each must be in ``objects``.
    """
    if not predictions:
        raise SRDError("attribute accuracy: no predictions to score")
    missing = [i for i in predictions if i not in objects]
    if missing:
        raise SRDError(
            f"attribute accuracy: {len(missing)} predicted image ids have no scene description "
            f"(first: {missing[0]})"
        )
    correct = sum(
        mentioned_pairs(caption) == object_pairs(objects[image_id])
        for image_id, caption in predictions.items()
    )
    return correct / len(predictions)


def attribute_breakdown(
    predictions: Mapping[int, str], objects: Mapping[int, Sequence[SceneObject | Mapping[str, Any]]]
) -> dict[str, dict[str, float | int]]:
    """:func:`attribute_accuracy` per number of objects in the image ("1", "2", "3"), with the
    share of captions that stop before their final full stop (cut by the decoding length)."""
    groups: dict[int, dict[int, str]] = {}
    for image_id, caption in predictions.items():
        groups.setdefault(len(objects.get(image_id, ())), {})[image_id] = caption
    return {
        str(count): {
            "num_images": len(group),
            "attribute_accuracy": attribute_accuracy(group, objects),
            "unfinished": sum(not c.rstrip().endswith(".") for c in group.values()) / len(group),
        }
        for count, group in sorted(groups.items())
    }


def colour_recall(
    predictions: Mapping[int, str], objects: Mapping[int, Sequence[SceneObject | Mapping[str, Any]]]
) -> dict[str, dict[str, float | int]]:
    """Per colour of COLOURS: the images showing an object of it, and the share of those whose
    caption names an object of that colour (:func:`mentioned_pairs`). Tells a captioner that
    stopped naming one colour (e.g. after training on images with red squares its captions
    never mention) from one that got worse everywhere."""
    shown = {i: {c for c, _ in object_pairs(objects[i])} for i in predictions}
    named = {i: {c for c, _ in mentioned_pairs(caption)} for i, caption in predictions.items()}
    out: dict[str, dict[str, float | int]] = {}
    for colour in COLOURS:
        ids = [i for i in predictions if colour in shown[i]]
        hits = sum(colour in named[i] for i in ids)
        out[colour] = {"num_images": len(ids), "recall": hits / len(ids) if ids else None}
    return out


def object_errors(
    predictions: Mapping[int, str], objects: Mapping[int, Sequence[SceneObject | Mapping[str, Any]]]
) -> dict[str, float | int]:
    """What goes wrong with the objects of the images, as shares of all shown (colour, shape)
    pairs: ``named`` (the pair is named), ``wrong_shape`` (not named, but its colour is, with
    another shape), ``wrong_colour`` (not named, its colour neither, but its shape is),
    ``missing`` (neither named); and ``extra``: named pairs the image does not show, as a share
    of the shown pairs. Tells which part of :func:`attribute_accuracy` a change costs."""
    counts = Counter({"named": 0, "wrong_shape": 0, "wrong_colour": 0, "missing": 0, "extra": 0})
    for image_id, caption in predictions.items():
        shown, named = object_pairs(objects[image_id]), mentioned_pairs(caption)
        colours, shapes = {c for c, _ in named}, {s for _, s in named}
        for colour, shape in shown:
            if (colour, shape) in named:
                counts["named"] += 1
            elif colour in colours:
                counts["wrong_shape"] += 1
            elif shape in shapes:
                counts["wrong_colour"] += 1
            else:
                counts["missing"] += 1
        counts["extra"] += len(named - shown)
    total = sum(counts[k] for k in ("named", "wrong_shape", "wrong_colour", "missing"))
    if total == 0:
        raise SRDError("object errors: the predicted images show no object")
    return {"num_pairs": total, **{k: v / total for k, v in counts.items()}}


def most_common_caption(captions: Iterable[str]) -> str:
    """Most frequent normalised, lower-cased caption; ties go to the alphabetically first."""
    counts = Counter(normalise_caption(c).lower() for c in captions)
    if not counts:
        raise SRDError("blind baseline: no training captions")
    best = max(counts.values())
    return min(c for c, n in counts.items() if n == best)


def blind_caption(train_images: Iterable[ImageRecord]) -> str:
    """The "blind baseline": the most common training caption, whatever the image.

    Captions are compared after :func:`srd.captions.normalise_caption` and lower-casing; ties
    are broken by taking the alphabetically first.
    """
    return most_common_caption(c.caption for image in train_images for c in image.captions)


# --------------------------------------------------------------------------- scene look-ups


def scene_index(images: Iterable[ImageRecord]) -> dict[int, tuple[SceneObject, ...]]:
    """image id -> its objects; SRDError if a record has no scene description (real COCO)."""
    index: dict[int, tuple[SceneObject, ...]] = {}
    for image in images:
        if image.objects is None:
            raise SRDError(
                f'{image.path}: no scene description ("objects" in the Karpathy JSON); '
                "only the synthetic benchmark has one"
            )
        index[image.image_id] = image.objects
    return index


def images_showing(
    scenes: Mapping[int, Sequence[SceneObject]],
    colour: str | None = None,
    shape: str | None = None,
) -> list[int]:
    """Sorted ids of images with an object matching ``colour`` and/or ``shape`` (None = any)."""
    if colour is not None and colour not in COLOURS:
        raise SRDError(f"unknown colour {colour!r} (known: {', '.join(COLOURS)})")
    if shape is not None and shape not in SHAPES:
        raise SRDError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    return sorted(
        image_id
        for image_id, objs in scenes.items()
        if any(
            (colour is None or o.colour == colour) and (shape is None or o.shape == shape)
            for o in objs
        )
    )
