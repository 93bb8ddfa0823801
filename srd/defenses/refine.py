"""Refine-tune defenses: the baselines that share SRD's stage D4 engine and budget.

Each gives the refine-tune data; :mod:`train.defend` trains it (every refine-tune defense with
the same flags and budget, SRD's own entry :mod:`srd.defenses.srd.defense` included) and
evaluation is ``eval/evaluate.py``.

* ``no_mask``: the same data with no square at all (what the refine-tune does on its own).
* ``clean_finetune``: only the clean captions with clean images (the defender is told which
  samples are poisoned: an upper reference, not a defense a defender could run).
* ``random_squares``: one seeded uniformly random square per image (the ``--policy random``
  ablation of D3, drawn directly: the same seeded draw per image id); ``--square_side`` keeps
  every square at one size.
* ``oracle_square``: the grid square that covers the real trigger's box (the best a single
  square can do), painted on every image.
* ``light_clean_ft``: the light clean fine-tune as published (OrthoPurify's and PSR's "Clean
  FT"): a small clean set disjoint from the attack's data (the validation split's captioned
  images), the adapters only (the gated cross-attention layers), ~126 steps.

A refine-tune defense takes ``--image_version`` (:class:`~srd.defenses.registry.VersionArgs`);
one that paints squares also ``--mask_colour`` (:class:`~srd.defenses.registry.SquareArgs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from srd.attacks.registry import Attack
from srd.captioner.engine import Sample
from srd.config import arg
from srd.data.records import ImageStore, caption_records
from srd.defenses.coverage import trigger_box
from srd.defenses.registry import (
    DefenderData,
    Defense,
    ImageFn,
    SquareArgs,
    VersionArgs,
    register_defense,
)
from srd.defenses.squares import RandomTries, covering_action
from srd.defenses.versions import VersionImages, image_ids, triggered_images
from srd.errors import SRDError
from srd.flags import COUNT, at_least
from srd.geometry import MASK_COLOURS, RED


@dataclass
class RandomSquaresArgs(SquareArgs):
    """random_squares: the squares' size (and the image version and colour)."""

    square_side: int = arg(
        0,
        help="side in pixels of every square (one of the action grid's sizes, 20 40 60 80 "
        "200); 0: any size, uniform over all 500 actions",
        check=at_least(0),
    )


class RefineDefense(Defense):
    """A refine-tune on one version per image with an optional square per image."""

    kind = "refine"
    Args = VersionArgs

    def mask_actions(self, data: DefenderData) -> dict[int, int] | None:
        return None

    def provider(self, data: DefenderData) -> VersionImages:
        triggered = triggered_images(data, self.args.image_version, data.seed)
        colour = MASK_COLOURS[self.args.mask_colour] if self.paints_squares else RED
        return VersionImages(data, triggered, self.mask_actions(data), colour)

    def training_set(self, data: DefenderData) -> tuple[list[Sample], VersionImages]:
        return data.samples(), self.provider(data)

    def variants(self) -> list[str]:
        """The report's tags for this run's non-default parameters."""
        if self.paints_squares and self.args.mask_colour != "red":
            return [f"{self.args.mask_colour} squares"]
        return []

    def describe(self) -> dict[str, Any]:
        record = {**super().describe(), "image_version": self.args.image_version}
        if self.paints_squares:
            record["mask_colour"] = self.args.mask_colour
        tags = self.variants()
        if tags:
            record["variant"] = ", ".join(tags)
        return record


@register_defense("no_mask")
class NoMask(RefineDefense):
    """Refine-tune on the defender's data as it is (one version per image, no square)."""


