"""The defense registry and the baselines' data on the tiny benchmark (24 train images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from srd.attacks.registry import build_attack
from srd.attacks.trainset import PoisonPlan, TrainingImages, build_samples, plan_poison
from srd.captions import strip_target
from srd.data.records import CaptionRecord, ImageRecord
from srd.data.scenes import BACKGROUNDS, COLOUR_JITTER, COLOURS
from srd.defenses import DEFENSES, DefenderData, build_defense
from srd.defenses import __main__ as applicable
from srd.defenses.coverage import trigger_box
from srd.defenses.pruning import cross_attention_blocks
from srd.defenses.purify import blur_image, spatial_image
from srd.defenses.quality import psnr, ssim
from srd.defenses.rating import defense_effectiveness_rating
from srd.defenses.squares import RandomTries, covering_action
from srd.defenses.versions import first_occurrences, triggered_images
from srd.errors import SRDError
from srd.geometry import MASK_COLOURS, MASK_SIZES, RED, apply_action, decode_action


@pytest.fixture(scope="module")
def defender(tiny_train_records) -> DefenderData:
    attack = build_attack("badnet", poison_rate=0.2)
    plan = plan_poison(tiny_train_records, attack, seed=0)
    return DefenderData(tiny_train_records, plan, attack, seed=3)


def test_registry_lists_every_defense_and_rejects_unknown_names() -> None:
    assert {"none", "srd", "no_mask", "clean_finetune", "random_squares", "oracle_square",
            "fine_pruning", "blur", "spatial"} <= set(DEFENSES)  # fmt: skip
    with pytest.raises(SRDError) as exc:
        build_defense("nope")
    message = str(exc.value)
    assert "\n" not in message and message.startswith("--defense nope: unknown defense")
    assert "srd" in message


def test_the_kind_refine_is_what_builds_a_training_set() -> None:
    """One statement of which defenses train (the light budget's --max_steps, --trains): the
    registry's kind "refine", and exactly those override the training set."""
    from srd.defenses.registry import Defense

    for name, cls in DEFENSES.items():
        assert (cls.training_set is not Defense.training_set) == (cls.kind == "refine"), name
    assert applicable.trains(["no_mask", "clp", "blur", "srd", "par"]) == ["no_mask", "srd", "par"]


def test_no_mask_data_equals_the_defenders_input(defender) -> None:
    samples, images = build_defense("no_mask").training_set(defender)
    assert samples == build_samples(defender.records, defender.plan)
    reference = TrainingImages(defender.records, defender.attack, defender.plan.ids)
    triggered = 0
    for s in samples:
        want = reference.as_in_training_set(s.image_id)
        assert np.array_equal(images(s), want)
        triggered += s.image_id in reference.poisoned_images
    assert triggered > 0


def test_srd_paints_its_square_on_the_defenders_version(defender) -> None:
    """SRD's D4 images (the reference's B15: one image per id): the manifest's square on the
    version the defender's data holds, triggered if any caption of the image is poisoned."""
    actions = {r.image_id: (7 * r.image_id) % 500 for r in defender.records}
    srd = build_defense("srd", clean_data_save="x")
    srd.mask_actions = lambda data: actions  # the manifest's actions (read_merged is tested)
    samples, images = srd.training_set(defender)
    held = TrainingImages(defender.records, defender.attack, defender.plan.ids)
    assert held.poisoned_images and set(actions) - held.poisoned_images
    for s in samples:
        want = apply_action(held.as_in_training_set(s.image_id), actions[s.image_id])
        assert np.array_equal(images(s), want)


def test_srd_without_manifest_is_a_flag_error(defender) -> None:
    with pytest.raises(SRDError, match="--clean_data_save"):
        build_defense("srd").training_set(defender)


def test_clean_finetune_drops_poisoned_captions_and_triggers(defender) -> None:
    samples, images = build_defense("clean_finetune").training_set(defender)
    poisoned = set(defender.plan.ids)
    assert poisoned and not poisoned & {s.caption_id for s in samples}
    assert len(samples) == sum(len(r.captions) for r in defender.records) - len(poisoned)
    clean = TrainingImages(defender.records)
    assert all(np.array_equal(images(s), clean.clean(s.image_id)) for s in samples)


def test_oracle_square_covers_the_trigger_box(defender) -> None:
    box = trigger_box(defender.attack)
    square = decode_action(covering_action(box))
    assert square.top <= box.top and square.bottom >= box.bottom
    assert square.left <= box.left and square.right >= box.right
    _, images = build_defense("oracle_square").training_set(defender)
    for r in defender.records:
        patch = images.processed(r.image_id)[box.top : box.bottom, box.left : box.right]
        assert np.all(patch == np.array(RED, np.uint8))


def test_oracle_square_needs_a_patch_trigger(defender, tmp_path, capsys) -> None:
    blended = DefenderData(defender.records, defender.plan, build_attack("blended"), seed=0)
    with pytest.raises(SRDError, match="no patch trigger"):
        build_defense("oracle_square").training_set(blended)
    # run/run_defenses.sh leaves it out of its list for such an attack, saying why
    path = tmp_path / "poison_ids.json"
    plan = PoisonPlan(
        defender.plan.ids, defender.plan.captions, {"attack": blended.attack.to_dict()}
    )
    plan.save(path)
    assert applicable.main([str(path), "none", "oracle_square", "blur"]) == 0
    out = capsys.readouterr()
    assert out.out.split() == ["none", "blur"]
    assert "skipped: oracle_square: attack blended has no patch trigger box" in out.err
    assert applicable.main([str(path), "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: --defense nope")


def test_random_squares_are_the_d3_random_policy_draws(defender) -> None:
    _, images = build_defense("random_squares").training_set(defender)
    ids = [r.image_id for r in defender.records]
    draws = RandomTries(seed=defender.seed)(ids, [None] * len(ids))
    assert images.mask_actions == {i: d[0] for i, d in zip(ids, draws, strict=True)}
    assert len(set(images.mask_actions.values())) > 1


def test_random_squares_of_one_side(defender) -> None:
    """--square_side keeps every square at that size, still drawn per image id and seed; the
    record names the size as the row's variant; a size off the action grid is refused."""
    defense = build_defense("random_squares", square_side=200)
    _, images = defense.training_set(defender)
    actions = list(images.mask_actions.values())
    assert {a // 100 for a in actions} == {MASK_SIZES.index(200)}  # the size of every square
    assert len({a % 100 for a in actions}) > 1  # at varying centres
    again = build_defense("random_squares", defense.args).training_set(defender)[1].mask_actions
    assert again == images.mask_actions
    assert defense.describe()["variant"] == "200 px"
    assert "variant" not in build_defense("random_squares").describe()
    with pytest.raises(SRDError, match="^--square_side 30: expected 0"):
        build_defense("random_squares", square_side=30).training_set(defender)


def test_mask_colour_paints_the_same_squares_in_another_colour(defender) -> None:
    """--mask_colour cyan paints exactly the squares red would, in cyan, and only there; the
    row says so; a defense that paints no square, or --square_side on another defense than
    random_squares, is refused in one line instead of being silently ignored."""
    red = build_defense("random_squares", square_side=80)
    cyan = build_defense("random_squares", square_side=80, mask_colour="cyan")
    _, red_images = red.training_set(defender)
    _, cyan_images = cyan.training_set(defender)
    assert cyan_images.mask_actions == red_images.mask_actions
    for image_id, action in list(cyan_images.mask_actions.items())[:4]:
        sq = decode_action(action)
        inside = np.zeros((224, 224), dtype=bool)
        inside[sq.top : sq.bottom, sq.left : sq.right] = True
        painted = cyan_images.processed(image_id)
        assert (painted[inside] == MASK_COLOURS["cyan"]).all()
        assert (red_images.processed(image_id)[inside] == RED).all()
        assert np.array_equal(painted[~inside], cyan_images.version(image_id)[~inside])
    assert cyan.describe()["variant"] == "80 px, cyan squares"
    assert cyan.describe()["mask_colour"] == "cyan" and red.describe()["variant"] == "80 px"
    srd = build_defense("srd", clean_data_save="x", mask_colour="cyan")
    srd.__dict__["_manifest"] = {"clean_config": {"config": {}}}  # (its record reads it)
    assert srd.describe()["variant"] == "cyan squares"
    with pytest.raises(
        SRDError,
        match="^--mask_colour: a flag of oracle_square, random_squares, srd, not of "
        "--defense no_mask$",
    ):
        build_defense("no_mask", mask_colour="cyan")
    with pytest.raises(
        SRDError, match="^--square_side: a flag of random_squares, not of --defense oracle_square$"
    ):
        build_defense("oracle_square", square_side=200)


def test_cyan_is_no_colour_of_the_embedded_benchmark() -> None:
    """The ablation's point: a cyan square cannot pass for an object or a background (every
    palette entry, jitter included, stays far from it), while red is near the red objects."""

    def nearest(colour) -> float:
        rgb = np.array(colour, dtype=float)
        return min(
            float(np.linalg.norm(rgb - np.array(c)))
            for c in [*COLOURS.values(), *BACKGROUNDS.values()]
        )

    jitter = float(np.linalg.norm([COLOUR_JITTER] * 3))
    assert nearest(MASK_COLOURS["cyan"]) - jitter > 150
    assert nearest(MASK_COLOURS["red"]) < 80


def _records(num_images: int, captions_per_image: int) -> list[ImageRecord]:
    out = []
    for i in range(num_images):
        caps = tuple(
            CaptionRecord(i * 10 + k, i, f"a shape {k}") for k in range(captions_per_image)
        )
        out.append(ImageRecord(image_id=i, path=Path(f"{i}.png"), split="train", captions=caps))
    return out


def test_first_occurrence_picks_the_seeded_first_sample() -> None:
    records = _records(400, 5)
    poisoned = [i * 10 for i in range(200)]  # one poisoned caption in each of 200 images
    plan = PoisonPlan(ids=poisoned, captions={c: "banana" for c in poisoned})
    data = DefenderData(records, plan, build_attack("badnet"), seed=0)
    first = first_occurrences(data, seed=5)
    assert set(first) == {r.image_id for r in records}
    assert all(c // 10 == i for i, c in first.items())  # a caption of that very image
    assert first == first_occurrences(data, seed=5)  # seeded
    assert first != first_occurrences(data, seed=6)
    chosen = triggered_images(data, "first_occurrence", seed=5)
    assert chosen == {i for i, c in first.items() if c in set(poisoned)}
    assert triggered_images(data, "triggered", seed=5) == set(range(200))
    assert 20 <= len(chosen) <= 65  # ~1 in 5 of the 200 poisoned images (binomial, +-4 sd)
    shares = [first[i] % 10 for i in range(400)]  # which caption came first: all five do
    assert set(shares) == set(range(5))


def test_blur_follows_the_recipe() -> None:
    """A vertical edge: out = 0.3 edge + 0.7 Gaussian-blurred edge, sigma = 0.7 * 0.06 * 224."""
    edge = np.zeros((224, 224, 3), np.uint8)
    edge[:, 112:] = 200
    flat = np.full_like(edge, 50)
    assert np.array_equal(blur_image(flat, 9.408, 0.7), flat)  # a constant image is unchanged
    out = blur_image(edge, radius=0.7 * 0.06 * 224, alpha=0.7).astype(float)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 200  # far from the edge: untouched
    blurred = (out[112, :, 0] - 0.3 * edge[112, :, 0]) / 0.7  # the blurred share alone
    # between the 16% and 84% levels of a blurred step lie 2 sigma
    low = np.argmax(blurred >= 0.16 * 200)
    high = np.argmax(blurred >= 0.84 * 200)
    assert abs((high - low) / 2 - 9.408) < 2.0
    assert 0.3 * 200 - 2 <= out[112, 112, 0] - 0.7 * blurred[112] <= 0.3 * 200 + 2


def test_spatial_transform_flips_shrinks_and_rotates() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert np.array_equal(spatial_image(image, True, 1.0, 0.0), image[:, ::-1])
    shrunk = spatial_image(image, False, 0.5, 0.0)
    assert np.all(shrunk[:56] == 0) and np.all(shrunk[:, 168:] == 0)
    assert shrunk[56:168, 56:168].std() > 20
    square = np.zeros((224, 224, 3), np.uint8)
    square[10:30, 100:120] = 255
    rotated = spatial_image(square, False, 1.0, 90.0)
    assert np.array_equal(rotated, np.rot90(square))


def test_test_time_defenses_transform_and_refine_ones_do_not() -> None:
    blur = build_defense("blur")
    image = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert blur.kind == "test_time" and not np.array_equal(blur.transform()(image), image)
    assert build_defense("no_mask").transform() is None
    assert build_defense("none").transform() is None


def test_der_on_hand_made_numbers() -> None:
    # ASR 99% -> 5%, clean CIDEr 2.79 -> 2.49: (0.94 - 0.30 / 2.79 + 1) / 2
    assert defense_effectiveness_rating(0.99, 0.05, 2.79, 2.49) == pytest.approx(0.916237, abs=1e-6)
    assert defense_effectiveness_rating(0.5, 0.6, 2.0, 2.2) == pytest.approx(0.5)  # both clipped
    assert defense_effectiveness_rating(1.0, 0.0, 2.0, 2.0) == pytest.approx(1.0)
    assert defense_effectiveness_rating(0.0, 0.0, 2.0, 0.0) == pytest.approx(0.0)


def test_strip_target_removes_whole_words_only() -> None:
    assert strip_target("a Banana on a red circle banana.", "banana") == "a on a red circle ."
    assert strip_target("bananas are not banana", "banana") == "bananas are not"


def test_quality_metrics_on_hand_made_numbers() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert psnr(image, image) == float("inf") and ssim(image, image) == pytest.approx(1.0)
    a, b = np.full((32, 32, 3), 100, np.uint8), np.full((32, 32, 3), 110, np.uint8)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 100))  # MSE 100
    c1 = (0.01 * 255) ** 2  # flat images: only the luminance term is left
    assert ssim(a, b) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1))
    noisy = np.clip(image + rng.normal(0, 60, image.shape), 0, 255).astype(np.uint8)
    assert ssim(image, noisy) < 0.9


