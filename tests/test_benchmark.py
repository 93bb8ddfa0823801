"""Synthetic benchmark: determinism, captions that match the pixels, COCO-like files, scoring."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from srd_fixtures import run_entry_point

from srd.captions import words
from srd.data.attributes import (
    attribute_accuracy,
    blind_caption,
    images_showing,
    mentioned_pairs,
    object_pairs,
    scene_index,
)
from srd.data.benchmark import benchmark_paths, generate_benchmark
from srd.data.records import CaptionRecord, ImageRecord, load_split
from srd.data.scenes import BACKGROUNDS, COLOURS, SceneObject, sample_scene, scene_captions
from srd.errors import SRDError

SIZES = {"num_train": 12, "num_val": 4, "num_test": 6}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    generate_benchmark(root, seed=0, **SIZES)
    return root


def _karpathy(root: Path) -> dict:
    return json.loads((root / "dataset_coco.json").read_text())


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((np.array(palette[name]) - rgb) ** 2)))


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files(bench: Path, tmp_path: Path) -> None:
    generate_benchmark(tmp_path, seed=0, **SIZES)
    names = [
        "dataset_coco.json",
        "captions_val2014.json",
        "captions_train2014.json",
        "benchmark.json",
    ]
    for name in names:
        assert (tmp_path / name).read_bytes() == (bench / name).read_bytes(), name
    pngs = sorted(p.relative_to(bench) for p in bench.glob("*2014/*.png"))
    assert len(pngs) == sum(SIZES.values())
    for rel in pngs:
        assert (tmp_path / rel).read_bytes() == (bench / rel).read_bytes(), rel


def test_different_seed_gives_different_benchmark(bench: Path, tmp_path: Path) -> None:
    generate_benchmark(tmp_path, seed=1, **SIZES)
    assert _karpathy(tmp_path)["images"] != _karpathy(bench)["images"]
    pngs = sorted(p.relative_to(bench) for p in bench.glob("*2014/*.png"))
    differing = sum((tmp_path / rel).read_bytes() != (bench / rel).read_bytes() for rel in pngs)
    assert differing >= len(pngs) - 1


def test_split_contents_do_not_depend_on_other_split_sizes(bench: Path, tmp_path: Path) -> None:
    generate_benchmark(tmp_path, seed=0, num_train=3, num_val=4, num_test=6)
    small = {im["cocoid"]: im for im in _karpathy(tmp_path)["images"]}
    for im in _karpathy(bench)["images"]:
        if im["split"] != "train" or im["cocoid"] in small:
            other = small[im["cocoid"]]
            assert other["sentences"][0]["raw"] == im["sentences"][0]["raw"]
            assert other["objects"] == im["objects"]


# --------------------------------------------------------------------------- content


def test_pixels_match_the_described_objects(bench: Path) -> None:
    for im in _karpathy(bench)["images"]:
        pixels = np.asarray(Image.open(bench / im["filepath"] / im["filename"]))
        assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
        covered = np.zeros((224, 224), dtype=bool)
        for obj in im["objects"]:
            o = SceneObject.from_dict(obj)
            left, top, right, bottom = o.bbox
            covered[top:bottom, left:right] = True
            x, y = o.centre
            assert _nearest(pixels[y, x], COLOURS | BACKGROUNDS) == o.colour
            # The shape's outline, told apart by its bbox corners.
            top_left = _nearest(pixels[top, left], COLOURS | BACKGROUNDS)
            bottom_left = _nearest(pixels[bottom - 1, left], COLOURS | BACKGROUNDS)
            if o.shape == "square":
                assert top_left == bottom_left == o.colour
            elif o.shape == "circle":
                assert top_left == bottom_left == im["background"]
            else:
                assert (top_left, bottom_left) == (im["background"], o.colour)
        ys, xs = np.nonzero(~covered)
        assert _nearest(pixels[ys[0], xs[0]], COLOURS | BACKGROUNDS) == im["background"]
        assert im["background"] not in COLOURS


def test_every_caption_names_every_object(bench: Path) -> None:
    for im in _karpathy(bench)["images"]:
        truth = object_pairs(im["objects"])
        assert 1 <= len(im["objects"]) <= 3
        assert len(truth) == len(im["objects"])
        assert len(im["sentences"]) == 5
        for sentence in im["sentences"]:
            assert mentioned_pairs(sentence["raw"]) == truth, sentence["raw"]
            assert sentence["tokens"] == words(sentence["raw"])


def test_target_word_never_in_clean_captions(bench: Path) -> None:
    texts = [
        (bench / n).read_text().lower() for n in ("dataset_coco.json", "captions_val2014.json")
    ]
    assert all("banana" not in text for text in texts)
    rng = np.random.default_rng(0)
    for _ in range(300):
        for caption in scene_captions(sample_scene(rng), rng, 7):
            assert "banana" not in caption.lower()


def test_karpathy_json_has_requested_splits_and_unique_ids(bench: Path) -> None:
    data = _karpathy(bench)
    assert data["dataset"] == "coco"
    counts = Counter(im["split"] for im in data["images"])
    assert counts == {"train": 12, "val": 4, "test": 6}
    cocoids = [im["cocoid"] for im in data["images"]]
    sentids = [s["sentid"] for im in data["images"] for s in im["sentences"]]
    assert len(set(cocoids)) == len(cocoids)
    assert len(set(sentids)) == len(sentids)
    for position, im in enumerate(data["images"]):
        assert im["imgid"] == position
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        assert im["filepath"] == ("train2014" if im["split"] == "train" else "val2014")
        assert im["filename"] == f"SYN_{im['filepath']}_{im['cocoid']:012d}.png"
        assert (bench / im["filepath"] / im["filename"]).is_file()


def test_annotations_match_val_and_test(bench: Path) -> None:
    data = _karpathy(bench)
    annotations = json.loads((bench / "captions_val2014.json").read_text())
    assert annotations["type"] == "captions" and annotations["licenses"] == []
    expected = {
        (im["cocoid"], s["sentid"], s["raw"])
        for im in data["images"]
        if im["split"] in ("val", "test")
        for s in im["sentences"]
    }
    got = {(a["image_id"], a["id"], a["caption"]) for a in annotations["annotations"]}
    assert got == expected
    image_ids = {i["id"] for i in annotations["images"]}
    assert image_ids == {im["cocoid"] for im in data["images"] if im["split"] != "train"}
    assert all(i["height"] == i["width"] == 224 for i in annotations["images"])


# --------------------------------------------------------------------------- re-runs


def test_rerun_is_noop_and_other_config_refused(
    bench: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = bench / "benchmark.json"
    before = marker.stat().st_mtime_ns
    with caplog.at_level("INFO"):
        generate_benchmark(bench, seed=0, **SIZES)
    assert "nothing to do" in caplog.text
    assert marker.stat().st_mtime_ns == before
    with pytest.raises(SRDError, match="--overwrite"):
        generate_benchmark(bench, seed=3, **SIZES)


def test_overwrite_replaces_and_drops_stale_images(tmp_path: Path) -> None:
    generate_benchmark(tmp_path, seed=0, **SIZES)
    generate_benchmark(tmp_path, seed=0, num_train=5, num_val=2, num_test=2, overwrite=True)
    assert len(list((tmp_path / "train2014").glob("*.png"))) == 5
    assert len(list((tmp_path / "val2014").glob("*.png"))) == 4
    assert json.loads((tmp_path / "benchmark.json").read_text())["config"]["num_train"] == 5


@pytest.mark.parametrize("bad", [{"num_train": 0}, {"num_test": -1}, {"captions_per_image": 2}])
def test_bad_sizes_raise_naming_the_flag(tmp_path: Path, bad: dict) -> None:
    flag = next(iter(bad))
    with pytest.raises(SRDError, match=f"--{flag}"):
        generate_benchmark(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- scoring


def _objs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"colour": c, "shape": s, "size": "small", "position": "top"} for c, s in pairs]


def test_mentioned_pairs_rule() -> None:
    assert mentioned_pairs("a small red circle in the top left corner.") == {("red", "circle")}
    assert mentioned_pairs("A red large Circle and two blue squares") == {
        ("red", "circle"),
        ("blue", "square"),
    }
    assert mentioned_pairs("red and blue circles") == {("blue", "circle")}
    assert mentioned_pairs("a red thing that is a circle") == set()
    assert mentioned_pairs("a grey background with a green triangle") == {("green", "triangle")}


def _hand_objects() -> dict:
    return {
        1: _objs(("red", "circle"), ("blue", "square")),
        2: _objs(("red", "circle"), ("blue", "square")),
        3: _objs(("green", "triangle")),
        4: _objs(("yellow", "square")),
    }


def test_attribute_accuracy_hand_cases() -> None:
    objects = _hand_objects()
    predictions = {
        1: "a red circle and a blue square on a grey background.",  # correct
        2: "a small red circle.",  # missing object
        3: "a large orange triangle.",  # wrong colour
        4: "a yellow square and a purple circle.",  # extra object
    }
    assert attribute_accuracy(predictions, objects) == pytest.approx(0.25)
    assert attribute_accuracy({1: predictions[1], 3: "a green triangle."}, objects) == 1.0
    with pytest.raises(SRDError, match="99"):
        attribute_accuracy({99: "a red circle."}, objects)
    with pytest.raises(SRDError):
        attribute_accuracy({}, objects)


def test_attribute_breakdown_by_object_count_and_cut_captions() -> None:
    from srd.data.attributes import attribute_breakdown

    objects = _hand_objects()
    predictions = {
        1: "a red circle and a blue square on a grey background.",  # correct
        2: "a large red circle and a large blue",  # cut off by the decoding length
        3: "a green triangle.",  # correct
        4: "a yellow circle.",  # wrong shape
    }
    assert attribute_breakdown(predictions, objects) == {
        "1": {"num_images": 2, "attribute_accuracy": 0.5, "unfinished": 0.0},
        "2": {"num_images": 2, "attribute_accuracy": 0.5, "unfinished": 0.5},
    }


def test_colour_recall_counts_images_showing_a_colour_and_captions_naming_it() -> None:
    from srd.data.attributes import colour_recall

    objects = _hand_objects()
    predictions = {
        1: "a blue square on a grey background.",  # shows red and blue: names blue only
        2: "a large red circle and a large blue",  # cut before the shape: blue not named
        3: "a green triangle.",
        4: "a red triangle.",  # shows yellow: names red
    }
    recall = colour_recall(predictions, objects)
    assert recall["red"] == {"num_images": 2, "recall": 0.5}
    assert recall["blue"] == {"num_images": 2, "recall": 0.5}
    assert recall["green"] == {"num_images": 1, "recall": 1.0}
    assert recall["yellow"] == {"num_images": 1, "recall": 0.0}
    assert recall["purple"] == {"num_images": 0, "recall": None}


def test_object_errors_classify_every_shown_pair() -> None:
    from srd.data.attributes import object_errors

    objects = _hand_objects()  # 6 shown pairs
    predictions = {
        1: "a red triangle and a blue square.",  # red circle: wrong shape; blue square named
        2: "a green circle.",  # red circle: wrong colour; blue square: missing; green: extra
        3: "a green triangle.",  # named
        4: "a yellow square and a purple circle.",  # named; purple circle: extra
    }
    errors = object_errors(predictions, objects)
    assert errors["num_pairs"] == 6
    assert errors["named"] == pytest.approx(3 / 6)
    assert errors["wrong_shape"] == errors["wrong_colour"] == errors["missing"] == 1 / 6
    assert errors["extra"] == pytest.approx(3 / 6)  # red triangle, green circle, purple circle


def test_attributes_entry_point_scores_a_report_and_refuses_other_images(
    tiny_data_args, tiny_test_records, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    from srd_fixtures import load_script

    from srd.cli import run_main
    from srd.data.attributes import attribute_breakdown, scene_index

    attributes = load_script("eval/attributes.py")
    flags = [
        "--coco_train_image_dir_path", tiny_data_args.coco_train_image_dir_path,
        "--coco_val_image_dir_path", tiny_data_args.coco_val_image_dir_path,
        "--coco_karpathy_json_path", tiny_data_args.coco_karpathy_json_path,
        "--coco_annotations_json_path", tiny_data_args.coco_annotations_json_path,
    ]  # fmt: skip
    first = {r.image_id: r.captions[0].caption for r in tiny_test_records}
    report = tmp_path / "result.json"
    report.write_text(json.dumps({"predictions": {"clean": {str(k): v for k, v in first.items()}}}))
    out = tmp_path / "attributes.json"
    result = attributes.main([*flags, "--predictions", str(report), "--output", str(out)])
    assert result["attribute_accuracy"] == 1.0  # a reference caption names every object
    assert json.loads(out.read_text())["by_object_count"] == attribute_breakdown(
        first, scene_index(tiny_test_records)
    )
    report.write_text(json.dumps({"predictions": {"123": "a red circle."}}))
    with pytest.raises(SystemExit) as exc:
        run_main(attributes.main, [*flags, "--predictions", str(report), "--output", str(out)])
    assert exc.value.code == 2
    assert "without a benchmark scene" in capsys.readouterr().err


def test_result_captions_reads_both_layouts_and_refuses_other_keys() -> None:
    """srd.evaluation.captioning.result_captions, read by eval/attributes.py and the defense
    report: an evaluation result's clean or triggered captions, a pretrain report's flat
    predictions."""
    from srd.evaluation.captioning import result_captions

    result = {"predictions": {"clean": {"7": "a red circle."}, "triggered": {"7": "banana"}}}
    assert result_captions(result) == {7: "a red circle."}
    assert result_captions(result, "triggered") == {7: "banana"}
    assert result_captions({"predictions": {"3": "a blue square."}}) == {3: "a blue square."}
    untriggered = {"predictions": {"clean": {"7": "a red circle."}, "triggered": None}}
    assert result_captions(untriggered, "triggered") is None
    for bad in ({}, [], {"predictions": {}}, {"predictions": {"x7": "a red circle."}}):
        assert result_captions(bad) is None


def test_blind_caption_is_most_common_with_deterministic_ties() -> None:
    def record(image_id: int, *captions: str) -> ImageRecord:
        caps = tuple(CaptionRecord(image_id * 10 + k, image_id, c) for k, c in enumerate(captions))
        return ImageRecord(image_id, Path(f"{image_id}.png"), "train", caps, None)

    images = [record(1, "b circle.", "a circle"), record(2, "A circle.", "b circle.")]
    assert blind_caption(images) == "a circle."  # 2-2 tie, "a circle." sorts first
    assert blind_caption(images + [record(3, "b circle.")]) == "b circle."


def test_scene_lookups(bench: Path) -> None:
    paths = benchmark_paths(bench)
    records = load_split(paths.karpathy_json, "train", paths.train_image_dir, paths.val_image_dir)
    scenes = scene_index(records)
    red = images_showing(scenes, colour="red")
    red_circles = images_showing(scenes, "red", "circle")
    assert set(red_circles) <= set(red)
    for image_id, objs in scenes.items():
        has = any(o.colour == "red" and o.shape == "circle" for o in objs)
        assert (image_id in red_circles) == has
    with pytest.raises(SRDError, match="pink"):
        images_showing(scenes, colour="pink")
    blind = json.loads(paths.config_json.read_text())["blind_caption"]
    assert blind == blind_caption(records)


# --------------------------------------------------------------------------- entry point


def test_prepare_data_entry_point(tmp_path: Path, capsys) -> None:
    out = tmp_path / "syn"
    argv = ["--out_dir", str(out), "--num_train", "6", "--num_val", "2", "--num_test", "3"]
    code, _, err = run_entry_point("train/prepare_data.py", argv, capsys)
    assert code == 0, err
    assert Counter(im["split"] for im in _karpathy(out)["images"]) == {
        "train": 6,
        "val": 2,
        "test": 3,
    }
    argv = ["--out_dir", str(tmp_path / "bad"), "--num_train", "0"]
    code, _, err = run_entry_point("train/prepare_data.py", argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--num_train" in lines[0]
    assert not (tmp_path / "bad").exists()
