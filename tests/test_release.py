"""The embedded default's release files: made from a finished build, checked byte by byte,
installed only onto the data they were trained on, never over other weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from srd.captioner import release
from srd.errors import SRDError
from srd.io import file_digest

REPO = Path(__file__).resolve().parents[1]


def _build(root: Path) -> Path:
    """A finished build's layout with small stand-in files (the logic only moves bytes)."""
    src = root / "build"
    for part, names in release.SHIPPED.items():
        (src / part).mkdir(parents=True)
        for name in names:
            (src / part / name).write_text(f"{part}/{name}\n")
        (src / part / "DONE").write_text("done\n")
        (src / part / "checkpoint_0.pt").write_text("not shipped\n")
    (src / "pretrain" / "pretrain_report.json").write_text(json.dumps({
        "model": {"CIDEr": 2.0, "attribute_accuracy": 0.6},
        "blind": {"CIDEr": 0.1, "attribute_accuracy": 0.2},
        "cider_ratio": 20.0,
    }))  # fmt: skip
    (src / "clip" / "clip_report.json").write_text(json.dumps({"loss": 1.5, "by": {"x": 1}}))
    (src / "clean" / "lm").mkdir(parents=True)
    for name in ("vision.safetensors", "checkpoint.pt", "lm/config.json"):
        (src / "clean" / name).write_text(f"clean/{name}\n")
    return src


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, Path, Path]:
    data = tmp_path / "data"
    (data / "train2014").mkdir(parents=True)
    Image.new("RGB", (224, 224), "red").save(data / "train2014" / "a.png")
    (data / "dataset_coco.json").write_text("{}")
    out = tmp_path / "release"
    release.make(_build(tmp_path), data, out)
    return out, data, tmp_path / "installed"


def test_make_ships_the_weights_and_reports_with_their_digests(made) -> None:
    out, data, _ = made
    manifest = json.loads((out / release.MANIFEST).read_text())
    assert set(manifest["files"]) == {
        "clip/clip.safetensors", "clip/open_clip_config.json", "clip/clip_report.json",
        "clip/config.json", "pretrain/pretrain_report.json", "pretrain/config.json",
        "clean/vision.safetensors", "clean/checkpoint.pt", "clean/lm/config.json",
    }  # fmt: skip
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == file_digest(out / name)
    assert manifest["data_sha256"] == release.data_digest(data)
    assert manifest["metrics"]["cider_ratio"] == 20.0
    assert manifest["metrics"]["clip_report"] == {"loss": 1.5}
    with pytest.raises(SRDError, match="exists"):
        release.make(out.parent / "build", data, out)


def test_install_copies_marks_the_runs_finished_and_is_idempotent(made) -> None:
    out, data, dest = made
    _, copied = release.install(out, dest, data)
    assert copied
    assert (dest / "clip" / "DONE").is_file() and (dest / "pretrain" / "DONE").is_file()
    assert (dest / "clean" / "lm" / "config.json").read_text() == "clean/lm/config.json\n"
    assert not list(dest.glob(".*.tmp"))
    stamp = (dest / "clean" / "checkpoint.pt").stat().st_mtime_ns
    _, copied = release.install(out, dest, data)
    assert not copied and (dest / "clean" / "checkpoint.pt").stat().st_mtime_ns == stamp


def test_a_damaged_release_file_is_refused(made) -> None:
    out, data, dest = made
    (out / "clean" / "checkpoint.pt").write_text("truncated")
    with pytest.raises(SRDError, match="checkpoint.pt: sha256 differs"):
        release.install(out, dest, data)
    assert not dest.exists()


def test_other_benchmark_data_is_refused(made) -> None:
    out, data, dest = made
    Image.new("RGB", (224, 224), "blue").save(data / "train2014" / "a.png")
    with pytest.raises(SRDError, match="not the benchmark the released models were trained on"):
        release.install(out, dest, data)
    assert not dest.exists()


def test_other_weights_are_never_replaced_without_overwrite(made) -> None:
    out, data, dest = made
    release.install(out, dest, data)
    (dest / "clean" / "checkpoint.pt").write_text("retrained")
    with pytest.raises(SRDError, match="holds other weights .*--overwrite"):
        release.install(out, dest, data)
    assert (dest / "clean" / "checkpoint.pt").read_text() == "retrained"
    release.install(out, dest, data, overwrite=True)
    assert (dest / "clean" / "checkpoint.pt").read_text() == "clean/checkpoint.pt\n"


def test_the_shipped_release_matches_its_manifest() -> None:
    """release/embedded as committed: every file has its recorded sha256 (a damaged or LFS
    pointer copy fails here) and nothing else is in the folder."""
    manifest = release.verify(REPO / release.RELEASE_DIR)
    assert manifest["metrics"]["cider_ratio"] >= 10
    assert manifest["metrics"]["attribute_accuracy"] >= 0.55
