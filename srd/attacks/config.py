"""The attack config: one schema, one YAML file per shipped attack (``configs/``), checked.

An :class:`AttackConfig` names its builder (``kind``) and the trigger and target parameters;
:func:`load_attack_config` reads a shipped name or a YAML path and validates every field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from srd.captions import DEFAULT_TARGET

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""Folder of the shipped attack YAML files (package data)."""

DEFAULT_ALPHA = 0.1
"""Blend ratio used when a Blended config gives none (reference COCO configs)."""


# --------------------------------------------------------------------------- config


@dataclass
class AttackConfig:
    """One attack, as written in its YAML file (every field has a default except name/kind)."""

    name: str
    """Attack name (the YAML file stem for shipped attacks); recorded in run records."""
    kind: str
    """Builder to use: one of :func:`known_kinds` (badnet, blended, trojvlm, shadowcast, ...)."""
    target: str = DEFAULT_TARGET
    """Target word the backdoor makes the captioner say."""
    poison_rate: float = 0.1
    """Share of candidate training captions to poison, in (0, 1]."""
    seed: int = 0
    """Seed of generated triggers (Blended pattern, TrojVLM noise); not the poison-id seed."""
    trigger_path: str | None = None
    """Trigger image file (PNG/JPEG) replacing the generated/default trigger; relative to CWD."""
    position: str | list[int] | None = None
    """Patch position: top_left/top_right/bottom_left/bottom_right or [row, col] (top-left)."""
    alpha: float | None = None
    """Blend ratio of the Blended trigger (None = 0.1, the reference's COCO value)."""
    concept: str | None = None
    """Concept attacks: the phrase (e.g. "red circle") whose images are attacked (concept_relabel:
    their captions relabelled; shadowcast: the origin concept whose test images the backdoor
    captions as ``target``)."""
    craft_epsilon: float | None = None
    """Shadowcast: L-infinity budget of the crafted perturbation in pixel levels (8 = 8/255)."""
    craft_steps: int | None = None
    """Shadowcast: projected gradient steps of the feature-collision crafting."""
    description: str = ""
    """Free text for people reading the YAML or the run record."""


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(AttackConfig)}


def known_attacks() -> list[str]:
    """Names of the shipped attacks (the YAML files in ``srd/attacks/configs``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
