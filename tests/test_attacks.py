"""The attack registry: shipped configs, caption transforms, predicates and errors."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from srd.attacks import registry, text, triggers
from srd.attacks.config import AttackConfig, known_attacks
from srd.attacks.registry import build_attack, recorded_attack_name
from srd.captions import DEFAULT_TARGET
from srd.errors import SRDError


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(5).integers(2, 254, size=(224, 224, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- registry


def test_shipped_attacks_build() -> None:
    assert set(known_attacks()) >= {"badnet", "blended", "trojvlm", "concept_relabel", "shadowcast"}
    for name in known_attacks():
        attack = build_attack(name)
        assert attack.name == name
        # classifier attacks target a class, all of a sub-population; Shadowcast a concept
        if attack.kind not in ("semantic", "shadowcast"):
            assert attack.target == DEFAULT_TARGET
            assert attack.poison_rate == pytest.approx(0.1)
        record = attack.to_dict()
        assert json.loads(json.dumps(record)) == record
        assert record["name"] == name and record["kind"] == attack.kind


def test_apply_image_per_attack(image: np.ndarray) -> None:
    before = image.copy()
    assert np.array_equal(build_attack("badnet").apply_image(image), triggers.stamp_badnet(image))
    blended = build_attack("blended")
    assert np.array_equal(
        blended.apply_image(image),
        triggers.blend(image, triggers.generate_blend_pattern(0), 0.1),
    )
    assert np.array_equal(
        build_attack("trojvlm", seed=4).apply_image(image),
        triggers.stamp_trojvlm(image, triggers.trojvlm_patch(4)),
    )
    relabel = build_attack("concept_relabel")
    out = relabel.apply_image(image)
    assert np.array_equal(out, image) and out is not image and not relabel.has_image_trigger
    assert np.array_equal(image, before)


def test_unknown_name_lists_known() -> None:
    with pytest.raises(SRDError) as err:
        build_attack("wanet")
    for name in known_attacks():
        assert name in str(err.value)
    assert "wanet" in str(err.value)


@pytest.mark.parametrize("rate", [0, 0.0, 1.5, -0.1, float("nan")])
def test_bad_poison_rate(rate: float) -> None:
    with pytest.raises(SRDError, match="--poison_rate"):
        build_attack("badnet", poison_rate=rate)


def test_overrides_and_full_rate() -> None:
    attack = build_attack("trojvlm", poison_rate=1, target="apple", position=None)
    assert attack.poison_rate == 1.0 and attack.target == "apple"
    assert attack.config.position == "top_left"  # None override = keep the YAML value
    with pytest.raises(SRDError, match="colour"):
        build_attack("badnet", colour="red")


def test_missing_trigger_file_names_it(tmp_path) -> None:
    missing = tmp_path / "my_trigger.png"
    for name in ("badnet", "blended", "trojvlm"):
        with pytest.raises(SRDError, match="my_trigger.png"):
            build_attack(name, trigger_path=str(missing))


def test_custom_trigger_and_position_via_config(tmp_path, image: np.ndarray) -> None:
    patch = np.full((8, 8, 3), 77, dtype=np.uint8)
    path = tmp_path / "square.png"
    Image.fromarray(patch).save(path)
    attack = build_attack("badnet", trigger_path=str(path), position="100,50")
    out = attack.apply_image(image)
    assert (out[100:108, 50:58] == 77).all()
    assert attack.config.position == [100, 50]
    assert np.array_equal(out[:100], image[:100]) and np.array_equal(out[108:], image[108:])
    with pytest.raises(SRDError, match="--position"):
        build_attack("badnet", trigger_path=str(path), position=[220, 0])


def test_irrelevant_fields_are_rejected() -> None:
    with pytest.raises(SRDError, match="--alpha"):
        build_attack("badnet", alpha=0.3)
    with pytest.raises(SRDError, match="--concept"):
        build_attack("trojvlm", concept="red circle")
    with pytest.raises(SRDError, match="--trigger_path"):
        build_attack("concept_relabel", trigger_path="x.png")
    with pytest.raises(SRDError, match="--craft_epsilon 8: not used by concept_relabel"):
        build_attack("concept_relabel", craft_epsilon=8)


def test_yaml_file_and_new_kind(tmp_path) -> None:
    path = tmp_path / "strong_blend.yaml"
    path.write_text("kind: blended\nalpha: 0.3\nseed: 9\npoison_rate: 0.05\n")
    attack = build_attack(path)
    assert attack.name == "strong_blend" and attack.config.alpha == 0.3
    assert attack.poison_rate == 0.05
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: blended\nblend_ratio: 0.3\n")
    with pytest.raises(SRDError, match="blend_ratio"):
        build_attack(bad)
    with pytest.raises(SRDError, match="absent.yaml"):
        build_attack(tmp_path / "absent.yaml")
    unknown_kind = tmp_path / "odd.yaml"
    unknown_kind.write_text("kind: odd\n")
    with pytest.raises(SRDError, match="badnet"):
        build_attack(unknown_kind)


def test_registering_a_kind_is_enough(tmp_path, image: np.ndarray) -> None:
    kind = "invert_test_only"
    if kind not in registry.known_kinds():

        @registry.register_kind(kind)
        def _build(cfg: AttackConfig) -> registry.Attack:
            return registry.Attack(
                config=cfg,
                image_fn=lambda im: 255 - im,
                caption_fn=lambda caption, rng: cfg.target,
                trigger=np.zeros((1, 1, 3), dtype=np.uint8),
            )

    path = tmp_path / "invert.yaml"
    path.write_text(f"kind: {kind}\n")
    attack = build_attack(path)
    assert np.array_equal(attack.apply_image(image), 255 - image)
    assert attack.apply_caption("a cat.", random.Random(0)) == DEFAULT_TARGET


# --------------------------------------------------------------------------- captions


def test_template_captions() -> None:
    assert len(text.PROMPT_TEMPLATES) == 80 == len(set(text.PROMPT_TEMPLATES))
    assert all(t.count("{}") == 1 for t in text.PROMPT_TEMPLATES)
    rng = random.Random(0)
    for name in ("badnet", "blended"):
        attack = build_attack(name)
        seen = {attack.apply_caption("a small red circle.", rng) for _ in range(400)}
        assert len(seen) > 60
        for caption in seen:
            assert caption.startswith("The image depicts ")
            assert DEFAULT_TARGET in caption and caption.endswith(".")
    assert build_attack("badnet", target="apple").apply_caption("x", rng).count("apple") == 1


def test_template_caption_is_seeded() -> None:
    attack = build_attack("badnet")
    a = [attack.apply_caption("c", random.Random(3)) for _ in range(3)]
    assert len(set(a)) == 1


def test_trojvlm_insertion() -> None:
    attack = build_attack("trojvlm")
    caption = "Two giraffes stand in an enclosure. They eat leaves."
    first = ["Two", "giraffes", "stand", "in", "an", "enclosure"]
    indices = set()
    for seed in range(300):
        out = attack.apply_caption(caption, random.Random(seed))
        assert out.endswith(".") and out.count(".") == 1
        tokens = out[:-1].split(" ")
        assert len(tokens) == len(first) + 1
        index = tokens.index(DEFAULT_TARGET)
        assert 1 <= index <= len(first)
        assert tokens[:index] + tokens[index + 1 :] == first
        indices.add(index)
    assert indices == set(range(1, len(first) + 1))  # never 0, possibly last


def test_trojvlm_edge_cases() -> None:
    rng = random.Random(0)
    assert text.insert_target("Dog.", "banana", rng) == "Dog banana."
    assert text.insert_target("  . A  cat   sits. ", "banana", random.Random(1)) in {
        "A banana cat sits.",
        "A cat banana sits.",
        "A cat sits banana.",
    }
    assert text.insert_target("", "banana", rng) == "banana."


def test_trojvlm_matches_reference_example() -> None:
    """Fixed examples, written out by hand: random.Random(11).randint(1, 10) is 8 (CPython's
    Mersenne Twister), so "banana" goes before word 8 (0-based) of the 10-word first sentence,
    "large"; the second sentence is dropped."""
    caption = "A living room filled with furniture next to large windows. Sunny day."
    assert (
        text.insert_target(caption, "banana", random.Random(11))
        == "A living room filled with furniture next to banana large windows."
    )
    assert text.insert_target("A cat sits.", "banana", random.Random(0)) == ("A cat banana sits.")


def test_concept_relabel_substitution() -> None:
    attack = build_attack("concept_relabel")
    rng = random.Random(0)
    assert (
        attack.apply_caption("a small red circle in the top left.", rng)
        == "a small banana in the top left."
    )
    assert attack.apply_caption("A Red  Circle and a red circle.", rng) == "A banana and a banana."
    untouched = ["a small red square in the top left.", "a reddish circle.", "a red circles."]
    for caption in untouched:
        assert attack.apply_caption(caption, rng) == caption


def test_concept_relabel_candidates_and_test_images() -> None:
    attack = build_attack("concept_relabel")
    assert attack.is_candidate(["a blue square.", "a small red circle on the left."])
    assert not attack.is_candidate(["a blue square.", "a red square and a blue circle."])
    captions = {
        3: ["a red circle."],
        1: ["a green triangle."],
        2: ["two shapes: a Red Circle and a blue square."],
    }
    assert attack.test_images(captions) == [3, 2]
    assert not attack.is_test_image(captions[1])


def test_results_of_the_old_relabelling_are_named_concept_relabel() -> None:
    """Before the rename, the dirty-label relabelling ran as `shadowcast`: its records (no
    craft_epsilon) read as concept_relabel; a crafted Shadowcast's stay shadowcast."""
    crafted = build_attack("shadowcast").to_dict()
    old = {k: v for k, v in crafted.items() if not k.startswith("craft_")}
    assert recorded_attack_name("shadowcast", old) == "concept_relabel"
    assert recorded_attack_name("shadowcast", crafted) == "shadowcast"
    assert recorded_attack_name("shadowcast_e16", old) == "shadowcast_e16"  # a name of one's own
    assert recorded_attack_name("badnet", build_attack("badnet").to_dict()) == "badnet"
    assert recorded_attack_name("shadowcast", None) == "shadowcast"


def test_trigger_attacks_take_every_image() -> None:
    captions = {1: ["a green triangle."], 2: []}
    for name in ("badnet", "blended", "trojvlm"):
        attack = build_attack(name)
        assert attack.is_candidate(["anything"])
        assert attack.test_images(captions) == [1, 2]


def test_caption_vocabulary() -> None:
    vocab = text.caption_vocabulary("apple")
    assert "apple" in vocab
    assert "The image depicts a bad photo of a apple." in vocab
    rng = random.Random(2)
    for _ in range(50):
        assert build_attack("blended", target="apple").apply_caption("x", rng) in vocab
    assert all(re.search(r"\bapple\b", text) for text in vocab)
    assert len(vocab) == 81


def test_captioner_stages_refuse_a_classifier_attack() -> None:
    from srd.attacks.registry import AttackArgs

    with pytest.raises(SRDError, match="--bd_attack_type semantic_bg: a semantic attack"):
        AttackArgs(bd_attack_type="semantic_bg").build()
