"""Shadowcast's poison images: feature collision against the frozen vision tower.

Xu et al. (NeurIPS 2024), as we read its feature-collision objective: each poison image x_p
starts from an image x_d of the destination concept and solves

    min_{x_p} || F(x_p) - F(x_o) ||_2   subject to   || x_p - x_d ||_inf <= epsilon,

where F is the vision encoder whose output the VLM reads and x_o an image of the origin concept
paired with x_d. Here F is exactly what the captioner reads: the frozen tower's patch tokens
(:func:`srd.captioner.vision.tower_tokens`) after the captioner's own pixel normalisation. The
solver is ours: projected gradient descent with sign steps of 2.5 * epsilon / steps (Madry et
al.'s rule) and the step count of the config. Each poison is
rounded to uint8 inside the budget, so the training set holds exactly what was measured.

The attack stage writes the poisons to ``crafted_poisons.npz`` beside ``poison_ids.json``; every
later stage rebuilds the defender's data from that file (:func:`load_crafted`), whose sha256 the
poison plan records.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

from srd.attacks.attack import Attack
from srd.captioner.features import image_key
from srd.captioner.vision import tower_tokens
from srd.data.records import ImageRecord, ImageStore
from srd.errors import SRDError
from srd.io import atomic_path, file_digest

log = logging.getLogger(__name__)

CRAFTED_FILE = "crafted_poisons.npz"
"""The attack run's crafted poison images, beside its poison_ids.json."""

Encoder = Callable[[torch.Tensor], torch.Tensor]
"""Pixels in [0, 1], (B, 3, H, W) -> the tower tokens the captioner reads, differentiably."""


PASS_THROUGH = ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb")
"""Image-transform steps that leave a float RGB tensor in [0, 1] as it is."""