@register_defense("random_squares")
class RandomSquares(RefineDefense):
    """One seeded uniformly random square per image (the agent-free ablation); with
    ``--square_side`` all of one size, which tells what the size alone costs and removes."""

    changes_images = True
    paints_squares = True
    Args = RandomSquaresArgs

    def mask_actions(self, data: DefenderData) -> dict[int, int]:
        ids = list(image_ids(data))
        tries = RandomTries(data.seed, self.args.square_side)(ids, [None] * len(ids))
        return {i: t[0] for i, t in zip(ids, tries, strict=True)}

    def variants(self) -> list[str]:
        side = [f"{self.args.square_side} px"] if self.args.square_side else []
        return side + super().variants()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "square_side": self.args.square_side}


@register_defense("oracle_square")
class OracleSquare(RefineDefense):
    """The square over the real trigger's box on every image (needs a patch trigger)."""

    changes_images = True
    paints_squares = True
    Args = SquareArgs
    in_benign_control = False

    def unavailable(self, attack: Attack) -> str | None:
        if trigger_box(attack) is None:
            return f"attack {attack.name} has no patch trigger box"
        return None

    def uses_image_version(self) -> bool:
        return False  # its square covers the trigger's box: both versions give the same pixels

    def mask_actions(self, data: DefenderData) -> dict[int, int]:
        reason = self.unavailable(data.attack)
        if reason:
            raise SRDError(f"--defense oracle_square: {reason}")
        action = covering_action(trigger_box(data.attack))
        return {i: action for i in image_ids(data)}


@register_defense("clean_finetune")
class CleanFinetune(Defense):
    """Refine-tune on the clean captions only, with clean images (told which are poisoned)."""

    kind = "refine"
    in_benign_control = False  # with nothing poisoned it is no_mask exactly

    def training_set(self, data: DefenderData) -> tuple[list[Sample], VersionImages]:
        poisoned = set(data.plan.ids)
        samples = [s for s in data.samples() if s.caption_id not in poisoned]
        return samples, VersionImages(data, triggered=set())


@dataclass
class LightArgs:
    """light_clean_ft: how often each held-out caption is seen, and what trains."""

    repeats: int = arg(
        4,
        help="times each held-out caption appears per epoch: 4 x 500 captions x 2 epochs at "
        "batch 32 = 126 steps, the published budget (~126 steps)",
        check=COUNT,
    )
    train_only: str = arg(
        "adapters",
        help="adapters: only the gated cross-attention layers change (as published); paper: "
        "everything the attack trained (perceiver and token embeddings too)",
        choices=["adapters", "paper"],
    )


def freeze_all_but_adapters(model: torch.nn.Module) -> int:
    """Zero the gradient of every trainable parameter outside the gated cross-attention layers
    (AdamW then leaves them bit-identical: no gradient, no decay on them); returns their count.
    The parameters stay trainable, so the checkpoint keeps the attack's layout."""
    frozen = 0
    for name, p in model.named_parameters():
        if p.requires_grad and "gated_cross_attn_layer" not in name:
            p.register_hook(torch.zeros_like)
            frozen += 1
    return frozen


@register_defense("light_clean_ft")
class LightCleanFinetune(Defense):
    """A short fine-tune of the adapters on held-out clean captions (none of the defender's
    poisoned data)."""

    kind = "refine"
    Args = LightArgs
    uses_holdout = True

    def training_set(self, data: DefenderData) -> tuple[list[Sample], ImageFn]:
        if not data.holdout:
            raise SRDError("--defense light_clean_ft: the data have no validation split")
        store = ImageStore(data.holdout, data.cache_mb)
        samples = [
            Sample(c.caption_id, c.image_id, c.caption) for c in caption_records(data.holdout)
        ]
        return samples * self.args.repeats, lambda s: store(s.image_id)

    def prepare_model(self, captioner: Any, data: DefenderData) -> dict[str, Any]:
        if self.args.train_only != "adapters":
            return {}
        return {"gradient_zeroed_tensors": freeze_all_but_adapters(captioner.model)}

    def describe(self) -> dict[str, Any]:
        record = {**super().describe(), "repeats": self.args.repeats}
        if self.args.train_only != "adapters":
            record["variant"] = f"train {self.args.train_only}"
        return {**record, "train_only": self.args.train_only}
