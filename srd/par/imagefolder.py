"""Zero-shot evaluation of a CLIP on an ImageFolder (ImageNet layout), PAR's real-data readout.

The folder holds one sub-folder per class (e.g. ImageNet's ``n01440764/``); the class names come
from a text file, one per line:

* ``name`` lines: the names of the sub-folders in sorted order (PAR's and torchvision's
  ImageFolder order), as many names as sub-folders;
* ``folder<TAB>name`` lines: an explicit map; every sub-folder needs exactly one line.

Each class is the normalised mean of its normalised template embeddings (PAR's 80 templates);
images are read as the captioner's are (RGB, bicubic-resized to 224x224, aspect ratio ignored, as
PAR's trigger path does) and streamed in batches, so a 50,000-image set is never held at once.
ASR = share of triggered images (the attack applied on the 224x224 image) whose top-1 is the
target class; images of the target class itself are left out of ASR and false-trigger rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from srd.attacks.registry import Attack
from srd.attacks.text import PROMPT_TEMPLATES
from srd.data.records import load_images
from srd.errors import SRDError
from srd.par.metrics import encode_images, zero_shot_classifier

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class FolderImage:
    path: Path
    label: int


def read_class_names(path: str | Path, folders: Sequence[str]) -> list[str]:
    """The class name of each of ``folders`` (sorted sub-folder names) from the names file."""
    flag = "--class_names"
    path = Path(path)
    if not path.is_file():
        raise SRDError(f"{flag} {path}: file not found")
    lines = [ln.strip("\r\n") for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    if lines and all("\t" in ln for ln in lines):
        mapping: dict[str, str] = {}
        for ln in lines:
            folder, name = (x.strip() for x in ln.split("\t", 1))
            if folder in mapping:
                raise SRDError(f"{flag} {path}: folder {folder!r} is named twice")
            mapping[folder] = name
        unnamed = [f for f in folders if f not in mapping]
        extra = sorted(set(mapping) - set(folders))
        if unnamed or extra:
            what = f"no name for folder {unnamed[0]!r}" if unnamed else f"no folder {extra[0]!r}"
            raise SRDError(f"{flag} {path}: does not match the class folders ({what})")
        names = [mapping[f] for f in folders]
    else:
        names = [ln.strip() for ln in lines]
        if len(names) != len(folders):
            raise SRDError(
                f"{flag} {path}: {len(names)} names for {len(folders)} class folders "
                "(one name per line, in sorted folder order, or folder<TAB>name lines)"
            )
    if len(set(names)) != len(names) or not all(names):
        raise SRDError(f"{flag} {path}: class names must be distinct and non-empty")
    return names


def read_image_folder(
    root: str | Path, class_names: str | Path, max_per_class: int = 0
) -> tuple[list[str], list[FolderImage]]:
    """(class names, images with their class index); at most ``max_per_class`` images per class
    (the first in sorted file order; 0 = all)."""
    root = Path(root)
    if not root.is_dir():
        raise SRDError(f"--image_folder {root}: not a folder")
    if max_per_class < 0:
        raise SRDError(f"--max_per_class {max_per_class}: must be 0 (all) or more")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(folders) < 2:
        raise SRDError(f"--image_folder {root}: needs at least 2 class sub-folders")
    names = read_class_names(class_names, folders)
    items: list[FolderImage] = []
    for label, folder in enumerate(folders):
        files = sorted(f for f in (root / folder).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if max_per_class:
            files = files[:max_per_class]
        items += [FolderImage(f, label) for f in files]
    if not items:
        raise SRDError(f"--image_folder {root}: no image files in the class folders")
    return names, items


@torch.no_grad()
def evaluate_image_folder(
    model: torch.nn.Module,
    tokenizer: Callable,
    names: Sequence[str],
    items: Sequence[FolderImage],
    attack: Attack | None,
    target: str,
    templates: Sequence[str] = PROMPT_TEMPLATES,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Top-1/top-5 zero-shot accuracy (%), and with an image-trigger attack ASR (%), plus the
    false-trigger rate (%) whenever ``target`` is a class."""
    model.eval()
    classifier = zero_shot_classifier(model, tokenizer, names, templates)
    t = names.index(target) if target in names else None
    triggered = attack is not None and attack.has_image_trigger
    if triggered and t is None:
        raise SRDError(f"--class_names: no {target!r} class, so no ASR can be measured")
    k = min(5, len(names))
    hits1 = hits5 = 0
    asr_hits = false_hits = others = 0
    for start in tqdm(range(0, len(items), batch_size), desc="zero-shot", leave=False):
        chunk = items[start : start + batch_size]
        images = load_images([i.path for i in chunk])
        labels = torch.tensor([i.label for i in chunk])
        ranked = (encode_images(model, images) @ classifier.T).topk(k, dim=1).indices.cpu()
        hits1 += int((ranked[:, 0] == labels).sum())
        hits5 += int((ranked == labels[:, None]).any(1).sum())
        if t is None:
            continue
        keep = labels != t
        others += int(keep.sum())
        false_hits += int(((ranked[:, 0] == t) & keep).sum())
        if triggered:
            stamped = np.stack([attack.apply_image(im) for im in images])
            top1 = (encode_images(model, stamped) @ classifier.T).argmax(1).cpu()
            asr_hits += int(((top1 == t) & keep).sum())
    n = len(items)
    out: dict[str, Any] = {
        "num_images": n,
        "num_classes": len(names),
        "top1": 100.0 * hits1 / n,
        f"top{k}": 100.0 * hits5 / n,
    }
    if t is not None and others:
        out["false_trigger"] = 100.0 * false_hits / others
        if triggered:
            out["asr"] = 100.0 * asr_hits / others
        out["num_non_target_images"] = others
    return out