def tower_encoder(captioner: Any) -> Encoder:
    """F of the objective for a :class:`srd.captioner.flamingo.Captioner`: its image transform's
    resize, crop and normalisation on tensors, then its frozen tower's tokens. Checked on an
    image against the captioner's own (PIL) path: identical for 224-px towers; within 5% for
    towers of another size (PIL's and torch's bicubic resize differ slightly)."""
    steps = list(getattr(captioner.image_transform, "transforms", []))
    kept = [t for t in steps if isinstance(t, (T.Resize, T.CenterCrop, T.Normalize))]
    other = [
        t
        for t in steps
        if t not in kept and getattr(t, "__name__", type(t).__name__) not in PASS_THROUGH
    ]
    if other or sum(isinstance(t, T.Normalize) for t in kept) != 1:
        raise SRDError(f"shadowcast crafting: cannot differentiate the image transform {steps}")
    tower = captioner.model.vision_encoder
    param = next(tower.parameters())
    pipeline = T.Compose(kept)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return tower_tokens(tower, pipeline(pixels.to(param.device, param.dtype)))

    probe = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        theirs = captioner._encode_tokens(list(probe))
        gap, scale = (encode(to_unit(probe)) - theirs).norm(), theirs.norm()
    if not gap <= 0.05 * scale:
        raise SRDError(
            "shadowcast crafting: the differentiable image transform does not reproduce the "
            f"captioner's (token gap {float(gap / scale):.1%}); crafting would not see what "
            "training sees"
        )
    return encode


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def _distance(encode: Encoder, a: np.ndarray, b: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return (encode(to_unit(a)) - b).flatten(1).norm(dim=1).cpu().numpy()


def collide(
    encode: Encoder,
    bases: np.ndarray,
    targets: np.ndarray,
    epsilon: float,
    steps: int,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Solve the objective for each (base, target) pair of uint8 (N, H, W, 3) images.

    Returns the uint8 poisons (every pixel within ``floor(epsilon)`` levels of its base) and the
    per-image feature distances ``before`` (base to target), ``after`` (poison to target).
    """
    if bases.shape != targets.shape or bases.dtype != np.uint8 or targets.dtype != np.uint8:
        raise SRDError("shadowcast crafting: bases and targets must be uint8 arrays of one shape")
    levels = int(np.floor(epsilon))
    bound, step = levels / 255.0, 2.5 * levels / 255.0 / steps
    out = np.empty_like(bases)
    before, after = np.empty(len(bases)), np.empty(len(bases))
    for start in range(0, len(bases), batch_size):
        part = slice(start, start + batch_size)
        base = to_unit(bases[part])
        with torch.no_grad():
            goal = encode(to_unit(targets[part]))
        delta = torch.zeros_like(base)
        for _ in range(steps if levels else 0):
            delta.requires_grad_(True)
            loss = (encode(base + delta) - goal).pow(2).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = (delta - step * grad.sign()).clamp(-bound, bound)
                delta = (base + delta).clamp(0.0, 1.0) - base
        crafted = np.rint((base + delta.detach()).permute(0, 2, 3, 1).numpy() * 255.0)
        low = bases[part].astype(np.int16) - levels
        crafted = np.clip(crafted, low, low + 2 * levels).clip(0, 255).astype(np.uint8)
        out[part] = crafted
        before[part] = _distance(encode, bases[part], goal)
        after[part] = _distance(encode, crafted, goal)
        if progress is not None:
            progress(min(start + batch_size, len(bases)))
    return out, {"before": before, "after": after}


@dataclass
class CraftedPoisons:
    """The crafted images of one attack run, by poisoned image id, with their origin pairs."""

    image_ids: list[int]
    origin_ids: list[int]
    images: np.ndarray
    clean_keys: list[bytes]
    """:func:`srd.captioner.features.image_key` of each clean image a poison replaces."""
    epsilon: float
    steps: int
    stats: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> str:
        """Write the npz atomically; returns its sha256."""
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(
                handle,
                image_ids=np.asarray(self.image_ids, dtype=np.int64),
                origin_ids=np.asarray(self.origin_ids, dtype=np.int64),
                images=self.images,
                clean_keys=np.frombuffer(b"".join(self.clean_keys), dtype=np.uint8).reshape(
                    len(self.clean_keys), -1
                ),
                epsilon=np.float64(self.epsilon),
                steps=np.int64(self.steps),
                stat_names=np.asarray(sorted(self.stats)),
                stat_values=np.asarray([self.stats[k] for k in sorted(self.stats)]),
            )
        return file_digest(path)

    def table(self) -> dict[bytes, np.ndarray]:
        """Crafted image by the content key of the clean image it replaces."""
        return dict(zip(self.clean_keys, self.images, strict=True))


def load_crafted(path: str | os.PathLike, sha256: str | None = None) -> CraftedPoisons:
    """Read a file written by :meth:`CraftedPoisons.save`; SRDError if missing, unreadable or
    (given ``sha256``) not the file the poison plan recorded."""
    path = Path(path)
    if not path.is_file():
        raise SRDError(
            f"{path}: the crafted Shadowcast poisons are missing (made by the attack stage)"
        )
    if sha256 is not None and file_digest(path) != sha256:
        raise SRDError(f"{path}: not the crafted poisons the poison plan recorded (sha256 differs)")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = [str(n) for n in data["stat_names"]]
            return CraftedPoisons(
                image_ids=[int(i) for i in data["image_ids"]],
                origin_ids=[int(i) for i in data["origin_ids"]],
                images=data["images"],
                clean_keys=[bytes(row) for row in data["clean_keys"]],
                epsilon=float(data["epsilon"]),
                steps=int(data["steps"]),
                stats=dict(zip(names, map(float, data["stat_values"]), strict=True)),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise SRDError(f"{path}: not a crafted-poisons file ({exc})") from None


def pair_origins(origin_pool: Sequence[int], count: int, seed: int) -> list[int]:
    """``count`` origin image ids drawn for the poisons (without replacement while the pool
    lasts), by a seeded generator."""
    if not origin_pool:
        raise SRDError("shadowcast: no training image shows the origin concept alone")
    pool = sorted(origin_pool)
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(pool, size=count, replace=count > len(pool))]


def craft_poisons(
    encode: Encoder,
    attack: Attack,
    poisoned_images: Sequence[int],
    origin_pool: Sequence[int],
    clean: Callable[[int], np.ndarray],
    seed: int,
) -> CraftedPoisons:
    """Craft one poison per poisoned image id against a seeded origin partner; log progress."""
    ids = sorted(poisoned_images)
    origins = pair_origins(origin_pool, len(ids), seed)
    bases = np.stack([clean(i) for i in ids])
    targets = np.stack([clean(i) for i in origins])
    eps, steps = float(attack.config.craft_epsilon), int(attack.config.craft_steps)
    log.info("crafting %d Shadowcast poisons (%g/255, %d steps)", len(ids), eps, steps)
    images, dist = collide(
        encode,
        bases,
        targets,
        eps,
        steps,
        progress=lambda n: log.info("crafted %d/%d", n, len(ids)),
    )
    spread = _origin_spread(encode, targets, origins, clean, origin_pool, seed)
    ratio = dist["after"] / np.maximum(dist["before"], 1e-12)
    stats = {
        "distance_before_mean": float(dist["before"].mean()),
        "distance_after_mean": float(dist["after"].mean()),
        "distance_ratio_mean": float(ratio.mean()),
        "origin_spread_mean": spread,
        "max_pixel_change": float(np.abs(images.astype(np.int16) - bases).max()),
    }
    log.info("feature collision: %s", {k: round(v, 4) for k, v in stats.items()})
    keys = [image_key(im) for im in bases]
    return CraftedPoisons(ids, origins, images, keys, eps, steps, stats)


def _origin_spread(
    encode: Encoder,
    targets: np.ndarray,
    target_ids: Sequence[int],
    clean: Callable[[int], np.ndarray],
    origin_pool: Sequence[int],
    seed: int,
    count: int = 32,
) -> float:
    """Mean feature distance from an origin target to another origin image: the scale on which
    a poison's distance to its target says 'looks like the origin concept'."""
    drawn = pair_origins(origin_pool, min(count, len(targets)), seed + 1)
    pairs = [k for k, other in enumerate(drawn) if other != target_ids[k]]
    if not pairs:
        return float("nan")
    with torch.no_grad():
        goal = encode(to_unit(targets[pairs]))
    return float(_distance(encode, np.stack([clean(drawn[k]) for k in pairs]), goal).mean())


def crafted_for_run(
    encode: Callable[[], Encoder],
    attack: Attack,
    plan_meta: dict[str, Any],
    records: Sequence[ImageRecord],
    seed: int,
    run_dir: Path,
    reuse: bool,
    recorded_sha: str | None = None,
) -> Attack:
    """The attack stage's crafted poisons: read back from ``run_dir`` when ``reuse`` (a resumed
    run; they must be for the same images, budget and steps, and the file the saved plan
    recorded) or crafted and written; ``plan_meta["crafted"]`` records the file's sha256 and the
    collision statistics. Origin partners are training images showing the origin concept and
    not the destination. Returns the attack with the poisons attached."""
    path = run_dir / CRAFTED_FILE
    images = plan_meta["poisoned_images"]
    cfg = attack.config
    if reuse and path.is_file():
        crafted = load_crafted(path, recorded_sha)
        same = (crafted.image_ids, crafted.epsilon, crafted.steps) == (
            images,
            float(cfg.craft_epsilon),
            int(cfg.craft_steps),
        )
        if not same:
            raise SRDError(f"{path}: crafted for other images or settings (pass --overwrite)")
        sha = recorded_sha or file_digest(path)  # load_crafted checked a recorded one
        log.info("reusing %d crafted poisons from %s", len(images), path)
    elif recorded_sha is not None:
        raise SRDError(f"{path}: the resumed run's crafted poisons are gone (pass --overwrite)")
    else:
        texts = {r.image_id: [c.caption for c in r.captions] for r in records}
        pool = [i for i, captions in texts.items() if attack.is_test_image(captions)]
        crafted = craft_poisons(encode(), attack, images, pool, ImageStore(records), seed)
        sha = crafted.save(path)
    plan_meta["crafted"] = {"file": CRAFTED_FILE, "sha256": sha, **crafted.stats}
    return attack.with_crafted(crafted.table())
