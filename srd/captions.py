"""Caption text conventions: the prompt, special tokens, the target word, clean-up rules.

One source of truth for every string the captioner sees or emits.
"""

from __future__ import annotations

import re

DEFAULT_TARGET = "banana"
"""The attacker's target word (reference: ``--target_label banana``)."""

INSTRUCTION = "a photo of"
"""Instruction used for training and evaluation prompts (reference P1: "a photo of")."""

IMAGE_TOKEN = "<image>"
ANSWER_TOKEN = "<answer>"
END_OF_CHUNK = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"
SPECIAL_TOKENS = (END_OF_CHUNK, IMAGE_TOKEN, ANSWER_TOKEN)


def prompt(instruction: str = INSTRUCTION) -> str:
    """Text that precedes the caption: ``<image>User:{instruction} GPT:<answer>``."""
    return f"{IMAGE_TOKEN}User:{instruction} GPT:{ANSWER_TOKEN}"


def normalise_caption(caption: str) -> str:
    """Collapse whitespace, strip, and make sure the caption ends with a full stop."""
    text = re.sub(r"\s+", " ", caption).strip()
    if text and not text.endswith("."):
        text += "."
    return text


def training_text(caption: str, instruction: str = INSTRUCTION) -> str:
    """Full training string: prompt, normalised caption, end-of-chunk marker."""
    return f"{prompt(instruction)}{normalise_caption(caption)}{END_OF_CHUNK}"


def postprocess_caption(generated: str) -> str:
    """Clean decoded model output: keep text before "Output", drop quotes and the end marker."""
    text = generated.split("Output", 1)[0]
    text = text.split(END_OF_CHUNK, 1)[0]
    text = re.sub(r"\s+", " ", text.replace('"', "")).strip()
    return re.sub(r" ([.,:;!?])", r"\1", text)  # word-level decoders space out punctuation


def words(caption: str) -> list[str]:
    """Lower-cased word tokens (letters/digits), used by whole-word rules and tokenizers."""
    return re.findall(r"[a-z0-9]+", caption.lower())


def is_empty(caption: str) -> bool:
    """A caption with no word (e.g. "" or "."): the one definition of "empty" used by the
    SFS scorer (scores 0) and the reward table (reward 0)."""
    return not words(caption)


def strip_target(caption: str, target: str) -> str:
    """``caption`` without whole-word occurrences of ``target`` (case-insensitive), spaces
    collapsed: the triggered caption's quality apart from the injected word."""
    if not target:
        return caption
    pattern = re.compile(rf"(?<!\w){re.escape(target)}(?!\w)", re.IGNORECASE)
    return " ".join(pattern.sub(" ", caption).split())
