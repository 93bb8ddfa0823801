"""Clean-label Shadowcast: which images it poisons and measures, the crafted poisons (within the
budget, features moved toward the origin concept), and how every later stage reads them back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from srd_fixtures import data_flags, export_clean_and_backdoor, load_script, model_flags

from srd.attacks.craft import (
    CRAFTED_FILE,
    collide,
    crafted_for_run,
    load_crafted,
    to_unit,
    tower_encoder,
)
from srd.attacks.registry import build_attack
from srd.attacks.text import mentions_concept
from srd.attacks.trainset import POISON_FILE, PoisonPlan, TrainingImages, plan_attack, plan_poison
from srd.data.records import ImageStore
from srd.data.scenes import COLOURS, SHAPES
from srd.errors import SRDError
from srd.evaluation.metrics import contains_target


def _concepts(records) -> tuple[str, str]:
    """An (origin, destination) pair of the tiny benchmark with images showing each alone."""
    texts = [" ".join(c.caption for c in r.captions) for r in records]
    phrases = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    alone = {
        (a, b): (
            sum(a in t and b not in t for t in texts),
            sum(b in t and a not in t for t in texts),
        )
        for a in phrases
        for b in phrases
        if a != b
    }
    return max(alone, key=lambda pair: min(alone[pair]))


@pytest.fixture(scope="module")
def shadowcast(tiny_train_records):
    origin, destination = _concepts(tiny_train_records)
    return build_attack(
        "shadowcast",
        concept=origin,
        target=destination,
        poison_rate=1.0,
        craft_epsilon=8,
        craft_steps=3,
    )


def test_clean_label_predicates() -> None:
    attack = build_attack("shadowcast")  # red circle -> green triangle
    assert attack.needs_crafting and not attack.has_image_trigger
    assert attack.is_candidate(["a green triangle and a blue square."])
    assert not attack.is_candidate(["a green triangle and a red circle."])  # shows the origin too
    assert attack.is_test_image(["a small red circle on the left."])
    assert not attack.is_test_image(["a red circle and a green triangle."])
    assert attack.apply_caption("a green triangle.", None) == "a green triangle."  # clean label
    with pytest.raises(SRDError, match="crafted by the attack stage"):
        attack.apply_image(np.zeros((224, 224, 3), np.uint8))  # never silently the clean image


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"craft_epsilon": -1}, r"--craft_epsilon -1.0: must be in \[0, 255\]"),
        ({"craft_epsilon": 300}, r"--craft_epsilon 300.0: must be in \[0, 255\]"),
        ({"craft_epsilon": "x"}, "--craft_epsilon 'x': not a number"),
        ({"craft_steps": 0}, "--craft_steps 0: must be at least 1"),
        ({"craft_steps": 2.5}, "--craft_steps 2.5: not an integer"),
        ({"target": "Red Circle"}, "name the same concept"),
    ],
)
def test_bad_budgets(overrides, message) -> None:
    with pytest.raises(SRDError, match=message):
        build_attack("shadowcast", **overrides)


def test_needs_whole_images(tiny_train_records, shadowcast) -> None:
    with pytest.raises(SRDError, match="--poison_unit caption: .*pass --poison_unit image"):
        plan_poison(tiny_train_records, shadowcast, seed=0, unit="caption")
    plan = plan_poison(tiny_train_records, shadowcast, seed=0, unit="image")
    by_image = {r.image_id: [c.caption_id for c in r.captions] for r in tiny_train_records}
    images = plan.meta["poisoned_images"]
    assert images and sorted(i for img in images for i in by_image[img]) == plan.ids
    assert all(plan.captions[i] == c.caption for r in tiny_train_records for c in r.captions
               if (i := c.caption_id) in plan.captions)  # fmt: skip


def test_collision_stays_in_budget_and_moves_features(make_captioner, tiny_images) -> None:
    encode = tower_encoder(make_captioner())
    ids = sorted(tiny_images)
    bases = np.stack([tiny_images[i] for i in ids[:3]])
    targets = np.stack([tiny_images[i] for i in ids[3:6]])
    crafted, dist = collide(encode, bases, targets, epsilon=8, steps=10)
    change = np.abs(crafted.astype(int) - bases.astype(int))
    assert crafted.dtype == np.uint8 and change.max() <= 8 and change.max() > 0
    assert (dist["after"] < dist["before"]).all()  # toward the origin image's features
    goal = encode(to_unit(targets)).detach()
    measured = (encode(to_unit(crafted)).detach() - goal).flatten(1).norm(dim=1).numpy()
    assert np.allclose(measured, dist["after"], rtol=1e-5)  # measured on the uint8 poisons
    same, _ = collide(encode, bases, targets, epsilon=0, steps=10)
    assert np.array_equal(same, bases)  # budget 0: the images as they are


def test_every_stage_reads_the_crafted_poisons_back(
    make_captioner, tiny_train_records, shadowcast, tmp_path
) -> None:
    plan = plan_poison(tiny_train_records, shadowcast, seed=0, unit="image")
    captioner = make_captioner()
    attack = crafted_for_run(
        lambda: tower_encoder(captioner), shadowcast, plan.meta, tiny_train_records, 0, tmp_path,
        reuse=False,
    )  # fmt: skip
    plan.save(tmp_path / POISON_FILE)
    crafted = load_crafted(tmp_path / CRAFTED_FILE, plan.meta["crafted"]["sha256"])
    assert crafted.image_ids == plan.meta["poisoned_images"] and crafted.epsilon == 8.0
    rebuilt = plan_attack(PoisonPlan.load(tmp_path / POISON_FILE), tmp_path / POISON_FILE)
    clean = ImageStore(tiny_train_records)
    images = TrainingImages(tiny_train_records, rebuilt, plan.ids)
    poisoned = set(crafted.image_ids)
    for record in tiny_train_records:
        expected = (
            crafted.images[crafted.image_ids.index(record.image_id)]
            if record.image_id in poisoned
            else clean(record.image_id)
        )
        assert np.array_equal(images.as_in_training_set(record.image_id), expected)
        if record.image_id in poisoned:
            assert np.array_equal(attack.apply_image(clean(record.image_id)), expected)
            assert not np.array_equal(expected, clean(record.image_id))
        else:  # an image with no crafted version is never passed off as one
            with pytest.raises(SRDError, match="no crafted poison"):
                attack.apply_image(clean(record.image_id))
    # A resumed run reuses the file; a changed or missing one is refused, never re-crafted.
    again = crafted_for_run(
        lambda: pytest.fail("re-crafted"), shadowcast, dict(plan.meta), tiny_train_records, 0,
        tmp_path, reuse=True, recorded_sha=plan.meta["crafted"]["sha256"],
    )  # fmt: skip
    assert again.crafted.keys() == attack.crafted.keys()
    path = tmp_path / CRAFTED_FILE
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(SRDError, match="sha256 differs"):
        plan_attack(PoisonPlan.load(tmp_path / POISON_FILE), tmp_path / POISON_FILE)
    path.unlink()
    with pytest.raises(SRDError, match="crafted Shadowcast poisons are missing"):
        plan_attack(PoisonPlan.load(tmp_path / POISON_FILE), tmp_path / POISON_FILE)
    with pytest.raises(SRDError, match="crafted poisons are gone"):
        crafted_for_run(
            lambda: pytest.fail("re-crafted"), shadowcast, dict(plan.meta), tiny_train_records,
            0, tmp_path, reuse=True, recorded_sha="0" * 64,
        )  # fmt: skip


def test_attack_and_evaluation_stages(make_captioner, tiny_data_args, tmp_path) -> None:
    """Stage A crafts, records and reuses the poisons; stage B measures the ASR on the origin's
    test images and never counts an image showing the destination as a false trigger."""
    train_backdoor = load_script("train/train_backdoor.py")
    evaluate = load_script("eval/evaluate.py")
    clean, backdoor = export_clean_and_backdoor(make_captioner, tmp_path / "models")
    records = tiny_data_args.split("train") + tiny_data_args.split("test")
    origin, destination = _concepts(records)
    attack = ["--bd_attack_type", "shadowcast", "--concept", origin, "--target_label", destination]
    argv = [
        *data_flags(tiny_data_args), *model_flags(clean, clean.checkpoint_path), *attack,
        "--external_save_dir", str(tmp_path / "runs"), "--num_epochs", "1", "--batch_size", "8",
        "--poison_rate", "1", "--craft_steps", "2",
    ]  # fmt: skip
    with pytest.raises(SRDError, match="pass --poison_unit image"):
        train_backdoor.main(argv)
    assert not (tmp_path / "runs" / "backdoor-shadowcast").exists()  # refused before writing
    train_backdoor.main([*argv, "--poison_unit", "image"])
    run = tmp_path / "runs" / "backdoor-shadowcast"
    plan = PoisonPlan.load(run / POISON_FILE)
    recorded = plan.meta["crafted"]
    assert recorded["max_pixel_change"] <= 8 and recorded["distance_before_mean"] > 0
    assert load_crafted(run / CRAFTED_FILE, recorded["sha256"]).steps == 2
    (run / "DONE").unlink()
    stamp = (run / CRAFTED_FILE).stat().st_mtime_ns
    train_backdoor.main([*argv, "--poison_unit", "image", "--resume_from_checkpoint"])
    assert (run / CRAFTED_FILE).stat().st_mtime_ns == stamp  # reused, not crafted again

    out = tmp_path / "result"
    evaluate.main([
        *data_flags(tiny_data_args), *model_flags(clean, backdoor), *attack,
        "--results_file", str(out), "--model_name", "sc", "--sfs_data_dir", str(tmp_path / "sfs"),
        "--batch_size", "4", "--num_beams", "1", "--max_new_tokens", "4",
    ])  # fmt: skip
    written = json.loads((out / "sc.json").read_text())
    refs = {str(r.image_id): [c.caption for c in r.captions] for r in tiny_data_args.split("test")}
    shows = {
        i: (mentions_concept(c, origin), mentions_concept(c, destination)) for i, c in refs.items()
    }
    asr_ids = {i for i, (o, d) in shows.items() if o and not d}
    assert set(written["predictions"]["triggered"]) == asr_ids and written["num_asr_images"]
    others = [i for i, (o, d) in shows.items() if i not in asr_ids and not d]
    named = [contains_target(written["predictions"]["clean"][i], destination) for i in others]
    assert written["metrics"]["false_trigger_substring"] == pytest.approx(np.mean(named))
