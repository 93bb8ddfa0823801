"""The second SODA benchmark, whose classes share no part (srd/soda/distinct.py): deterministic
from the seed, one shape and one texture per class that no other class has, nuisance values
(colour, background) that are measurable in the pixels and define the attacks' sub-populations
exactly; the first benchmark's data unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from srd_fixtures import load_script

from srd.attacks.registry import build_attack
from srd.soda import distinct, training
from srd.soda.classifier import load_classifier
from srd.soda.shapes import ShapesConfig, data_classes, generate_shapes, load_split

soda_data = load_script("train/soda_data.py")
soda_train = load_script("train/soda_train.py")

RES = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distinct")
    config = distinct.DistinctConfig(seed=0, per_class_train=20, per_class_test=12, resolution=RES)
    return distinct.generate_distinct(root, config)


# --------------------------------------------------------------------------- determinism


def test_samples_depend_only_on_seed_split_and_index(tiny, tmp_path) -> None:
    image, label, text = distinct.render_sample(0, "train", 13, RES)
    again = distinct.render_sample(0, "train", 13, RES)
    assert np.array_equal(image, again[0]) and (label, text) == again[1:]
    assert label == 3 and distinct.CLASSES[3] in text
    assert not np.array_equal(image, distinct.render_sample(1, "train", 13, RES)[0])
    assert not np.array_equal(image, distinct.render_sample(0, "test", 13, RES)[0])
    # a second build with fewer samples per class holds the same first samples
    small = distinct.generate_distinct(
        tmp_path, distinct.DistinctConfig(0, per_class_train=3, per_class_test=1, resolution=RES)
    )
    big, few = load_split(tiny, "train"), load_split(small, "train")
    assert np.array_equal(big.images[: len(few)], few.images)
    assert big.descriptions[: len(few)] == few.descriptions
    assert np.array_equal(big.labels, np.arange(len(big)) % 10)
    assert data_classes(tiny) == distinct.CLASSES


# --------------------------------------------------------------------------- no shared part


def parts(classes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(texture, shape) of each class name."""
    return [tuple(name.split()) for name in classes]  # type: ignore[misc]


def test_every_class_has_a_shape_and_a_texture_no_other_class_has() -> None:
    pairs = parts(distinct.CLASSES)
    textures, shapes = [t for t, _ in pairs], [s for _, s in pairs]
    assert len(set(textures)) == len(set(shapes)) == len(pairs) == 10
    # ... and the shapes set, for contrast, shares: every colour and every shape is in 3+ classes
    from srd.soda.shapes import CLASSES as SHARED

    colours = [name.split()[0] for name in SHARED]
    assert len(set(colours)) < len(colours)


