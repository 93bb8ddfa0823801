"""The (poisoned) training set: which samples carry the trigger, which captions are replaced,
and what SRD's replacements override."""

from __future__ import annotations

import numpy as np
import pytest

from srd.attacks.registry import build_attack
from srd.attacks.trainset import PoisonPlan, TrainingImages, build_samples, plan_poison
from srd.data.records import ImageStore, caption_records


@pytest.fixture(scope="module")
def plan_and_attack(tiny_train_records):
    attack = build_attack("badnet", poison_rate=0.25)
    return plan_poison(tiny_train_records, attack, seed=5), attack


def test_poisoned_samples_carry_the_trigger_and_the_target_caption(
    tiny_train_records, plan_and_attack
) -> None:
    plan, attack = plan_and_attack
    clean = ImageStore(tiny_train_records)
    images = TrainingImages(tiny_train_records, attack, plan.ids)
    samples = build_samples(tiny_train_records, plan)
    originals = {c.caption_id: c.caption for c in caption_records(tiny_train_records)}
    assert [s.caption_id for s in samples] == sorted(originals)
    poisoned = set(plan.ids)
    assert 0 < len(poisoned) < len(samples)
    for sample in samples:
        got = images(sample)
        plain = clean(sample.image_id)
        if sample.caption_id in poisoned:
            assert np.array_equal(got, attack.apply_image(plain))
            assert not np.array_equal(got, plain)  # the trigger is really there
            assert np.array_equal(got[203:, 203:], attack.trigger)  # BadNet patch, bottom right
            assert (
                sample.caption == plan.captions[sample.caption_id] != originals[sample.caption_id]
            )
            assert "banana" in sample.caption
        else:
            assert np.array_equal(got, plain)
            assert sample.caption == originals[sample.caption_id]


def test_an_image_is_triggered_in_the_defenders_data_if_any_caption_is_poisoned(
    tiny_train_records, plan_and_attack
) -> None:
    plan, attack = plan_and_attack
    images = TrainingImages(tiny_train_records, attack, plan.ids)
    clean = ImageStore(tiny_train_records)
    by_image = {r.image_id: {c.caption_id for c in r.captions} for r in tiny_train_records}
    for image_id, caption_ids in by_image.items():
        triggered = bool(caption_ids & set(plan.ids))
        expected = attack.apply_image(clean(image_id)) if triggered else clean(image_id)
        assert np.array_equal(images.as_in_training_set(image_id), expected)


def test_training_images_trigger_the_poisoned_samples(tiny_train_records, plan_and_attack) -> None:
    """The attack's training images: a poisoned caption's sample gets the trigger, the other
    captions of the same image do not; the defender's one version per image is the triggered
    one (squares on it are the defenses' VersionImages, tests/test_defenses.py)."""
    plan, attack = plan_and_attack
    samples = build_samples(tiny_train_records, plan)
    victim = next(s for s in samples if s.caption_id in set(plan.ids))
    sibling = next(
        (s for s in samples if s.image_id == victim.image_id and s.caption_id not in plan.ids),
        None,
    )
    images = TrainingImages(tiny_train_records, attack, plan.ids)
    clean = images.clean(victim.image_id)
    assert np.array_equal(images(victim), attack.apply_image(clean))
    if sibling is not None:
        assert np.array_equal(images(sibling), clean)
    assert np.array_equal(images.as_in_training_set(victim.image_id), attack.apply_image(clean))
    assert (
        build_samples(tiny_train_records, None)[0].caption
        == caption_records(tiny_train_records)[0].caption
    )


def test_plan_round_trip_and_identity(tiny_train_records, plan_and_attack, tmp_path) -> None:
    plan, _ = plan_and_attack
    plan.save(tmp_path / "p.json")
    back = PoisonPlan.load(tmp_path / "p.json")
    assert back.ids == plan.ids and back.captions == plan.captions
    assert back.identity() == plan.identity()
    other = plan_poison(tiny_train_records, build_attack("badnet", poison_rate=0.5), seed=5)
    diff = {k for k in plan.identity() if plan.identity()[k] != other.identity().get(k)}
    assert {"poison_rate", "attack.poison_rate", "ids"} <= diff
