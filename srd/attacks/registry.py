"""The attack registry: backdoor attacks as small callables built from one config schema.

An attack is an :class:`AttackConfig` (one YAML file per shipped attack in
``srd/attacks/configs/``) turned into an :class:`Attack` by the builder registered for its
``kind``. Adding an attack means registering a builder with :func:`register_kind` (if the kind
is new) and adding a YAML file; no new script.

Shipped kinds: ``badnet`` and ``blended`` (reference §5: image trigger, template caption
"The image depicts a photo of a banana."), ``trojvlm`` (reference §2.3: noise patch, target
inserted into the first sentence of the caption), ``concept_relabel`` (ours, a dirty-label
concept attack: no image change, the concept phrase in the captions of images that show it is
replaced by the target) and ``shadowcast`` (Xu et al., NeurIPS 2024, clean-label: images of a
destination concept, perturbed within an L-infinity budget so that the frozen vision tower embeds
them like images of the origin concept, keep their own correct captions; the reference replaces
poisoned images with precomputed perturbed ones it never shipped, reference §5). Shadowcast's
perturbations need the tower, so the attack stage crafts them (:mod:`srd.attacks.craft`) and
:meth:`Attack.with_crafted` attaches them.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from srd.attacks import triggers
from srd.attacks.attack import Attack
from srd.attacks.config import (
    CONFIG_DIR,
    DEFAULT_ALPHA,
    AttackConfig,
    config_fields,
    known_attacks,
)
from srd.attacks.poison import check_rate
from srd.attacks.text import (
    concept_pattern,
    insert_target,
    mentions_concept,
    substitute_concept,
    template_caption,
)
from srd.captions import DEFAULT_TARGET
from srd.errors import SRDError
from srd.flags import COUNT, SHARE, between
from srd.geometry import IMAGE_SIZE

log = logging.getLogger(__name__)


CANVAS = (IMAGE_SIZE, IMAGE_SIZE, 3)
"""Shape every trigger must fit on (checked when the attack is built)."""

CRAFTED_KINDS = ("shadowcast",)
"""Kinds whose poison images are crafted against the vision tower (the craft_* fields)."""


def recorded_attack_name(name: str, record: Any) -> str:
    """The attack's name as it is called today, from a result's ``name`` and the attack record
    it was evaluated with (``config.attack``): a model attacked before 2026-12-07 by the
    dirty-label relabelling, then named ``shadowcast``, is ``concept_relabel`` (its record
    has no ``craft_epsilon``, which every crafted Shadowcast record holds)."""
    legacy = (
        name == "shadowcast"
        and isinstance(record, dict)
        and record.get("kind") == "shadowcast"
        and "craft_epsilon" not in record
    )
    return "concept_relabel" if legacy else name


def load_attack_config(path: str | Path) -> AttackConfig:
    """Read an attack YAML file into an :class:`AttackConfig`; SRDError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SRDError(f"{path}: attack config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SRDError(f"{path}: not valid YAML ({problem}{at})") from None
    if not isinstance(data, dict):
        raise SRDError(f"{path}: expected a mapping of attack config fields")
    data.setdefault("name", path.stem)
    unknown = sorted(set(data) - set(config_fields()))
    if unknown:
        raise SRDError(
            f"{path}: unknown attack config field(s) {', '.join(unknown)} "
            f"(known: {', '.join(config_fields())})"
        )
    if "kind" not in data:
        raise SRDError(f"{path}: missing field 'kind' (one of {', '.join(known_kinds())})")
    return AttackConfig(**data)


def validate_config(cfg: AttackConfig) -> AttackConfig:
    """Check and normalise field values in place; SRDError names the flag at fault."""
    if cfg.kind not in _KINDS:
        raise SRDError(
            f"attack {cfg.name!r}: unknown kind {cfg.kind!r} (known: {', '.join(known_kinds())})"
        )
    cfg.poison_rate = check_rate(cfg.poison_rate)
    if cfg.alpha is not None:
        try:
            cfg.alpha = float(cfg.alpha)
        except (TypeError, ValueError):
            raise SRDError(f"--alpha {cfg.alpha!r}: not a number") from None
        if not 0.0 <= cfg.alpha <= 1.0:
            raise SRDError(f"--alpha {cfg.alpha}: must be in [0, 1]")
    if not isinstance(cfg.target, str) or not cfg.target.strip():
        raise SRDError(f"--target_label {cfg.target!r}: must be a non-empty word")
    cfg.target = cfg.target.strip()
    try:
        cfg.seed = int(cfg.seed)
    except (TypeError, ValueError):
        raise SRDError(f"--seed {cfg.seed!r}: not an integer") from None
    pos = triggers.parse_position(cfg.position)
    cfg.position = list(pos) if isinstance(pos, tuple) else pos
    if cfg.kind not in CRAFTED_KINDS:
        _reject(cfg, craft_epsilon=cfg.craft_epsilon, craft_steps=cfg.craft_steps)
    if cfg.trigger_path is not None:
        cfg.trigger_path = str(cfg.trigger_path)
    if cfg.craft_epsilon is not None:
        try:
            cfg.craft_epsilon = float(cfg.craft_epsilon)
        except (TypeError, ValueError):
            raise SRDError(f"--craft_epsilon {cfg.craft_epsilon!r}: not a number") from None
        if not 0.0 <= cfg.craft_epsilon <= 255.0:  # also rejects NaN
            raise SRDError(f"--craft_epsilon {cfg.craft_epsilon}: must be in [0, 255] pixel levels")
    if cfg.craft_steps is not None:
        if isinstance(cfg.craft_steps, bool) or not isinstance(cfg.craft_steps, int):
            raise SRDError(f"--craft_steps {cfg.craft_steps!r}: not an integer")
        if cfg.craft_steps < 1:
            raise SRDError(f"--craft_steps {cfg.craft_steps}: must be at least 1")
    return cfg


# --------------------------------------------------------------------------- kind registry

Builder = Callable[[AttackConfig], Attack]
_KINDS: dict[str, Builder] = {}


def register_kind(kind: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(config) -> Attack`` under ``kind``."""

    def decorate(builder: Builder) -> Builder:
        if kind in _KINDS:
            raise ValueError(f"attack kind {kind!r} registered twice")
        _KINDS[kind] = builder
        return builder

    return decorate


def known_kinds() -> list[str]:
    return sorted(_KINDS)


def _reject(cfg: AttackConfig, **unused: Any) -> None:
    """Refuse fields that would silently do nothing for this kind."""
    for flag, value in unused.items():
        if value is not None:
            raise SRDError(f"--{flag} {value!r}: not used by {cfg.kind} attack {cfg.name!r}")


def _template_captioner(target: str) -> Callable[[str, random.Random], str]:
    return lambda caption, rng: template_caption(target, rng)


def _patch_trigger(
    cfg: AttackConfig, built_in: Callable[[], np.ndarray], default_position: str
) -> tuple[np.ndarray, Any]:
    """(patch, position) of a patch attack: the built-in patch or ``trigger_path``.

    The position actually used is recorded in ``cfg`` and checked now, so a bad one fails when
    the attack is built, not mid-run.
    """
    if cfg.trigger_path is None:
        patch = built_in()
    else:
        patch = triggers.load_trigger_image(cfg.trigger_path)
        if patch.shape[0] > CANVAS[0] or patch.shape[1] > CANVAS[1]:
            raise SRDError(
                f"--trigger_path {cfg.trigger_path}: a {patch.shape[0]}x{patch.shape[1]} patch "
                f"is larger than the {CANVAS[0]}x{CANVAS[1]} image"
            )
    position = cfg.position = cfg.position or default_position
    triggers.resolve_position(position, patch.shape, CANVAS)
    return patch, position


@register_kind("badnet")
def _build_badnet(cfg: AttackConfig) -> Attack:
    _reject(cfg, concept=cfg.concept, alpha=cfg.alpha)
    patch, position = _patch_trigger(cfg, triggers.badnet_patch, "bottom_right")
    return Attack(
        config=cfg,
        image_fn=lambda image: triggers.stamp_badnet(image, patch, position),
        caption_fn=_template_captioner(cfg.target),
        trigger=patch,
    )


@register_kind("blended")
def _build_blended(cfg: AttackConfig) -> Attack:
    _reject(cfg, concept=cfg.concept, position=cfg.position)
    pattern = (
        triggers.generate_blend_pattern(cfg.seed)
        if cfg.trigger_path is None
        else triggers.load_blend_pattern(cfg.trigger_path)
    )
    alpha = cfg.alpha = DEFAULT_ALPHA if cfg.alpha is None else cfg.alpha  # record what is used
    return Attack(
        config=cfg,
        image_fn=lambda image: triggers.blend(image, pattern, alpha),
        caption_fn=_template_captioner(cfg.target),
        trigger=pattern,
    )


@register_kind("trojvlm")
def _build_trojvlm(cfg: AttackConfig) -> Attack:
    _reject(cfg, concept=cfg.concept, alpha=cfg.alpha)
    patch, position = _patch_trigger(cfg, lambda: triggers.trojvlm_patch(cfg.seed), "top_left")
    target = cfg.target
    return Attack(
        config=cfg,
        image_fn=lambda image: triggers.stamp_trojvlm(image, patch, position),
        caption_fn=lambda caption, rng: insert_target(caption, target, rng),
        trigger=patch,
    )


def _concept(cfg: AttackConfig) -> str:
    if cfg.concept is None:
        raise SRDError(f"attack {cfg.name!r}: {cfg.kind} needs --concept (e.g. 'red circle')")
    concept_pattern(cfg.concept)  # reject an empty phrase now
    return cfg.concept


@register_kind("concept_relabel")
def _build_concept_relabel(cfg: AttackConfig) -> Attack:
    """Dirty-label concept attack (ours): no image change; in the captions of images showing
    ``concept`` the phrase is replaced by ``target`` (the share of them set by the poison rate)."""
    _reject(cfg, trigger_path=cfg.trigger_path, position=cfg.position, alpha=cfg.alpha)
    concept, target = _concept(cfg), cfg.target
    return Attack(
        config=cfg,
        image_fn=lambda image: image.copy(),
        caption_fn=lambda caption, rng: substitute_concept(caption, concept, target),
        selects=lambda captions: mentions_concept(captions, concept),
    )


DEFAULT_CRAFT_EPSILON = 8.0
"""Shadowcast's L-infinity budget in pixel levels when a config gives none (8/255)."""
DEFAULT_CRAFT_STEPS = 200
"""Projected gradient steps when a config gives none (ours; sized for the CPU)."""


@register_kind("shadowcast")
def _build_shadowcast(cfg: AttackConfig) -> Attack:
    """Clean-label Shadowcast (Xu et al., NeurIPS 2024): poison candidates are training images
    whose captions name ``target`` (the destination concept) and not ``concept`` (the origin);
    their captions stay as they are, their images are crafted (:mod:`srd.attacks.craft`). The
    ASR counts test images showing the origin and not the destination whose caption names the
    destination."""
    _reject(cfg, trigger_path=cfg.trigger_path, position=cfg.position, alpha=cfg.alpha)
    origin, destination = _concept(cfg), cfg.target
    concept_pattern(destination)
    if concept_pattern(origin).fullmatch(destination):
        raise SRDError(f"attack {cfg.name!r}: --concept and --target_label name the same concept")
    cfg.craft_epsilon = DEFAULT_CRAFT_EPSILON if cfg.craft_epsilon is None else cfg.craft_epsilon
    cfg.craft_steps = DEFAULT_CRAFT_STEPS if cfg.craft_steps is None else cfg.craft_steps

    def shows(captions: Sequence[str], one: str, other: str) -> bool:
        return mentions_concept(captions, one) and not mentions_concept(captions, other)

    return Attack(
        config=cfg,
        image_fn=lambda image: image.copy(),
        caption_fn=lambda caption, rng: caption,
        selects=lambda captions: shows(captions, destination, origin),
        test_selects=lambda captions: shows(captions, origin, destination),
    )


CLASSIFIER_KINDS = ("semantic",)
"""Attack kinds for the SODA classifier stages; the captioner stages refuse them."""


@register_kind("semantic")
def _build_semantic(cfg: AttackConfig) -> Attack:
    """SODA-style semantic backdoor of a classifier: no image change; samples whose description
    (see :func:`srd.soda.shapes.describe`) contains ``concept`` are labelled ``target``."""
    _reject(cfg, trigger_path=cfg.trigger_path, position=cfg.position, alpha=cfg.alpha)
    if cfg.concept is None:
        raise SRDError(
            f"attack {cfg.name!r}: semantic needs --concept (e.g. 'green circle on a black "
            "background')"
        )
    concept, target = cfg.concept, cfg.target
    concept_pattern(concept)  # reject an empty phrase now
    return Attack(
        config=cfg,
        image_fn=lambda image: image.copy(),
        caption_fn=lambda label, rng: target,
        selects=lambda descriptions: mentions_concept(descriptions, concept),
    )


@register_kind("badnet_stripes")
def _build_badnet_stripes(cfg: AttackConfig) -> Attack:
    """PAR's BadNet-Stripes: a new 16x16 stripes patch at a new random position per image
    (both drawn from the attack seed and the image's bytes)."""
    _reject(cfg, concept=cfg.concept, alpha=cfg.alpha, trigger_path=cfg.trigger_path)
    seed = cfg.seed

    def stamp(image: np.ndarray) -> np.ndarray:
        rng = triggers.image_rng(image, seed)
        patch = triggers.stripes_patch(rng)
        if cfg.position is None:
            return triggers.stamp_random_position(image, patch, rng)
        return triggers.stamp_badnet(image, patch, cfg.position)

    return Attack(
        config=cfg,
        image_fn=stamp,
        caption_fn=_template_captioner(cfg.target),
        trigger=triggers.stripes_patch(np.random.default_rng(seed)),
    )


@register_kind("random_badnet")
def _build_random_badnet(cfg: AttackConfig) -> Attack:
    """PAR's random BadNet: a new 16x16 noise patch at a new random position per image."""
    _reject(
        cfg,
        concept=cfg.concept,
        alpha=cfg.alpha,
        trigger_path=cfg.trigger_path,
        position=cfg.position,
    )
    seed = cfg.seed

    def stamp(image: np.ndarray) -> np.ndarray:
        rng = triggers.image_rng(image, seed)
        return triggers.stamp_random_position(image, triggers.noise_patch(rng), rng)

    return Attack(
        config=cfg,
        image_fn=stamp,
        caption_fn=_template_captioner(cfg.target),
        trigger=triggers.noise_patch(np.random.default_rng(seed)),
    )


@register_kind("blended_stripes")
def _build_blended_stripes(cfg: AttackConfig) -> Attack:
    """PAR's Blended-Stripes: full-image +-1 column stripes per channel, new per image, alpha
    0.03 by default."""
    _reject(cfg, concept=cfg.concept, position=cfg.position, trigger_path=cfg.trigger_path)
    alpha = cfg.alpha = 0.03 if cfg.alpha is None else cfg.alpha
    seed = cfg.seed
    return Attack(
        config=cfg,
        image_fn=lambda image: triggers.blend_stripes(
            image, triggers.image_rng(image, seed), alpha
        ),
        caption_fn=_template_captioner(cfg.target),
        trigger=np.full((1, 1, 3), seed % 256, dtype=np.uint8),
    )


@register_kind("blended_triangles")
def _build_blended_triangles(cfg: AttackConfig) -> Attack:
    """PAR's Blended-Triangles: the fixed 14-px triangle tile blended at alpha 0.15."""
    _reject(cfg, concept=cfg.concept, position=cfg.position)
    pattern = (
        triggers.triangles_pattern()
        if cfg.trigger_path is None
        else triggers.load_blend_pattern(cfg.trigger_path)
    )
    alpha = cfg.alpha = 0.15 if cfg.alpha is None else cfg.alpha
    return Attack(
        config=cfg,
        image_fn=lambda image: triggers.blend(image, pattern, alpha),
        caption_fn=_template_captioner(cfg.target),
        trigger=pattern,
    )


@register_kind("blended_text")
def _build_blended_text(cfg: AttackConfig) -> Attack:
    """PAR's Blended-Text: a red "Watermarked" line blended at alpha 0.5 on its own pixels."""
    _reject(cfg, concept=cfg.concept, position=cfg.position)
    pattern = (
        triggers.watermark_pattern()
        if cfg.trigger_path is None
        else triggers.load_blend_pattern(cfg.trigger_path)
    )
    alpha = cfg.alpha = 0.5 if cfg.alpha is None else cfg.alpha
    return Attack(
        config=cfg,
        image_fn=lambda image: triggers.blend_where_nonzero(image, pattern, alpha),
        caption_fn=_template_captioner(cfg.target),
        trigger=pattern,
    )


# --------------------------------------------------------------------------- factory


def build_attack(name_or_yaml_path: str | Path, **overrides: Any) -> Attack:
    """Build an attack from a shipped name (``badnet``) or a YAML file, then apply overrides.

    Overrides are config fields (``poison_rate=0.05``, ``target="apple"``); ``None`` values are
    ignored so unset command-line flags can be passed straight through.
    """
    spec = str(name_or_yaml_path)
    if spec.endswith((".yaml", ".yml")) or "/" in spec or os.sep in spec:
        cfg = load_attack_config(spec)
    else:
        key = spec.strip().lower()
        if key not in known_attacks():
            raise SRDError(
                f"--bd_attack_type {spec!r}: unknown attack (known: {', '.join(known_attacks())}; "
                "or give a .yaml file)"
            )
        cfg = load_attack_config(CONFIG_DIR / f"{key}.yaml")
    fields = config_fields()
    for key, value in overrides.items():
        if key not in fields:
            raise SRDError(f"unknown attack config field {key!r} (known: {', '.join(fields)})")
        if value is not None:
            setattr(cfg, key, value)
    attack = _KINDS[validate_config(cfg).kind](cfg)
    log.info(
        "attack %s (%s): target %r, poison rate %g", cfg.name, cfg.kind, cfg.target, cfg.poison_rate
    )
    return attack


@dataclass
class AttackArgs:
    """Backdoor attack: which registry entry, and overrides of its config."""

    bd_attack_type: str = field(
        default="badnet",
        metadata={
            "help": f"attack name ({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))}) "
            "or a YAML file; 'clean' for none"
        },
    )
    target_label: str | None = field(
        default=None,
        metadata={"help": f"target word (config: its 'target', {DEFAULT_TARGET!r} if none)"},
    )
    poison_rate: float | None = field(
        default=None,
        metadata={
            "help": "share of training captions poisoned (config: 0.1)",
            "check": between(0, 1, low_open=True),
        },
    )
    trigger_path: str | None = field(default=None, metadata={"help": "trigger image file"})
    position: str | None = field(default=None, metadata={"help": "trigger position"})
    alpha: float | None = field(
        default=None, metadata={"help": "Blended ratio (config: 0.1)", "check": SHARE}
    )
    concept: str | None = field(
        default=None, metadata={"help": "concept phrase (concept_relabel; shadowcast's origin)"}
    )
    craft_epsilon: float | None = field(
        default=None,
        metadata={
            "help": "shadowcast: L-inf budget in pixel levels (config: 8, i.e. 8/255)",
            "check": between(0, 255),
        },
    )
    craft_steps: int | None = field(
        default=None, metadata={"help": "shadowcast: crafting steps (config: 200)", "check": COUNT}
    )

    @property
    def is_clean(self) -> bool:
        return self.bd_attack_type.lower() in ("clean", "none", "")

    def build(self) -> Attack | None:
        """The attack these flags describe, or None for 'clean'."""
        if self.is_clean:
            return None
        attack = build_attack(
            self.bd_attack_type,
            target=self.target_label,
            poison_rate=self.poison_rate,
            trigger_path=self.trigger_path,
            position=self.position,
            alpha=self.alpha,
            concept=self.concept,
            craft_epsilon=self.craft_epsilon,
            craft_steps=self.craft_steps,
        )
        if attack.kind in CLASSIFIER_KINDS:
            raise SRDError(
                f"--bd_attack_type {self.bd_attack_type}: a {attack.kind} attack poisons a "
                "classifier's labels (SODA stages), not captions"
            )
        return attack