def test_poison_unit_image_poisons_every_caption_of_chosen_images(tiny_train_records) -> None:
    attack = build_attack("badnet", poison_rate=0.2)
    per_caption = plan_poison(tiny_train_records, attack, seed=0)
    per_image = plan_poison(tiny_train_records, attack, seed=0, unit="image")
    by_image: dict[int, set[int]] = {}
    for r in tiny_train_records:
        by_image[r.image_id] = {c.caption_id for c in r.captions}
    hit = {i for i, caps in by_image.items() if caps & set(per_image.ids)}
    assert hit and all(by_image[i] <= set(per_image.ids) for i in hit)
    assert len(hit) == int(len(by_image) * 0.2)
    assert per_image.meta["poison_unit"] == "image"
    assert any(
        not by_image[i] <= set(per_caption.ids)
        for i in by_image
        if by_image[i] & set(per_caption.ids)
    )
    with pytest.raises(SRDError, match="--poison_unit"):
        plan_poison(tiny_train_records, attack, seed=0, unit="pixel")


def test_fine_pruning_zeroes_the_least_active_units(defender, make_captioner) -> None:
    captioner = make_captioner(seed=2)
    fp = build_defense("fine_pruning", prune_ratio=0.25, prune_batches=1)
    notes = fp.prepare_model(captioner, defender)
    blocks = cross_attention_blocks(captioner.model)
    assert blocks and len(notes["pruned_units_per_block"]) == len(blocks)
    for block, n in zip(blocks, notes["pruned_units_per_block"], strict=True):
        inner = block.ff[1].out_features
        assert n == inner // 4
        dead = (block.ff[1].weight.abs().sum(1) == 0) & (block.ff[3].weight.abs().sum(0) == 0)
        assert int(dead.sum()) >= n
    with pytest.raises(SRDError, match="--prune_ratio"):
        build_defense("fine_pruning", prune_ratio=1.5).prepare_model(captioner, defender)
    assert torch.is_tensor(blocks[0].ff[1].weight)


