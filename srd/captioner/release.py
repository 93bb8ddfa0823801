"""The embedded default's pretrained models as release files.

The tiny CLIP and the clean tiny captioner are the same for every attack and replicate, and
training them takes ~20 minutes on two cores. They are made once by the project's own commands
(``train/pretrain_clip.py`` then ``train/pretrain.py``, as README command 1 ran them before),
shipped in ``release/embedded/`` with a manifest, and installed into
``checkpoints_remote/embedded/`` by README command 1 (``RETRAIN=1`` trains them from scratch).

The manifest holds every file's sha256 and size, the digest of the benchmark data the models
were trained on, the commit and commands that made them (each run folder's ``config.json`` is
shipped beside its weights) and the pretraining reports' headline metrics. ``install`` refuses,
with one line, a release file whose bytes differ from the manifest, benchmark data other than
the training data, and a destination that holds other weights (a retrained model is never
overwritten without ``--overwrite``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from srd.data.records import load_image
from srd.errors import SRDError
from srd.io import file_digest, mark_finished, read_json, write_json

RELEASE_DIR = Path("release/embedded")
INSTALL_DIR = Path("checkpoints_remote/embedded")
MANIFEST = "MANIFEST.json"
PARTS = ("clip", "pretrain", "clean")
"""Folders under ``INSTALL_DIR``: the tiny CLIP's run, the captioner's run, the exported model."""
SHIPPED = {
    "clip": ("clip.safetensors", "open_clip_config.json", "clip_report.json", "train.log"),
    "pretrain": ("pretrain_report.json", "config.json", "train.log", "train_log.jsonl"),
}
"""The run folders' files a release keeps (the clean export is shipped whole)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def data_digest(data_dir: str | os.PathLike) -> str:
    """sha256 over the benchmark folder: every file's name, the JSON files' bytes and the
    images' pixels (not their PNG bytes, which another zlib may write differently); logs left
    out."""
    root = Path(data_dir)
    if not root.is_dir():
        raise SRDError(f"{root}: benchmark folder not found (run train/prepare_data.py first)")
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".log"):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            digest.update(hashlib.sha256(load_image(path).tobytes()).digest())
        else:
            digest.update(bytes.fromhex(file_digest(path)))
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        p.relative_to(folder).as_posix(): {"sha256": file_digest(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(git("status", "-s", "--untracked-files=no")),
    }


def _command(run_dir: Path) -> str:
    """The command that made a run folder, from its ``once`` stamp (run/run_embedded.sh)."""
    stamp = run_dir / "DONE.stamp"
    if not stamp.is_file():
        return f"(no stamp in {run_dir.name}/: made outside run/run_embedded.sh)"
    return "python " + " ".join(read_json(stamp)["command"])


def _headline(source: Path) -> dict[str, Any]:
    report = read_json(source / "pretrain" / "pretrain_report.json")
    clip = read_json(source / "clip" / "clip_report.json")
    return {
        "clean_cider": report["model"]["CIDEr"],
        "blind_cider": report["blind"]["CIDEr"],
        "cider_ratio": report["cider_ratio"],
        "attribute_accuracy": report["model"]["attribute_accuracy"],
        "blind_attribute_accuracy": report["blind"]["attribute_accuracy"],
        "clip_zero_shot": clip["zero_shot"],
    }


def make(source: Path, data_dir: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Copy a finished build (``source`` = checkpoints_remote/embedded) into the release folder
    ``out`` with its manifest; returns the manifest."""
    for part in ("clip", "pretrain"):
        if not (source / part / "DONE").is_file():
            raise SRDError(f"{source / part}: not a finished run (train the embedded models first)")
    if out.exists() and not overwrite:
        raise SRDError(f"{out}: exists (pass --overwrite to replace the release)")
    staged = out.with_name(out.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    for part, names in SHIPPED.items():
        (staged / part).mkdir(parents=True)
        for name in names:
            shutil.copy2(source / part / name, staged / part / name)
    shutil.copytree(source / "clean", staged / "clean")
    manifest = {
        "what": "the embedded default's tiny CLIP and clean captioner (srd/captioner/release.py)",
        "made_by": {
            **_commit(),
            "commands": [
                "python train/prepare_data.py --out_dir data/synthetic --seed 0",
                *(_command(source / part) for part in ("clip", "pretrain")),
            ],
            "configs": "clip/clip_report.json ('config'), pretrain/config.json",
        },
        "data_sha256": data_digest(data_dir),
        "metrics": _headline(source),
        "files": _files(staged),
    }
    write_json(staged / MANIFEST, manifest)
    if out.exists():
        shutil.rmtree(out)
    staged.rename(out)
    return manifest


def verify(release: Path) -> dict[str, Any]:
    """The manifest, once every release file has its recorded bytes (SRDError otherwise)."""
    path = release / MANIFEST
    if not path.is_file():
        raise SRDError(f"{path}: no release manifest (RETRAIN=1 trains the models instead)")
    manifest = read_json(path)
    found = _files(release)
    for name, want in manifest["files"].items():
        if name not in found:
            raise SRDError(f"{release / name}: missing from the release")
        if found[name]["sha256"] != want["sha256"]:
            raise SRDError(
                f"{release / name}: sha256 differs from {path} (a damaged or partial copy; "
                "restore it from git, or RETRAIN=1)"
            )
    extra = sorted(set(found) - set(manifest["files"]))
    if extra:
        raise SRDError(f"{release / extra[0]}: not in {path} (a release holds only its files)")
    return manifest


def installed(dest: Path, manifest: dict[str, Any]) -> bool | None:
    """True when ``dest`` holds exactly the release's files, None when it holds none of them,
    False when it holds anything else."""
    present = [part for part in PARTS if (dest / part).exists()]
    if not present:
        return None
    for name, want in manifest["files"].items():
        path = dest / name
        if not path.is_file() or file_digest(path) != want["sha256"]:
            return False
    return True


def install(
    release: Path, dest: Path, data_dir: Path, overwrite: bool = False
) -> tuple[dict[str, Any], bool]:
    """Install the release into ``dest``; returns the manifest and whether anything was copied."""
    manifest = verify(release)
    if data_digest(data_dir) != manifest["data_sha256"]:
        raise SRDError(
            f"{data_dir}: not the benchmark the released models were trained on (its digest "
            f"differs from {release / MANIFEST}); run with RETRAIN=1 to train them on it"
        )
    state = installed(dest, manifest)
    if state is True and all((dest / p / "DONE").is_file() for p in SHIPPED):
        return manifest, False
    if state is False and not overwrite:
        held = next(dest / p for p in PARTS if (dest / p).exists())
        raise SRDError(
            f"{held}: holds other weights than {release} (retrained?); pass --overwrite to "
            "replace them with the release, or keep them with RETRAIN=1"
        )
    for part in PARTS:
        staged = dest / f".{part}.tmp"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(release / part, staged)
        if part in SHIPPED:
            mark_finished(staged)
        shutil.rmtree(dest / part, ignore_errors=True)
        staged.rename(dest / part)
    if installed(dest, manifest) is not True:
        raise SRDError(f"{dest}: the installed files differ from {release / MANIFEST}")
    return manifest, True
