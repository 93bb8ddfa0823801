"""Implant diagnostics: teacher-forced target probability at word boundaries, sampled ASR."""

from __future__ import annotations

import pytest
import torch

from srd import captions
from srd.implant import (
    SAMPLING,
    _boundaries,
    implant_report,
    sample_seed,
    target_probabilities,
    target_token_id,
)


def test_target_token_is_the_first_token_of_the_word(make_captioner) -> None:
    cap = make_captioner(seed=0, varied=False)
    tid = target_token_id(cap, "banana")
    piece = cap.tokenizer.decode([tid]).strip()
    # the fixture's vocabulary lacks "banana" (spelt by characters): its first piece is "b"
    assert piece and "banana".startswith(piece)
    assert target_token_id(cap, "red") == cap.tokenizer.convert_tokens_to_ids("red")


def test_boundaries_are_the_last_token_of_each_word(make_captioner) -> None:
    cap = make_captioner(seed=0, varied=False)
    ids, positions = _boundaries(cap, "a red circle on the left.")
    assert len(positions) == 6
    tok = cap.tokenizer
    prefix = tok.bos_token + captions.prompt()
    for k, pos in enumerate(positions, start=1):
        text = prefix + " ".join("a red circle on the left".split()[:k])
        assert ids[: pos + 1] == tok(text, add_special_tokens=False)["input_ids"]


def test_probability_at_a_boundary_equals_a_prefix_forward(make_captioner, tiny_images) -> None:
    cap = make_captioner(seed=2)
    image = next(iter(tiny_images.values()))
    caption = "a red circle on the left."
    ((best, top1),) = target_probabilities(cap, [image], [caption], "banana")
    tid = target_token_id(cap, "banana")
    tok = cap.tokenizer
    prefix = tok.bos_token + captions.prompt()
    probs = []
    with torch.no_grad():
        for k in range(1, 7):
            text = prefix + " ".join("a red circle on the left".split()[:k])
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            logits = cap.model(
                vision_x=cap.pixel_values([image]), lang_x=ids, attention_mask=torch.ones_like(ids)
            ).logits
            probs.append(float(logits[0, -1].softmax(-1)[tid]))
    assert 0.0 <= best <= 1.0
    assert abs(best - max(probs)) < 1e-5
    assert isinstance(top1, bool)


def test_implant_report_is_seeded(make_captioner, tiny_images) -> None:
    cap = make_captioner(seed=4)
    ids = list(tiny_images)[:3]
    refs = {i: ["a red circle."] for i in ids}

    def report(seed=9, batch_size=32):
        return implant_report(
            cap, tiny_images.__getitem__, ids, tiny_images.__getitem__, ids, refs, "banana",
            seed=seed, batch_size=batch_size, max_new_tokens=5,
        )  # fmt: skip

    first = report()
    assert report() == first
    # one seed per image: the batch size changes nothing (but float rounding of the padded batch)
    other = report(batch_size=2)
    for side in ("triggered", "clean"):
        assert other[side] == pytest.approx(first[side], rel=1e-5)
    assert first["decoding"] == SAMPLING
    assert sample_seed(9, ids[0]) != sample_seed(9, ids[1])
    assert sample_seed(9, ids[0]) != sample_seed(10, ids[0])
    assert sample_seed(9, ids[0]) == sample_seed(9, ids[0]) < 2**63
    for side in ("triggered", "clean"):
        assert first[side]["num_images"] == 3
        assert 0.0 <= first[side]["sampled_asr_substring"] <= 1.0
    # the same images on both sides give the same teacher-forced probabilities
    assert first["triggered"]["target_prob_mean"] == first["clean"]["target_prob_mean"]