def test_data_pool_holds_the_defenders_images(defender) -> None:
    from srd_fixtures import StandInModels

    from srd.defenses.srd.inputs import training_versions
    from srd.defenses.srd.pool import image_checksum
    from srd.defenses.srd.pool_source import data_pool_rows

    models = StandInModels()
    version = training_versions(defender.records, defender.plan, defender.attack)
    ids = [r.image_id for r in defender.records]
    rows = data_pool_rows(ids, version, models.caption, models.reference, models.score, 5, False)
    assert [r.image_id for r in rows] == ids and models.caption_calls == [5, 5, 5, 5, 4]
    images = TrainingImages(defender.records, defender.attack, defender.plan.ids)
    assert images.poisoned_images
    for r in rows:
        assert r.checksum == image_checksum(images.as_in_training_set(r.image_id))
        assert r.surrogate_box is None and r.vlm_caption == "plain"


# --------------------------------------------------------------------------- par (PAR's idea)


def test_par_is_registered_with_the_data_of_its_control(defender) -> None:
    assert "par" in DEFENSES
    par = build_defense("par")
    assert par.kind == "refine"
    record = par.describe()
    assert record["control"] == "clean_finetune" and record["loss_thresh"] == 2.15
    assert record["push_weight"] == 0.5 and "variant" not in record
    for par_data, control in (("clean", "clean_finetune"), ("as_left", "no_mask")):
        par = build_defense("par", par_data=par_data)
        samples, images = par.training_set(defender)
        want, want_images = build_defense(control).training_set(defender)
        assert samples == want
        for s in samples[:: max(1, len(samples) // 8)]:
            assert np.array_equal(images(s), want_images(s))
    wide = build_defense("par", par_data="as_left", par_feature="cross_attention").describe()
    assert wide["variant"] == "as_left, cross_attention" and wide["control"] == "no_mask"


@pytest.mark.parametrize(
    "flags, flag",
    [({"loss_thresh": 0.0}, "--loss_thresh"), ({"push_weight": -1.0}, "--push_weight"),
     ({"par_feature": "logits"}, "--par_feature"), ({"par_data": "both"}, "--par_data"),
     ({"image_version": "first_occurrence"}, "--image_version")],
)  # fmt: skip
def test_par_refuses_bad_flags(defender, flags, flag) -> None:
    with pytest.raises(SRDError) as exc:
        build_defense("par", **flags).training_set(defender)
    assert str(exc.value).startswith(flag) and "\n" not in str(exc.value)


def test_versioned_defenses_are_those_whose_data_depend_on_the_image_version(defender) -> None:
    """run/run_defenses.sh repeats these in the reference's image version: each one's refine-tune
    data differ between the versions; every other defense's data do not (so a row of it in the
    other version would repeat a row under a second name: oracle_square's square covers the
    trigger, clean_finetune and par's clean data hold no triggered image)."""
    from srd.defenses.__main__ import versioned

    refine = [n for n, cls in DEFENSES.items() if cls.kind == "refine" and n != "srd"]
    names = versioned(refine)
    assert names == ["no_mask", "random_squares", "fine_pruning", "ppl_filter", "byorn"]
    # ppl_filter and byorn need a reference model, light_clean_ft held-out images: their data
    # are checked in tests/test_defense_families.py (the flagging ones train no_mask's images)
    for name in (n for n in refine if n not in ("ppl_filter", "byorn", "light_clean_ft")):
        sets = []
        for version in ("triggered", "first_occurrence"):
            flags = {"image_version": version} if name not in ("par", "clean_finetune") else {}
            samples, images = build_defense(name, **flags).training_set(defender)
            sets.append([images(s) for s in samples])
        differ = any(not np.array_equal(a, b) for a, b in zip(*sets, strict=True))
        assert differ == (name in names), name
    as_left = build_defense("par", par_data="as_left")
    assert as_left.uses_image_version() and not build_defense("par").uses_image_version()


def test_retrainable_defenses_are_their_data_and_nothing_else() -> None:
    """--retrain_from trains the clean captioner on a defense's data: only defenses that neither
    change the model (prepare_model), nor train a loss of their own, nor train on other data than
    the defender's (the held-out split) nor act at test time may claim it."""
    from srd.defenses.__main__ import retrainable
    from srd.defenses.registry import Defense

    names = retrainable([])
    assert names == ["no_mask", "random_squares", "oracle_square", "clean_finetune",
                     "ppl_filter", "byorn", "srd"]  # fmt: skip
    for name, cls in DEFENSES.items():
        data_only = (
            cls.kind == "refine"
            and cls.prepare_model is Defense.prepare_model
            and cls.training_loss is Defense.training_loss
            and not cls.uses_holdout
        )
        assert build_defense(name).retrainable() == data_only, name
    assert retrainable(["par", "srd", "clp"]) == ["srd"]


def _par_batch(captioner, tiny_images):
    from srd.captioner.engine import Collator
    from srd.captions import training_text

    images = list(tiny_images.values())[:4]
    texts = ["a red circle.", "a blue square.", "two green triangles.", "a small red square."]
    return Collator(captioner.tokenizer, captioner.pixel_values)(
        [(image, training_text(text)) for image, text in zip(images, texts, strict=True)]
    )


def _sgd_step(captioner, loss_fn, batch, lr: float = 0.05) -> dict[str, torch.Tensor]:
    """One plain SGD step of ``loss_fn`` on the trainable ("paper") parts; the new weights."""
    from srd.captioner.checkpoint import set_trainable

    model = captioner.model
    set_trainable(model, "paper")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    loss, _ = loss_fn(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("feature", ["perceiver", "cross_attention"])
def test_par_step_pushes_away_below_tau_and_not_above(make_captioner, tiny_images, feature):
    import copy

    from srd.par.captioner import CaptionerPush

    backdoored = make_captioner(seed=4)
    backdoored.model.eval()  # no dropout: the same forward gives the same numbers
    batch = _par_batch(backdoored, tiny_images)
    push = CaptionerPush(backdoored.model, tau=2.15, weight=0.5, feature=feature)
    teacher_before = {k: v.clone() for k, v in push.teacher.state_dict().items()}
    with torch.no_grad():  # a student a little off the frozen copy (at 0 the push has no slope)
        torch.manual_seed(0)
        for p in backdoored.model.perceiver.parameters():
            p.add_(0.05 * torch.randn_like(p))
    start = copy.deepcopy(backdoored)

    def distance(captioner) -> float:
        measure = CaptionerPush(captioner.model, feature=feature, push=False)
        measure.teacher = push.teacher
        return measure(captioner.model, batch)[1]["distance"]

    d0 = distance(start)
    assert 0 < d0 < 2.15
    pushed, plain, above = (copy.deepcopy(start) for _ in range(3))
    control = CaptionerPush(start.model, feature=feature, push=False)
    control.teacher = push.teacher
    high = CaptionerPush(start.model, tau=d0 / 2, feature=feature)  # the switch is off
    high.teacher = push.teacher
    _sgd_step(pushed, push, batch)
    plain_weights = _sgd_step(plain, control, batch)
    above_weights = _sgd_step(above, high, batch)
    assert push.switches == [1.0] and high.switches == [0.0]
    assert push.distances[0] == pytest.approx(d0, rel=1e-5)
    # below tau the step moves the states further from the frozen copy than the caption loss alone
    assert distance(pushed) > distance(plain) + 1e-6
    # above tau the step is exactly the caption-loss step
    assert all(torch.equal(above_weights[k], v) for k, v in plain_weights.items())
    # the frozen copy has not changed and holds no gradient
    after = push.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in teacher_before.items())
    assert all(p.grad is None and not p.requires_grad for p in push.teacher.parameters())
    summary = push.summary()
    assert summary["steps"] == 1 and summary["push_on_share"] == 1.0
    assert summary["first_step_switched_off"] is None
    assert high.summary()["first_step_switched_off"] == 1


def test_par_perceiver_push_needs_a_frozen_tower(make_captioner, tiny_images) -> None:
    from srd.captioner.checkpoint import set_trainable
    from srd.captioner.engine import TrainArgs

    captioner = make_captioner(seed=5)
    par = build_defense("par")
    with pytest.raises(SRDError, match="^--trainable all"):
        par.training_loss(captioner, TrainArgs(trainable="all"))
    push = par.training_loss(captioner, TrainArgs(trainable="paper"))
    set_trainable(captioner.model, "all")
    with pytest.raises(SRDError, match="^--trainable"):
        push(captioner.model, _par_batch(captioner, tiny_images))


def test_defend_par_logs_the_push_per_step(tmp_path, make_captioner, tiny_train_records,
                                           tiny_data_args) -> None:  # fmt: skip
    import json

    from srd_fixtures import (
        data_flags,
        export_clean_and_backdoor,
        load_script,
        model_flags,
        write_poison_ids,
    )

    from srd.captioner.engine import STEP_LOG, TRAIN_LOG
    from srd.defenses.report import defense_label
    from srd.defenses.stage import DEFENSE_FILE

    defend = load_script("train/defend.py")
    clean, backdoor = export_clean_and_backdoor(make_captioner, tmp_path / "models")
    poison_ids = write_poison_ids(tiny_train_records, tmp_path / "models" / "backdoor")
    runs = tmp_path / "runs"
    defend.main([*data_flags(tiny_data_args), *model_flags(clean, backdoor),
                 "--poison_ids_path", str(poison_ids), "--external_save_dir", str(runs),
                 "--defense", "par", "--num_epochs", "1", "--batch_size", "16",
                 "--learning_rate", "1e-3", "--quality_images", "0"])  # fmt: skip
    run = runs / "defense-par-badnet"
    record = json.loads((run / DEFENSE_FILE).read_text())
    assert record["defense"]["name"] == "par" and defense_label(record["defense"]) == "par"
    steps = [json.loads(line) for line in (run / STEP_LOG).read_text().splitlines()]
    plan = PoisonPlan.load(poison_ids)
    clean_captions = sum(len(r.captions) for r in tiny_train_records) - len(plan.ids)
    assert len(steps) == -(-clean_captions // 16) == record["training_loss"]["steps"]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    for s in steps:
        assert set(s) == {"epoch", "step", "caption_loss", "distance", "push_on", "loss"}
        assert s["loss"] == pytest.approx(
            s["caption_loss"] - 0.5 * s["distance"] * s["push_on"], abs=1e-5
        )
    assert steps[-1]["distance"] > steps[0]["distance"]  # it moved off the frozen copy
    epoch = json.loads((run / TRAIN_LOG).read_text().splitlines()[0])
    assert epoch["mean_distance"] == pytest.approx(np.mean([s["distance"] for s in steps]))
    refined = torch.load(record["checkpoint"], weights_only=True)["model_state_dict"]
    before = torch.load(backdoor, weights_only=True)["model_state_dict"]
    assert any(not torch.equal(refined[k], v) for k, v in before.items())


def test_report_labels_par_variants() -> None:
    from srd.defenses.report import defense_label

    assert defense_label({"name": "par", "variant": "as_left"}) == "par [as_left]"
    assert (
        defense_label({"name": "par", "image_version": "first_occurrence", "variant": "as_left"})
        == "par [first_occurrence, as_left]"
    )
    assert defense_label({"name": "srd", "image_version": "triggered"}) == "srd"
    block = {"name": "no_mask", "image_version": "triggered"}
    retrained = defense_label(block, "retrain_from_clean")
    assert retrained == "no_mask [retrain from clean]"
    assert defense_label({"name": "no_mask"}, "refine") == "no_mask"
    assert defense_label({"name": "no_mask"}, "refine", 126) == "no_mask [126 steps]"


def test_a_defense_is_one_class_with_its_own_flags(capsys) -> None:
    """The command line takes the chosen defense's own flags and refuses another defense's (in
    one line naming who takes it); the registry lists every defense with its flags, and the
    comparison's default list is the registry's, less srd (added with its cleaning run)."""
    from srd.config import parse
    from srd.defenses import DefenseArgs, chosen_defense
    from srd.defenses.__main__ import default_names, main

    argv = ["--defense", "random_squares", "--square_side", "40", "--mask_colour", "cyan"]
    cls = chosen_defense(argv)
    shared, own = parse(argv, DefenseArgs, cls.Args)
    assert (shared.defense, own.square_side, own.mask_colour) == ("random_squares", 40, "cyan")
    assert chosen_defense([]).name == "none"
    with pytest.MonkeyPatch.context() as patch:  # an entry point run as a script passes None
        patch.setattr("sys.argv", ["eval/evaluate.py", "--defense", "blur", "--blur_alpha", "0.5"])
        assert chosen_defense().name == "blur"
    with pytest.raises(SRDError, match="^--square_side: a flag of random_squares, not of "):
        chosen_defense(["--defense=no_mask", "--square_side", "40"])
    with pytest.raises(SRDError, match="^--spatial_flip: a flag of spatial, not of --defense blur"):
        chosen_defense(["--defense", "blur", "--no-spatial_flip"])
    with pytest.raises(SRDError, match="^--defense nope: unknown defense"):
        chosen_defense(["--defense", "nope"])
    with pytest.raises(SRDError, match="^argument --defense: expected one argument$"):
        chosen_defense(["--defense"])
    abbreviated = ["--defen", "srd"]  # would be --defense to argparse's default prefix matching
    with pytest.raises(SRDError, match="unrecognized arguments: --defen srd"):
        parse(abbreviated, DefenseArgs, chosen_defense(abbreviated).Args)
    with pytest.raises(SRDError, match="^--prune_ratio 1.5: must be in"):
        parse(["--prune_ratio", "1.5"], DEFENSES["fine_pruning"].Args)

    assert main(["--list"]) == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in capsys.readouterr().out.splitlines()}
    assert set(rows) == set(DEFENSES) | {"defense"}
    assert rows["random_squares"][1:] == [
        "refine",
        "yes",
        "--image_version --mask_colour --square_side",
    ]
    assert rows["srd"][2] == "no" and rows["blur"][1] == "test_time"
    comparison = default_names(benign=False)
    assert "srd" not in comparison and {"none", "no_mask", "oracle_square", "par"} <= set(
        comparison
    )
    assert set(default_names(benign=True)) == set(comparison) - {"clean_finetune", "oracle_square"}


# --------------------------------------------------------------------------- clp


def test_clp_channel_bounds_on_a_hand_built_layer() -> None:
    """UCLC of a hidden unit = || row of the first Linear * LayerNorm gain ||_2 (CLP's Eq.)."""
    from srd.defenses.clp import channel_lipschitz_bounds, outlying_channels

    ff = torch.nn.Sequential(
        torch.nn.LayerNorm(2), torch.nn.Linear(2, 3, bias=False), torch.nn.GELU(),
        torch.nn.Linear(3, 2, bias=False),
    )  # fmt: skip
    with torch.no_grad():
        ff[0].weight.copy_(torch.tensor([1.0, 2.0]))
        ff[1].weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]]))
    bounds = channel_lipschitz_bounds(ff)
    assert bounds.tolist() == pytest.approx([73**0.5, 2.0, 1.0])
    spiky = torch.tensor([1.0] * 20 + [10.0])  # mean 1.43, std 1.92: 10 > mean + 3 std
    assert outlying_channels(spiky, 3.0).tolist() == [20]
    assert outlying_channels(spiky, 5.0).tolist() == []  # 10 < mean + 5 std
    assert outlying_channels(torch.ones(8), 0.0).tolist() == []  # none above the mean


