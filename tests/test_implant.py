"""Implant diagnostics: teacher-forced target probability at word boundaries, sampled ASR."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from srd_fixtures import (
    data_flags,
    export_clean_and_backdoor,
    load_script,
    model_flags,
    write_poison_ids,
)

from srd import captions
from srd.attacks.registry import build_attack
from srd.attacks.trainset import PoisonPlan
from srd.captioner.factory import load_captioner
from srd.data.records import load_image
from srd.errors import SRDError
from srd.evaluation.implant import (
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


def test_training_asr_captions_the_poisoned_training_images_with_and_without_the_trigger(
    make_captioner, tiny_data_args, tiny_train_records, tmp_path
) -> None:
    """eval/training_asr.py: a seeded choice of the attack run's poisoned training images,
    captioned as the training set holds them (triggered) and clean; bad input refused."""
    training_asr = load_script("eval/training_asr.py")
    clean_args, backdoor = export_clean_and_backdoor(make_captioner, tmp_path / "models")
    poison = write_poison_ids(tiny_train_records, tmp_path / "run")
    out = tmp_path / "diagnostics" / "training_asr.json"
    flags = [*data_flags(tiny_data_args), *model_flags(clean_args, backdoor),
             "--poison_ids_path", str(poison), "--num_images", "3",
             "--output", str(out)]  # fmt: skip
    result = training_asr.main(flags)
    assert json.loads(out.read_text()) == result
    plan = PoisonPlan.load(poison)
    poisoned_images = {
        c.image_id for r in tiny_train_records for c in r.captions if c.caption_id in plan.ids
    }
    ids = [int(k) for k in result["predictions"]["triggered"]]
    assert len(ids) == 3 and set(ids) <= poisoned_images
    assert result["poisoned_training_images"] == len(poisoned_images)
    # the same captions from the images made here: the trigger on the clean image, and none
    path = {r.image_id: r.path for r in tiny_train_records}
    model = load_captioner(dataclasses.replace(clean_args, checkpoint_path=str(backdoor)))
    badnet = build_attack("badnet")
    clean = [load_image(path[i]) for i in ids]
    expected = {
        "triggered": model.caption([badnet.apply_image(im) for im in clean], num_beams=3,
                                   max_new_tokens=20),
        "clean": model.caption(clean, num_beams=3, max_new_tokens=20),
    }  # fmt: skip
    assert expected["triggered"] != expected["clean"]  # (so a swapped version would fail)
    for version, texts in expected.items():
        assert list(result["predictions"][version].values()) == texts
    assert 0.0 <= result["asr_triggered"] <= 1.0 and 0.0 <= result["asr_clean_versions"] <= 1.0
    assert result["concept"] is None and result["concept_triggered"] is None  # BadNet has none
    captions = {1: "a red circle.", 2: "a Red  Circle and a cube.", 3: "a red circles."}
    assert training_asr.concept_rate(captions, "red circle") == pytest.approx(2 / 3)
    assert len(poisoned_images) > 3  # so another seed chooses other images
    other = training_asr.main([*flags, "--seed", "1"])["predictions"]["triggered"]
    assert other.keys() != result["predictions"]["triggered"].keys()
    with pytest.raises(SRDError, match="--num_images 0: must be at least 1"):
        training_asr.main([*flags, "--num_images", "0"])
    with pytest.raises(SRDError, match="--poison_ids_path .*: file not found"):
        training_asr.main([*flags, "--poison_ids_path", str(tmp_path / "missing.json")])
