"""The tower probe: the linear probe itself, and the entry point on the tiny benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
from srd_fixtures import data_flags, load_script

from srd.errors import SRDError
from srd.evaluation.probe import fit_probe, probe_attributes, trigger_detection, trigger_shift


def _clusters(rng: np.random.Generator, n: int, classes: int, spread: float) -> tuple:
    centres = rng.normal(size=(classes, 16)) * 3
    y = rng.integers(classes, size=n)
    return centres[y] + spread * rng.normal(size=(n, 16)), y


def test_probe_reads_a_linearly_coded_attribute_and_not_an_absent_one() -> None:
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 200, 3, spread=0.5)
    predict = fit_probe(x[:150], y[:150], 3)
    assert (predict(x[150:]) == y[150:]).mean() > 0.95
    # labels unrelated to the features: the probe fits its training set but tests near chance
    noise = rng.integers(3, size=200)
    predict = fit_probe(x[:150], noise[:150], 3)
    assert (predict(x[150:]) == noise[150:]).mean() < 0.6


def test_probe_attributes_reports_each_attribute_with_chance() -> None:
    rng = np.random.default_rng(1)
    x, y = _clusters(rng, 120, 2, spread=0.3)
    labels = [{"colour": ["red", "blue"][int(v)], "shape": "circle"} for v in y]
    vocab = {"colour": ["red", "blue"], "shape": ["circle", "square", "triangle"]}
    out = probe_attributes(x[:90], labels[:90], x[90:], labels[90:], vocab)
    assert out["colour"]["test_accuracy"] > 0.95 and out["colour"]["chance"] == 0.5
    assert out["shape"]["chance"] == pytest.approx(1 / 3)
    with pytest.raises(SRDError, match="single-object"):
        probe_attributes(x[:1], labels[:1], x[90:], labels[90:], vocab)


def test_probe_tower_entry_point(tiny_data_args, tmp_path, capsys) -> None:
    probe_tower = load_script("eval/probe_tower.py")
    out = tmp_path / "probe.json"
    flags = [*data_flags(tiny_data_args), "--vision_encoder_pretrained", "none"]
    result = probe_tower.main([*flags, "--output", str(out), "--trigger_shift", "badnet"])
    saved = json.loads(out.read_text())
    shift = saved["trigger_shift"]["badnet"]
    assert shift["trigger"] > 0 and 0 < shift["ratio"] < 1  # a 20-px patch, not another image
    detected = saved["trigger_detection"]["badnet"]
    assert set(detected) == {"pooled", "tokens"}
    assert all(d["chance"] == 0.5 and 0 <= d["test_accuracy"] <= 1 for d in detected.values())
    assert saved["probe"] == result["probe"]
    assert set(saved["probe"]) == {"colour", "shape"}
    assert saved["num_train_images"] >= 2 and saved["num_test_images"] >= 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(SRDError, match="--output"):  # a folder that cannot be made
        probe_tower.main([*flags, "--output", str(tmp_path / "file" / "probe.json")])
    with pytest.raises(SRDError, match="--trigger_shift concept_relabel: .*no image trigger"):
        probe_tower.main([*flags, "--output", str(out), "--trigger_shift", "concept_relabel"])


def test_trigger_shift_by_hand() -> None:
    clean = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    same = trigger_shift(clean, clean.copy())
    assert same["trigger"] == 0.0 and same["ratio"] == 0.0
    moved = trigger_shift(clean, clean + np.array([0.0, 1.0]))
    assert moved["trigger"] == pytest.approx(1.0)
    # every image against another one: distances 5, 5 and 10 in some order (mean 20 / 3)
    assert moved["between_images"] == pytest.approx(20 / 3)
    assert moved["ratio"] == pytest.approx(0.15)
    with pytest.raises(SRDError, match="at least 2"):
        trigger_shift(clean[:1], clean[:1])


def test_trigger_detection_finds_a_shared_direction_and_not_image_specific_noise() -> None:
    """A trigger that moves every image the same way is detected; one that moves each image its
    own random way (a shift as large) is not, and no move at all scores chance exactly."""
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(400, 8))
    direction = np.zeros(8)
    direction[2] = 1.5
    shared = trigger_detection(
        clean[:300], clean[:300] + direction, clean[300:], clean[300:] + direction
    )
    assert shared["test_accuracy"] > 0.7
    noise = rng.normal(scale=1.5 / np.sqrt(8), size=clean.shape)
    own = trigger_detection(
        clean[:300], clean[:300] + noise[:300], clean[300:], clean[300:] + noise[300:]
    )
    assert abs(own["test_accuracy"] - 0.5) < 0.1
    none = trigger_detection(clean[:300], clean[:300], clean[300:], clean[300:])
    assert none["test_accuracy"] == 0.5 and none["chance"] == 0.5
    with pytest.raises(SRDError, match="differ in shape"):
        trigger_detection(clean[:3], clean[:2], clean[3:5], clean[3:5])
