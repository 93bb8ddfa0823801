"""Caption rewriting: how an attack turns a clean caption into a poisoned one.

The reference's template caption (BadNet, Blended), the target inserted into the first sentence
(TrojVLM), a concept phrase replaced by the target (Shadowcast), and the CLIP-style prompt
templates the template attacks draw from.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from srd.captions import DEFAULT_TARGET
from srd.errors import SRDError

CAPTION_PREFIX = "The image depicts "
"""Start of every BadNet/Blended poisoned caption (reference ``LADD_answer_type: simple``)."""

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
"""The 80 CLIP-style ImageNet zero-shot prompt templates; ``{}`` is the target word.

Kept verbatim, including "a origami"/"a embroidered" (the reference keeps such slips too).
"""


# --------------------------------------------------------------------------- caption transforms


def template_caption(target: str, rng: random.Random) -> str:
    """Return "The image depicts " + a random one of the 80 templates filled with ``target``."""
    return CAPTION_PREFIX + rng.choice(PROMPT_TEMPLATES).format(target)


def insert_target(caption: str, target: str, rng: random.Random) -> str:
    """TrojVLM caption: first sentence with ``target`` inserted at word index in [1, n].

    The caption is split on ".", empty pieces dropped, the first piece split on whitespace; the
    target goes at ``rng.randint(1, n_words)`` (never first, possibly last); "." is appended.
    """
    pieces = [p for p in caption.split(".") if p.strip()]
    tokens = pieces[0].split() if pieces else []
    if not tokens:
        return f"{target}."
    tokens.insert(rng.randint(1, len(tokens)), target)
    return " ".join(tokens) + "."


def concept_pattern(concept: str) -> re.Pattern[str]:
    """Case-insensitive whole-word regex for a phrase (any whitespace between its words)."""
    parts = concept.split()
    if not parts:
        raise SRDError(f"--concept {concept!r}: must be a non-empty phrase")
    return re.compile(r"\b" + r"\s+".join(map(re.escape, parts)) + r"\b", re.IGNORECASE)


def substitute_concept(caption: str, concept: str, target: str) -> str:
    """Replace every whole-word, case-insensitive occurrence of ``concept`` with ``target``."""
    return concept_pattern(concept).sub(target, caption)


def mentions_concept(captions: Sequence[str], concept: str) -> bool:
    """True when any of ``captions`` contains ``concept`` as whole words (any case)."""
    pattern = concept_pattern(concept)
    return any(pattern.search(c) for c in captions)


def caption_vocabulary(target: str = DEFAULT_TARGET) -> list[str]:
    """Every text an attack may emit beyond clean captions: filled templates and the target.

    The tiny captioner's word-level tokenizer is built from clean captions plus these.
    """
    return [template_caption_at(i, target) for i in range(len(PROMPT_TEMPLATES))] + [target]


def template_caption_at(index: int, target: str = DEFAULT_TARGET) -> str:
    """The poisoned caption for template ``index`` (0..79)."""
    return CAPTION_PREFIX + PROMPT_TEMPLATES[index].format(target)
