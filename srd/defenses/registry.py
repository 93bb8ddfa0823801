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

import argparse
import dataclasses
import random
import sys
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
from srd.flags import at_least, check_flags
from srd.geometry import MASK_COLOURS

ImageFn = Callable[[Sample], np.ndarray]
Transform = Callable[[np.ndarray], np.ndarray]

IMAGE_VERSIONS = ("triggered", "first_occurrence")


@dataclass
class DefenseName:
    """Defense: which one (``python -m srd.defenses --list`` shows the registry)."""

    defense: str = arg("none", help="defense name from the registry (srd.defenses.DEFENSES)")


@dataclass
class DefenseArgs(DefenseName):
    """Defense: which one, and the defender's data every defense starts from."""

    poison_ids_path: str = arg(
        "checkpoints_remote/backdoor-badnet/poison_ids.json",
        help="the attack run's poison_ids.json (the defender's data as the attack left it)",
    )
    quality_images: int = arg(
        64,
        help="images (seeded draw) for SSIM/PSNR of processed vs original (0: skip)",
        check=at_least(0),
    )
    benign_control: bool = arg(
        False,
        help="run the defense on the clean captioner (--checkpoint_path) with the defender's "
        "data as if no caption were poisoned; measures what the defense costs a model without "
        "a backdoor (the attack of --poison_ids_path only names the trigger of the evaluation)",
    )
    retrain_from: str = arg(
        "",
        help="the retrain-from-clean protocol (ours; the paper's 'retrains on SRD-processed "
        "data' read literally): train the clean captioner at this checkpoint on the defense's "
        "data, with the attack's budget flags, instead of refine-tuning --checkpoint_path, "
        "which still names the backdoored model (SRD's squares and the record's attack come "
        "from it); data-level defenses only (python -m srd.defenses --retrainable)",
    )


@dataclass
class NoFlags:
    """This defense's flags: none of its own."""


@dataclass
class VersionArgs:
    """Refine-tune: the image version it trains on."""

    image_version: str = arg(
        "triggered",
        help="which version of an image with a poisoned caption the refine-tune uses: "
        "triggered (always the triggered one) or first_occurrence (the reference: the version "
        "of the first stored occurrence in a seeded draw, reference §11 / B15)",
        choices=list(IMAGE_VERSIONS),
    )


@dataclass
class SquareArgs(VersionArgs):
    """Refine-tune on painted squares: the image version and the squares' colour."""

    mask_colour: str = arg(
        "red",
        help="colour of the squares painted on the refine-tune images: red (the reference's) "
        "or cyan (ours: a colour no object or background of the embedded benchmark has; the "
        "mask-colour ablation)",
        choices=list(MASK_COLOURS),
    )


@dataclass
class DefenderData:
    """What the defender holds: training records, the poison plan and the attack it rebuilds."""

    records: Sequence[ImageRecord]
    plan: PoisonPlan
    attack: Attack
    seed: int
    cache_mb: float = 256.0
    holdout: Sequence[ImageRecord] = ()
    """Clean captioned images the attack never saw (the validation split): light_clean_ft's."""
    model_args: Any = None
    """The model flags (:class:`srd.captioner.args.ModelArgs`), for a reference model of the
    same architecture (ppl_filter, byorn)."""

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
    kind = "none"
    """"refine" (a refine-tune writes the defended checkpoint), "edit" (the weights changed
    without training, e.g. data-free pruning), "test_time" (an input transform) or "none"."""
    changes_images = False
    paints_squares = False
    Args: type = NoFlags
    """The defense's own flags (a dataclass of :func:`srd.config.arg` fields)."""
    in_comparison = True
    """run/run_defenses.sh runs it by default (srd needs its cleaning run and is added apart)."""
    in_benign_control = True
    """... and with BENIGN=1 (where nothing is poisoned, e.g. clean_finetune is no_mask)."""
    uses_holdout = False
    """Whether it trains on the held-out split (:attr:`DefenderData.holdout`)."""

    def __init__(self, args: Any = None):
        self.args = self.Args() if args is None else args

    def uses_image_version(self) -> bool:
        """Whether its refine-tune data depend on ``--image_version`` (run_defenses.sh runs
        these in every image version)."""
        return isinstance(self.args, VersionArgs)

    def retrainable(self) -> bool:
        """Whether the defense is the training data it builds and nothing else (a refine-tune
        on the defender's data, no change of the model, no loss of its own):
        ``train/defend.py --retrain_from`` can then train the clean captioner on those data
        (the retrain-from-clean protocol). Derived from the hooks the class overrides."""
        cls = type(self)
        return (
            self.kind == "refine"
            and not self.uses_holdout
            and cls.prepare_model is Defense.prepare_model
            and cls.training_loss is Defense.training_loss
        )

    def unavailable(self, attack: Attack) -> str | None:
        """Why this defense cannot run against ``attack`` (None: it can)."""
        return None

    def check_inputs(self, checkpoint: str, poison_ids_path: str, benign_control: bool) -> None:
        """SRDError when the defense's own inputs (e.g. srd's cleaning manifest) were made for
        another model or other data than the ones it is run on."""

    def read_paths(self) -> dict[str, str]:
        """Files its own flags make it read, by flag name: their digests join the refine-tune's
        ``config.json`` (``srd.runs.input_digests``), so a resume over a changed one is refused."""
        return {}

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

    def patch_model(self, captioner: Any) -> None:
        """Test-time change of the loaded model's forward (e.g. hooks); the evaluation calls it
        once after loading. Default: none."""

    def test_time_report(self) -> dict[str, Any]:
        """What :meth:`patch_model`'s change did during the evaluation, for its record."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The defense's record (name, kind and the parameters it uses)."""
        return {"name": self.name, "kind": self.kind}


