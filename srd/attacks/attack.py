"""A built attack: the image transform, the caption transform and the image predicates.

Attack builders (:mod:`srd.attacks.registry`) turn an :class:`srd.attacks.config.AttackConfig`
into an :class:`Attack`; every stage poisons, evaluates and rebuilds the defender's data through
this one interface.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from srd.attacks import triggers
from srd.attacks.config import AttackConfig
from srd.captioner.features import image_key
from srd.errors import SRDError

K = TypeVar("K")


def _always(captions: Sequence[str]) -> bool:
    return True


@dataclass(frozen=True)
class Attack:
    """A built attack: the image trigger, the caption transform and the two image predicates.

    ``image_fn`` maps an HxWx3 uint8 image to a new one; ``caption_fn`` maps (caption, rng) to
    the poisoned caption; ``selects`` tells from an image's reference captions whether it may be
    poisoned (training) and whether its triggered version counts for the ASR (test).
    """

    config: AttackConfig
    image_fn: Callable[[np.ndarray], np.ndarray]
    caption_fn: Callable[[str, random.Random], str]
    selects: Callable[[Sequence[str]], bool] = _always
    trigger: np.ndarray | None = field(default=None, repr=False)
    """The trigger array (patch or blend pattern), kept for the run record's fingerprint."""
    test_selects: Callable[[Sequence[str]], bool] | None = None
    """Which test images count for the ASR when they differ from the poisoned ones (Shadowcast:
    poisons show the destination concept, the ASR is measured on the origin's); None: selects."""
    crafted: Mapping[bytes, np.ndarray] | None = field(default=None, repr=False)
    """Shadowcast's crafted poisons, by :func:`srd.captioner.features.image_key` of the clean
    image they replace (set by :meth:`with_crafted`)."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def target(self) -> str:
        return self.config.target

    @property
    def poison_rate(self) -> float:
        return self.config.poison_rate

    @property
    def has_image_trigger(self) -> bool:
        """False for attacks (Shadowcast) whose test images are used untouched."""
        return self.trigger is not None

    @property
    def needs_crafting(self) -> bool:
        """True for attacks (Shadowcast) whose poison images are crafted against the tower."""
        return self.config.craft_epsilon is not None

    def with_crafted(self, crafted: Mapping[bytes, np.ndarray]) -> Attack:
        """This attack with its crafted poisons: a poisoned image becomes its crafted version
        (looked up by content; an image with none is an SRDError, never silently clean)."""
        if not self.needs_crafting:
            raise SRDError(f"attack {self.name!r}: a {self.kind} attack has no crafted poisons")
        table = dict(crafted)

        def poison(image: np.ndarray) -> np.ndarray:
            found = table.get(image_key(image))
            if found is None:
                raise SRDError(f"attack {self.name!r}: no crafted poison for this training image")
            return found.copy()

        return dataclasses.replace(self, image_fn=poison, crafted=table)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """The triggered copy of an HxWx3 uint8 image (a plain copy when there is no trigger;
        Shadowcast's crafted version once :meth:`with_crafted` attached them)."""
        if self.needs_crafting and self.crafted is None:
            raise SRDError(
                f"attack {self.name!r}: its poison images are crafted by the attack stage "
                "(crafted_poisons.npz beside poison_ids.json); none are attached"
            )
        return self.image_fn(triggers.check_image(image))

    def apply_caption(self, caption: str, rng: random.Random) -> str:
        """The poisoned caption replacing ``caption`` (``rng`` drives any random choice)."""
        return self.caption_fn(caption, rng)

    def is_candidate(self, captions: Sequence[str]) -> bool:
        """Whether a training image with these reference captions may be poisoned.

        Pass ``[caption]`` to decide per caption instead of per image.
        """
        return self.selects(captions)

    def is_test_image(self, captions: Sequence[str]) -> bool:
        """Whether a test image with these reference captions counts for the ASR."""
        return (self.test_selects or self.selects)(captions)

    def test_images(self, captions_by_id: Mapping[K, Sequence[str]]) -> list[K]:
        """Ids of the test images the ASR is measured on (mapping order kept).

        Evaluate them through :meth:`apply_image` when the attack has an image trigger, as they
        are otherwise (concept attacks).
        """
        return [key for key, caps in captions_by_id.items() if self.is_test_image(caps)]

    def to_dict(self) -> dict[str, Any]:
        """Resolved config plus the trigger fingerprint, for run records (JSON-ready)."""
        record = dataclasses.asdict(self.config)
        record["trigger_sha256"] = (
            None if self.trigger is None else triggers.fingerprint(self.trigger)
        )
        return record