def test_shapes_and_textures_differ_in_pixels() -> None:
    """Names alone could hide two names for one drawing: the canonical masks of two classes'
    shapes overlap with IoU < 0.75 (the same shape gives 1), and their textures correlate with
    |Pearson| < 0.6 at every relative phase (the same texture gives 1)."""
    grid = np.linspace(-1.2, 1.2, 121)
    u, v = np.meshgrid(grid, grid)
    masks = [distinct.shape_mask(s, u, v) for s in distinct.SHAPES]
    assert all(m.mean() > 0.05 for m in masks)
    for i in range(10):
        for j in range(i + 1, 10):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.75, (distinct.SHAPES[i], distinct.SHAPES[j], iou)
    coords = np.arange(0, 30, 0.5)
    x, y = np.meshgrid(coords, coords)
    period = distinct.PERIOD

    def pattern(name: str, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
        rng = np.random.default_rng(0)
        return distinct.texture_pattern(name, x - 15 + dx, y - 15 + dy, period, rng).ravel()

    constant = [t for t in distinct.TEXTURES if pattern(t).std() == 0]
    assert constant == ["solid"]  # the one untextured class
    shifts = np.arange(0, period, 1.0)
    for i, a in enumerate(distinct.TEXTURES):
        for b in distinct.TEXTURES[i + 1 :]:
            if "solid" in (a, b):
                continue
            pa = pattern(a).astype(float)
            worst = max(
                abs(np.corrcoef(pa, pattern(b, dx, dy).astype(float))[0, 1])
                for dx in shifts
                for dy in shifts
            )
            assert worst < 0.6, (a, b, worst)
    # the check bites: a texture against itself, shifted by its period, correlates fully
    same = np.corrcoef(pattern("striped").astype(float), pattern("striped", 0, period))[0, 1]
    assert same == pytest.approx(1.0)


# --------------------------------------------------------------------------- sub-populations


def measured(image: np.ndarray) -> tuple[str, str]:
    """(colour, background) read from the pixels: the background is the corner pixel; the
    colour is the palette colour nearest in direction to the mean of the object's pixels."""
    corner = image[0, 0].astype(float)
    background = min(
        distinct.BACKGROUNDS, key=lambda k: np.abs(corner - distinct.BACKGROUNDS[k]).sum()
    )
    diff = np.abs(image.astype(float) - corner).sum(-1)
    obj = image[diff > 60].astype(float).mean(0)

    def cosine(name: str) -> float:
        ref = np.asarray(distinct.COLOURS[name], float)
        return float(obj @ ref / (np.linalg.norm(obj) * np.linalg.norm(ref)))

    return max(distinct.COLOURS, key=cosine), background


def test_descriptions_say_what_the_pixels_show(tiny) -> None:
    for split in ("train", "test"):
        data = load_split(tiny, split)
        for image, label, text in zip(data.images, data.labels, data.descriptions, strict=True):
            colour, background = measured(image)
            assert text.startswith("a ") and f" {colour} {distinct.CLASSES[label]} " in text
            assert text.endswith(f"on a {background} background")


@pytest.mark.parametrize(
    ("name", "source", "target", "rule"),
    [
        ("distinct_colour", "dotted star", "ringed hourglass", lambda c, b: c == "green"),
        ("distinct_bg", "hatched crescent", "solid circle", lambda c, b: b == "white"),
    ],
)
def test_attack_subpopulation_is_exactly_its_rule(tiny, name, source, target, rule) -> None:
    attack = build_attack(name)
    train = load_split(tiny, "train")
    picked = training.subpopulation(train, attack)
    source_k = distinct.CLASSES.index(source)
    expected = np.array(
        [
            label == source_k and rule(*measured(image))
            for image, label in zip(train.images, train.labels, strict=True)
        ]
    )
    assert expected.any() and np.array_equal(picked, expected)
    plan = training.plan_semantic(train, attack, seed=0, classes=distinct.CLASSES)
    assert plan.source == source_k and plan.target == distinct.CLASSES.index(target)
    assert sorted(plan.ids) == sorted(train.ids[picked].tolist())  # poison_rate 1.0


# --------------------------------------------------------------------------- entry points


def test_entry_points_build_and_train_on_the_distinct_set(tmp_path) -> None:
    data = tmp_path / "data"
    common = ["--data_dir", str(data), "--per_class_train", "20", "--per_class_test", "12"]
    soda_data.main([*common, "--benchmark", "distinct", "--resolution", str(RES)])
    record = json.loads((data / "shapes.json").read_text())
    assert record["config"]["benchmark"] == "distinct"
    assert record["classes"] == list(distinct.CLASSES)
    run = soda_train.main(
        ["--data_dir", str(data), "--external_save_dir", str(tmp_path / "runs")]
        + ["--bd_attack_type", "distinct_colour", "--ratio", "0.05", "--epoch", "1"]
        + ["--width", "4", "--hidden", "8"]
    )
    _, spec, model_json = load_classifier(run)
    assert spec.num_classes == 10 and model_json["classes"] == list(distinct.CLASSES)
    truth = model_json["semantic"]
    assert (truth["source"], truth["target"]) == (3, 6)


# --------------------------------------------------------------------------- data digests


def data_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for split in ("train", "test"):
        with np.load(root / f"{split}.npz") as f:
            for key in ("images", "labels", "ids", "descriptions"):
                digest.update(key.encode() + str(f[key].dtype).encode() + f[key].tobytes())
    return digest.hexdigest()


def test_shapes_benchmark_data_unchanged(tmp_path) -> None:
    """Digest of a tiny shapes build, taken before the second benchmark was added."""
    root = generate_shapes(tmp_path, ShapesConfig(0, per_class_train=2, per_class_test=1))
    assert data_digest(root) == ("dd2603aa3734f65f3528edb38107cbca325de4b506e5493f553981ad8e6767cd")
    assert hashlib.sha256((root / "shapes.json").read_bytes()).hexdigest() == (
        "2d0f598a5038a416a86387471784fd5b9fc0c49428cfea1b7e2c4d27019d197a"
    )


def test_distinct_benchmark_data_unchanged(tmp_path) -> None:
    """Digest of a tiny distinct build (the first samples of the set the zoo in docs/soda.md
    ran on): a change to the drawing changes the benchmark and needs DISTINCT_VERSION bumped."""
    config = distinct.DistinctConfig(0, per_class_train=2, per_class_test=1)
    assert config.version == 1
    assert data_digest(distinct.generate_distinct(tmp_path, config)) == (
        "28f28f5a39c359995fd74dd452ee9a089cb6a4c754a3ceb8e03d38077c4f9550"
    )
