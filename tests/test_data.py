"""Loaders: Karpathy splits, COCO annotations, image files (generated benchmark and by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srd.data.benchmark import benchmark_paths, generate_benchmark
from srd.data.records import (
    IMAGE_BYTES,
    ImageStore,
    caption_records,
    check_images_exist,
    load_image,
    load_images,
    load_references,
    load_split,
)
from srd.data.scenes import SceneObject
from srd.errors import SRDError


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    generate_benchmark(root, seed=0, num_train=12, num_val=4, num_test=6)
    return root


def _split(root: Path, split: str):
    p = benchmark_paths(root)
    return load_split(p.karpathy_json, split, p.train_image_dir, p.val_image_dir)


def _write_karpathy(path: Path, images: list[dict]) -> Path:
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def _entry(cocoid: int, split: str, filepath: str = "val2014") -> dict:
    return {
        "filepath": filepath,
        "filename": f"COCO_{filepath}_{cocoid:012d}.jpg",
        "split": split,
        "cocoid": cocoid,
        "sentences": [{"raw": f"caption {k}", "sentid": cocoid * 10 + 9 - k} for k in range(2)],
    }


def test_load_split_on_benchmark(bench: Path) -> None:
    sizes = {"train": 12, "val": 4, "test": 6}
    for split, size in sizes.items():
        records = _split(bench, split)
        assert len(records) == size
        assert [r.image_id for r in records] == sorted(r.image_id for r in records)
        assert all(r.split == split and r.path.is_file() for r in records)
        folder = "train2014" if split == "train" else "val2014"
        assert all(r.path.parent.name == folder for r in records)
        for r in records:
            assert len(r.captions) == 5
            assert all(c.image_id == r.image_id for c in r.captions)
            assert [c.caption_id for c in r.captions] == sorted(c.caption_id for c in r.captions)
            assert r.objects and all(isinstance(o, SceneObject) for o in r.objects)
        check_images_exist(records)


def test_train_includes_restval_and_real_coco_has_no_objects(tmp_path: Path) -> None:
    path = _write_karpathy(
        tmp_path / "karpathy.json",
        [_entry(5, "restval"), _entry(3, "train", "train2014"), _entry(4, "test")],
    )
    records = load_split(path, "train", tmp_path / "tr", tmp_path / "va")
    assert [(r.image_id, r.split) for r in records] == [(3, "train"), (5, "restval")]
    assert records[0].path == tmp_path / "tr" / "COCO_train2014_000000000003.jpg"
    assert records[1].path == tmp_path / "va" / "COCO_val2014_000000000005.jpg"
    assert records[0].objects is None
    assert [c.caption_id for c in records[0].captions] == [38, 39]
    assert [c.caption_id for c in caption_records(records)] == [38, 39, 58, 59]


def test_load_split_errors_name_flag_file_and_split(tmp_path: Path) -> None:
    path = _write_karpathy(tmp_path / "karpathy.json", [_entry(1, "train")])
    with pytest.raises(SRDError, match=r"--coco_karpathy_json_path .*karpathy\.json.*'test'"):
        load_split(path, "test", tmp_path, tmp_path)
    with pytest.raises(SRDError, match="unknown split"):
        load_split(path, "testing", tmp_path, tmp_path)
    with pytest.raises(
        SRDError, match=r"--coco_karpathy_json_path .*nowhere\.json: file not found"
    ):
        load_split(tmp_path / "nowhere.json", "test", tmp_path, tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(SRDError, match=r"broken\.json: not valid JSON"):
        load_split(broken, "test", tmp_path, tmp_path)
    no_images = tmp_path / "no_images.json"
    no_images.write_text("[1, 2]")
    with pytest.raises(SRDError, match="no_images.json"):
        load_split(no_images, "test", tmp_path, tmp_path)
    bad_entry = _write_karpathy(tmp_path / "bad_entry.json", [{"split": "test", "cocoid": 1}])
    with pytest.raises(SRDError, match="malformed"):
        load_split(bad_entry, "test", tmp_path, tmp_path)
    duplicate = _write_karpathy(tmp_path / "dup.json", [_entry(1, "test"), _entry(1, "test")])
    with pytest.raises(SRDError, match="repeated image ids"):
        load_split(duplicate, "test", tmp_path, tmp_path)


def test_load_references_matches_split(bench: Path, tmp_path: Path) -> None:
    references = load_references(benchmark_paths(bench).annotations_json)
    records = _split(bench, "val") + _split(bench, "test")
    assert list(references) == sorted(r.image_id for r in records)
    for r in records:
        assert references[r.image_id] == [c.caption for c in r.captions]
    with pytest.raises(SRDError, match=r"--coco_annotations_json_path .*missing\.json"):
        load_references(tmp_path / "missing.json")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"annotations": []}))
    with pytest.raises(SRDError, match="no caption annotations"):
        load_references(empty)
    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps({"annotations": [{"image_id": 1}]}))
    with pytest.raises(SRDError, match="malformed"):
        load_references(malformed)


def test_load_image_reads_and_resizes(bench: Path, tmp_path: Path) -> None:
    record = _split(bench, "test")[0]
    image = load_image(record.path)
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8
    assert np.array_equal(image, np.asarray(Image.open(record.path).convert("RGB")))
    grey = tmp_path / "grey.jpg"
    Image.new("L", (100, 50), 128).save(grey)
    resized = load_image(grey)
    assert resized.shape == (224, 224, 3)
    assert np.abs(resized.astype(int) - 128).max() <= 2
    stack = load_images([record.path, grey])
    assert stack.shape == (2, 224, 224, 3)
    assert load_images([]).shape == (0, 224, 224, 3)


def test_load_image_missing_and_corrupt(bench: Path, tmp_path: Path) -> None:
    missing = tmp_path / "gone.png"
    with pytest.raises(SRDError, match=r"gone\.png: missing image file"):
        load_image(missing)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(SRDError, match=r"corrupt\.png: cannot read image"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.png"
    good = _split(bench, "val")[0].path.read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(SRDError, match=r"truncated\.png: cannot read image"):
        load_image(truncated)


def test_check_images_exist_names_first_missing(bench: Path, tmp_path: Path) -> None:
    records = _split(bench, "val")
    moved = tmp_path / "moved.png"
    records[1].path.rename(moved)
    try:
        with pytest.raises(SRDError, match=rf"{records[1].path.name}: missing image file \(1 of 4"):
            check_images_exist(records)
    finally:
        moved.rename(records[1].path)


def test_image_store_cache_is_bounded_and_least_recently_used(tiny_train_records) -> None:
    records = tiny_train_records[:5]
    ids = [r.image_id for r in records]
    store = ImageStore(records, cache_mb=3 * IMAGE_BYTES / 2**20)  # room for 3 images
    assert store.max_images == 3
    first = store(ids[0])
    assert np.array_equal(first, load_image(records[0].path))
    assert not first.flags.writeable  # a cached image is shared: painting on it would leak
    for i in ids[1:3]:
        store(i)
    assert store(ids[0]) is first  # a hit, and now the most recent
    store(ids[3])  # evicts ids[1], the least recently used
    assert store.cached() == 3
    assert store(ids[0]) is first
    assert store(ids[1]) is not None and store.cached() == 3
    none = ImageStore(records, cache_mb=0)
    assert np.array_equal(none(ids[2]), load_image(records[2].path)) and none.cached() == 0
    with pytest.raises(SRDError, match="--image_cache_mb -1"):
        ImageStore(records, cache_mb=-1)