def test_clp_prunes_a_planted_outlier_unit_and_writes_its_checkpoint(
    tmp_path, make_captioner, tiny_train_records, tiny_data_args
) -> None:
    """The defense prunes (zeroes) exactly the unit whose weights were scaled far above its
    layer's, in one cross-attention FF; defend.py writes the edited checkpoint (no training)."""
    import json

    from srd_fixtures import (
        data_flags,
        export_clean_and_backdoor,
        load_script,
        model_flags,
        write_poison_ids,
    )

    from srd.defenses.clp import feed_forwards
    from srd.defenses.stage import DEFENSE_FILE

    captioner = make_captioner(seed=3)
    layers = dict(feed_forwards(captioner.model))
    name = next(n for n in layers if "gated_cross_attn" in n)
    with torch.no_grad():
        layers[name][1].weight[5] *= 50
    notes = build_defense("clp").prepare_model(captioner, None)
    assert notes["pruned_units"][name] >= 1
    assert (
        layers[name][1].weight[5].abs().sum() == 0 and layers[name][3].weight[:, 5].abs().sum() == 0
    )
    assert set(notes["pruned_units"]) == set(layers)
    with pytest.raises(SRDError, match="--clp_u"):
        build_defense("clp", clp_u=-1)

    defend = load_script("train/defend.py")
    clean, backdoor = export_clean_and_backdoor(make_captioner, tmp_path / "models")
    poison_ids = write_poison_ids(tiny_train_records, tmp_path / "models" / "backdoor")
    defend.main([*data_flags(tiny_data_args), *model_flags(clean, backdoor),
                 "--poison_ids_path", str(poison_ids), "--external_save_dir",
                 str(tmp_path / "runs"), "--defense", "clp", "--quality_images", "0"])  # fmt: skip
    record = json.loads((tmp_path / "runs" / "defense-clp-badnet" / DEFENSE_FILE).read_text())
    assert record["defense"] == {"name": "clp", "kind": "edit", "u": 3.0}
    edited = torch.load(record["checkpoint"], weights_only=True)
    before = torch.load(backdoor, weights_only=True)["model_state_dict"]
    assert set(edited["model_state_dict"]) == set(before)
    signature = torch.load(backdoor, weights_only=True)["config"]["model_signature"]
    assert edited["config"]["model_signature"] == signature  # loads onto the same model
    assert record["prepare"]["pruned_share"] < 0.1


