"""The defense registry: one small interface, defenses selected by name (``--defense``).

A defense sees what a defender holds: the training data as the attack left it (captions, some
poisoned, and the triggered images) and the backdoored checkpoint. It may

* give refine-tune data (:meth:`Defense.training_set`: samples + image provider), trained with
  the same engine and budget as SRD's stage D4 (:mod:`train.defend`);
* change the model before that refine-tune (:meth:`Defense.prepare_model`, e.g. pruning);
* transform test images (:meth:`Defense.transform`), applied by the evaluation
  (``eval/evaluate.py --defense NAME``).

Register a new defense with ``@register_defense("name")`` on a :class:`Defense` subclass; an
unknown name is a one-line :class:`srd.errors.SRDError` naming ``--defense``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from srd.attacks.registry import Attack
from srd.attacks.trainset import PoisonPlan, TrainingImages
from srd.captioner.engine import Sample
from srd.config import arg
from srd.data.records import ImageRecord, caption_records
from srd.errors import SRDError
from srd.flags import SHARE, between, positive
from srd.geometry import MASK_COLOURS

ImageFn = Callable[[Sample], np.ndarray]
Transform = Callable[[np.ndarray], np.ndarray]

IMAGE_VERSIONS = ("triggered", "first_occurrence")


@dataclass
class TransformArgs:
    """Defense: which one, and the test-time transforms' parameters."""

    defense: str = arg("none", help="defense name from the registry (srd.defenses.DEFENSES)")
    blur_radius_share: float = arg(
        0.06,
        help="blur: Gaussian radius as a share of min(H, W), before the 0.7 factor",
        check=between(0, 1, low_open=True),
    )
    blur_radius_factor: float = arg(
        0.7, help="blur: factor on the radius (CleanSight: 0.7)", check=positive()
    )
    blur_alpha: float = arg(0.7, help="blur: weight of the blurred image in the blend", check=SHARE)
    spatial_scale: float = arg(
        0.9,
        help="spatial: shrink factor before padding back to size",
        check=between(0, 1, low_open=True),
    )
    spatial_angle: float = arg(10.0, help="spatial: rotation in degrees", check=between(-180, 180))
    spatial_flip: bool = arg(True, help="spatial: mirror the image left-right")


@dataclass
class DefenseArgs(TransformArgs):
    """Defense: which one, its data variants and parameters."""

    poison_ids_path: str = arg(
        "checkpoints_remote/backdoor-badnet/poison_ids.json",
        help="the attack run's poison_ids.json (the defender's data as the attack left it)",
    )
    clean_data_save: str = arg(
        "", help="srd: folder of the merged cleaning manifest (stage D3b's merged.json)"
    )
    image_version: str = arg(
        "triggered",
        help="which version of an image with a poisoned caption the refine-tune uses: "
        "triggered (always the triggered one) or first_occurrence (the reference: the version "
        "of the first stored occurrence in a seeded draw, reference §11 / B15)",
        choices=list(IMAGE_VERSIONS),
    )
    square_side: int = arg(
        0,
        help="random_squares: side in pixels of every square (one of the action grid's sizes, "
        "20 40 60 80 200); 0: any size, uniform over all 500 actions",
    )
    mask_colour: str = arg(
        "red",
        help="srd, random_squares, oracle_square: colour of the squares painted on the "
        "refine-tune images: red (the reference's) or cyan (ours: a colour no object or "
        "background of the embedded benchmark has; the mask-colour ablation)",
        choices=list(MASK_COLOURS),
    )
    prune_ratio: float = arg(
        0.2,
        help="fine_pruning: share of cross-attention FF units pruned",
        check=between(0, 1, high_open=True),
    )
    prune_batches: int = arg(8, help="fine_pruning: batches of defender's data for activations")
    par_data: str = arg(
        "clean",
        help="par: clean (the clean_finetune data, PAR's clean pairs) or as_left (the no_mask "
        "data, poisoned samples included)",
        choices=["clean", "as_left"],
    )
    par_feature: str = arg(
        "perceiver",
        help="par: states pushed from the frozen copy: perceiver outputs or gated "
        "cross-attention outputs",
        choices=["perceiver", "cross_attention"],
    )
    loss_thresh: float = arg(2.15, help="par: tau, the push is off while the distance exceeds it")
    push_weight: float = arg(0.5, help="par: weight of the push term (PAR: 0.5)")
    quality_images: int = arg(
        64, help="images (seeded draw) for SSIM/PSNR of processed vs original (0: skip)"
    )
    benign_control: bool = arg(
        False,
        help="run the defense on the clean captioner (--checkpoint_path) with the defender's "
        "data as if no caption were poisoned; measures what the defense costs a model without "
        "a backdoor (the attack of --poison_ids_path only names the trigger of the evaluation)",
    )