CHECKPOINT_KINDS = ("refine", "edit")
"""Kinds whose defense writes a defended checkpoint (evaluated as a model, not a transform)."""

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


def defense_class(name: str) -> type[Defense]:
    """The registry class named ``name``; SRDError naming ``--defense`` when unknown."""
    cls = DEFENSES.get(name)
    if cls is None:
        raise SRDError(f"--defense {name}: unknown defense (known: {', '.join(sorted(DEFENSES))})")
    return cls


def flag_owners() -> dict[str, list[str]]:
    """{flag name: the defenses whose ``Args`` declare it}."""
    owners: dict[str, list[str]] = {}
    for name, cls in sorted(DEFENSES.items()):
        for f in dataclasses.fields(cls.Args):
            owners.setdefault(f.name, []).append(name)
    return owners


def refuse_foreign_flags(names: Sequence[str], cls: type[Defense]) -> None:
    """SRDError naming the first of ``names`` (flag names) that belongs to other defenses only."""
    own = {f.name for f in dataclasses.fields(cls.Args)}
    owners = flag_owners()
    for name in names:
        if name in owners and name not in own:
            raise SRDError(
                f"--{name}: a flag of {', '.join(owners[name])}, not of --defense {cls.name}"
            )


def chosen_defense(argv: Sequence[str] | None = None) -> type[Defense]:
    """The class named by ``--defense`` in a command line (default: this process's; ``none``
    when absent), checked to get none of another defense's flags; the entry point then parses
    its ``Args`` with the rest."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    parser.add_argument("--defense", default="none")
    try:
        known, _ = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:  # e.g. --defense without a name
        raise SRDError(str(exc)) from None
    cls = defense_class(known.defense)
    flags = [t[2:].split("=", 1)[0] for t in argv if t.startswith("--")]
    refuse_foreign_flags([f[3:] if f.startswith("no-") else f for f in flags], cls)
    return cls


def build_defense(name: str, args: Any = None, **flags: Any) -> Defense:
    """The defense ``name`` with its ``Args`` (given, or built from ``flags`` and checked like a
    command line); SRDError naming the flag or ``--defense`` on bad input."""
    cls = defense_class(name)
    if args is None:
        refuse_foreign_flags(list(flags), cls)
        own = {f.name for f in dataclasses.fields(cls.Args)}
        unknown = sorted(set(flags) - own)
        if unknown:
            raise SRDError(f"--{unknown[0]}: not a flag of any defense")
        args = cls.Args(**flags)
    check_flags([args])
    return cls(args)


def seeded_subset(ids: Sequence[int], n: int, seed: int) -> list[int]:
    """A seeded draw of ``n`` ids (all when n <= 0 or n >= len(ids)), sorted."""
    ids = sorted(ids)
    if n <= 0 or n >= len(ids):
        return ids
    return sorted(random.Random(seed).sample(ids, n))