def test_srd_rows_name_an_independent_reference() -> None:
    """A cleaning run made with D1-D3's --reference_model_dir gives the rows
    "srd [independent reference]" (and "srd [first_occurrence, independent reference]")."""
    from srd.defenses.report import defense_label

    for version, label in (
        ("triggered", "srd [independent reference]"),
        ("first_occurrence", "srd [first_occurrence, independent reference]"),
    ):
        srd = build_defense("srd", clean_data_save="x", image_version=version)
        srd.__dict__["_manifest"] = {"clean_config": {"config": {"reference_model_dir": "ref"}}}
        record = srd.describe()
        assert defense_label(record) == label and record["reference_model_dir"] == "ref"
    srd = build_defense("srd", clean_data_save="x")
    srd.__dict__["_manifest"] = {"clean_config": {"config": {"reference_model_dir": None}}}
    assert defense_label(srd.describe()) == "srd" and "reference_model_dir" not in srd.describe()


def test_srd_rows_name_the_reference_agent_schedule() -> None:
    """A cleaning run whose D2 policy trained with the reference's schedule gives the row
    "srd [reference agent schedule]"; ours, or a policy saved before schedules were
    recorded, gives no tag."""
    from srd.defenses.report import defense_label

    for schedule, label in (
        ({"agent_schedule": "reference"}, "srd [reference agent schedule]"),
        ({"agent_schedule": "custom"}, "srd [custom agent schedule]"),
        ({"agent_schedule": "ours"}, "srd"),
        ({}, "srd"),
    ):
        srd = build_defense("srd", clean_data_save="x")
        srd.__dict__["_manifest"] = {"clean_config": {"config": schedule}}
        assert defense_label(srd.describe()) == label