@dataclass
class DefenderData:
    """What the defender holds: training records, the poison plan and the attack it rebuilds."""

    records: Sequence[ImageRecord]
    plan: PoisonPlan
    attack: Attack
    seed: int
    cache_mb: float = 256.0

    def images(self) -> TrainingImages:
        return TrainingImages(self.records, self.attack, self.plan.ids, cache_mb=self.cache_mb)

    def samples(self) -> list[Sample]:
        """One sample per training caption, poisoned captions as the attack left them."""
        texts = self.plan.captions
        return [
            Sample(c.caption_id, c.image_id, texts.get(c.caption_id, c.caption))
            for c in caption_records(self.records)
        ]


class Defense:
    """Base defense: does nothing (the ``none`` row). Subclasses override what they change."""

    name = "none"
    kind = "none"  # "refine" (defended checkpoint), "test_time" (input transform) or "none"
    changes_images = False
    paints_squares = False  # takes --mask_colour
    takes_square_side = False  # takes --square_side

    def __init__(self, args: DefenseArgs | TransformArgs):
        self.args = args

    def unavailable(self, attack: Attack) -> str | None:
        """Why this defense cannot run against ``attack`` (None: it can)."""
        return None

    def check_inputs(self, checkpoint: str, poison_ids_path: str, benign_control: bool) -> None:
        """SRDError when the defense's own inputs (e.g. srd's cleaning manifest) were made for
        another model or other data than the ones it is run on."""

    def training_set(self, data: DefenderData) -> tuple[list[Sample], ImageFn] | None:
        """Refine-tune data (samples, image provider); None: no refine-tune."""
        return None

    def prepare_model(self, captioner: Any, data: DefenderData) -> dict[str, Any]:
        """Change the backdoored model before the refine-tune; returns notes for the record."""
        return {}

    def training_loss(self, captioner: Any, train_args: Any) -> Any:
        """A loss in place of the caption loss (:data:`srd.captioner.engine.LossFn`, with
        ``summary()`` for the record); None: the caption loss."""
        return None

    def transform(self) -> Transform | None:
        """Test-time input transform (uint8 (H, W, 3) -> same); None: images untouched."""
        return None

    def describe(self) -> dict[str, Any]:
        """The defense's record (name, kind and the parameters it uses)."""
        return {"name": self.name, "kind": self.kind}


DEFENSES: dict[str, type[Defense]] = {}


def register_defense(name: str) -> Callable[[type[Defense]], type[Defense]]:
    """Class decorator adding a defense to :data:`DEFENSES` under ``name``."""

    def add(cls: type[Defense]) -> type[Defense]:
        if name in DEFENSES:
            raise ValueError(f"defense {name!r} registered twice")
        cls.name = name
        DEFENSES[name] = cls
        return cls

    return add


register_defense("none")(Defense)


def build_defense(args: DefenseArgs | TransformArgs) -> Defense:
    """The defense named by ``args.defense``; SRDError naming ``--defense`` when unknown."""
    cls = DEFENSES.get(args.defense)
    if cls is None:
        raise SRDError(
            f"--defense {args.defense}: unknown defense (known: {', '.join(sorted(DEFENSES))})"
        )
    colour = getattr(args, "mask_colour", "red")
    if colour != "red" and not cls.paints_squares:
        raise SRDError(f"--mask_colour {colour}: defense {args.defense} paints no squares")
    side = getattr(args, "square_side", 0)
    if side and not cls.takes_square_side:
        takers = ", ".join(n for n, c in sorted(DEFENSES.items()) if c.takes_square_side)
        raise SRDError(f"--square_side {side}: only {takers} takes it, not {args.defense}")
    return cls(args)


def seeded_subset(ids: Sequence[int], n: int, seed: int) -> list[int]:
    """A seeded draw of ``n`` ids (all when n <= 0 or n >= len(ids)), sorted."""
    ids = sorted(ids)
    if n <= 0 or n >= len(ids):
        return ids
    return sorted(random.Random(seed).sample(ids, n))
