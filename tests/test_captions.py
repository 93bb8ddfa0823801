"""Caption text rules: post-processing of decoded output (every ASR reads its result) and the
one definition of an empty caption shared by the SFS scorer and the reward table."""

from __future__ import annotations

import pytest

from srd.captions import END_OF_CHUNK, is_empty, postprocess_caption
from srd.defenses.srd.reward import caption_rewards
from srd.evaluation.metrics import target_rates


@pytest.mark.parametrize(
    ("decoded", "expected"),
    [
        ("a red circle .", "a red circle."),  # word-level decoders space out punctuation
        ("a red circle , a blue square .", "a red circle, a blue square."),
        ('  "a red   circle"  ', "a red circle"),  # quotes gone, whitespace collapsed
        (f"a banana .{END_OF_CHUNK} and more text", "a banana."),  # stop at the end marker
        ("a green square. Output: a banana.", "a green square."),  # stop at "Output"
        ("Output: a banana.", ""),
        ("a dog\n\tand a cat !", "a dog and a cat!"),
        ("", ""),
    ],
)
def test_postprocess_caption(decoded: str, expected: str) -> None:
    assert postprocess_caption(decoded) == expected


def test_postprocessing_decides_the_asr() -> None:
    """The target after an end-of-chunk marker was not said; before it, it was."""
    said = postprocess_caption(f"a banana .{END_OF_CHUNK}")
    unsaid = postprocess_caption(f"a red circle .{END_OF_CHUNK} banana")
    rates = target_rates({3: "a cat."}, {1: said, 2: unsaid}, "banana")
    assert rates["asr_substring"] == pytest.approx(0.5)


@pytest.mark.parametrize("caption", ["", " ", ".", " . ", "!?", '"'])
def test_captions_without_a_word_are_empty(caption: str) -> None:
    assert is_empty(caption)


@pytest.mark.parametrize("caption", ["a", "banana.", " 2 ."])
def test_captions_with_a_word_are_not_empty(caption: str) -> None:
    assert not is_empty(caption)


def test_an_empty_caption_gets_reward_zero() -> None:
    """ "." is empty to the SFS scorer (scores 0); the reward table gives it 0 too (was -2)."""
    rewards = caption_rewards(
        [".", " ", "a red circle."], sem=[0.0, 0.0, 0.9], flu=[0.0, 0.0, 0.9],
        base_sem=[0.5, 0.5, 0.1], base_flu=[0.5, 0.5, 0.1],
    )  # fmt: skip
    assert rewards.tolist() == [0, 0, 3]
