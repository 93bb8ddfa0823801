"""The 2026 defense families on the tiny benchmark: the response-level filter and relabel
(ppl_filter, byorn) and the light clean fine-tune (light_clean_ft)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from srd_fixtures import (
    data_flags,
    export_clean_and_backdoor,
    load_script,
    model_flags,
    write_poison_ids,
)

from srd.attacks.registry import build_attack
from srd.attacks.trainset import PoisonPlan, plan_poison
from srd.captioner.args import with_overrides
from srd.captioner.engine import Collator
from srd.captioner.factory import load_captioner
from srd.captions import training_text
from srd.defenses import DefenderData, build_defense
from srd.defenses.relabel import caption_nll, flag_highest, separation_auc
from srd.defenses.stage import DEFENSE_FILE
from srd.defenses.tokens import robust_z
from srd.errors import SRDError


@pytest.fixture(scope="module")
def models(make_captioner, tmp_path_factory):
    """(clean model flags, backdoored checkpoint) exported like the pipeline's."""
    return export_clean_and_backdoor(make_captioner, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def defender(tiny_train_records, tiny_data_args, models) -> DefenderData:
    clean, backdoor = models
    attack = build_attack("badnet", poison_rate=0.2)
    plan = plan_poison(tiny_train_records, attack, seed=0)
    holdout = tiny_data_args.split("val")
    args = with_overrides(clean, checkpoint_path=str(backdoor))
    return DefenderData(tiny_train_records, plan, attack, 3, holdout=holdout, model_args=args)


def test_flag_highest_and_the_separation_score() -> None:
    scores = np.array([0.5, 3.0, 1.0, 3.0, 2.0])
    assert flag_highest(scores, 0.4).tolist() == [1, 3]  # ceil(0.4 * 5) = 2 highest
    assert flag_highest(scores, 0.3).tolist() == [1, 3]  # ceil(1.5) = 2
    assert flag_highest(scores, 0.1).tolist() == [1]  # a tie: the lower index first
    positive = np.array([False, True, False, False, True])
    # positives 3.0 and 2.0 against 0.5, 1.0, 3.0: 3.0 beats 2 and ties 1, 2.0 beats 2
    assert separation_auc(scores, positive) == pytest.approx((2.5 + 2) / 6)
    assert separation_auc(scores, np.zeros(5, bool)) is None


def test_the_score_is_the_caption_loss_of_each_sample(models, defender) -> None:
    """s_i = mean NLL of the trained tokens: for one sample it is the model's own loss, and a
    batch gives every sample the score it gets alone."""
    clean, _ = models
    reference = load_captioner(clean)
    samples, images = build_defense("no_mask").training_set(defender)
    samples = samples[:6]
    batched = caption_nll(reference, samples, images, batch_size=4)
    collate = Collator(reference.tokenizer, reference.vision_inputs)
    for sample, score in zip(samples, batched, strict=True):
        batch = collate([(images(sample), training_text(sample.caption))])
        with torch.no_grad():
            loss = reference.model(
                vision_x=batch["vision_x"], lang_x=batch["lang_x"],
                attention_mask=batch["attention_mask"], labels=batch["labels"],
            ).loss  # fmt: skip
        assert score == pytest.approx(float(loss), rel=1e-5)
        assert caption_nll(reference, [sample], images)[0] == pytest.approx(score, rel=1e-5)


def test_the_filter_drops_the_highest_scores_and_relabel_replaces_exactly_them(
    models, defender
) -> None:
    clean, _ = models
    reference = load_captioner(clean)
    samples, images = build_defense("no_mask").training_set(defender)
    scores = caption_nll(reference, samples, images)
    flagged = math.ceil(0.25 * len(samples))

    ref = {"reference_checkpoint_path": clean.checkpoint_path, "flag_fraction": 0.25}
    kept, kept_images = build_defense("ppl_filter", **ref).training_set(defender)
    assert len(kept) == len(samples) - flagged
    assert all(np.array_equal(kept_images(s), images(s)) for s in kept)  # no_mask's images
    kept_ids = {s.caption_id for s in kept}
    dropped = [i for i, s in enumerate(samples) if s.caption_id not in kept_ids]
    kept_at = [i for i, s in enumerate(samples) if s.caption_id in kept_ids]
    assert scores[dropped].min() >= scores[kept_at].max() - 1e-6
    assert [s for s in samples if s.caption_id in kept_ids] == kept  # untouched, in order

    byorn = build_defense("byorn", **ref)
    relabelled, _ = byorn.training_set(defender)
    assert [s.caption_id for s in relabelled] == [s.caption_id for s in samples]
    changed = [i for i, (a, b) in enumerate(zip(samples, relabelled, strict=True)) if a != b]
    assert set(changed) <= set(dropped)  # only flagged captions change ...
    for i in dropped:  # ... each into the reference's caption of the same image version
        want = reference.caption([images(samples[i])])[0]
        assert relabelled[i].caption == want and relabelled[i].image_id == samples[i].image_id
    report = byorn.describe()["flags"]
    poisoned = set(defender.plan.ids)
    assert report["flagged"] == flagged
    assert report["flagged_poisoned"] == sum(samples[i].caption_id in poisoned for i in dropped)
    assert report["poisoned"] == sum(s.caption_id in poisoned for s in samples)
    assert byorn.describe()["variant"] == "top 25% flagged"

    # the default rule: the captions whose score's robust z-score passes --flag_z
    by_z = {"reference_checkpoint_path": clean.checkpoint_path, "flag_z": 0.5}
    kept, _ = build_defense("ppl_filter", **by_z).training_set(defender)
    z = robust_z(torch.from_numpy(scores)).numpy()
    outliers = {samples[i].caption_id for i in np.flatnonzero(z > 0.5)}
    assert outliers and len(outliers) < len(samples)
    assert {s.caption_id for s in kept} == {s.caption_id for s in samples} - outliers


def test_flagging_defenses_refuse_a_missing_reference(defender, tmp_path) -> None:
    missing = str(tmp_path / "nope.pt")
    defense = build_defense("ppl_filter", reference_checkpoint_path=missing)
    with pytest.raises(SRDError) as exc:
        defense.training_set(defender)
    assert "--reference_checkpoint_path" in str(exc.value) and "\n" not in str(exc.value)
    for bad in (-0.1, 1.0):
        with pytest.raises(SRDError, match="--flag_fraction"):
            build_defense("byorn", flag_fraction=bad)
    with pytest.raises(SRDError, match="--flag_z"):
        build_defense("byorn", flag_z=0)


def test_light_clean_ft_trains_the_adapters_on_held_out_captions_only(
    tmp_path, tiny_train_records, tiny_data_args, models, defender
) -> None:
    """Its data are the validation split's captions, each ``--repeats`` times (none of the
    defender's); after defend.py only gated cross-attention weights differ from the
    backdoored checkpoint (the perceiver and embeddings are bit-identical)."""
    samples, images = build_defense("light_clean_ft", repeats=3).training_set(defender)
    held_out = {c.caption_id for r in defender.holdout for c in r.captions}
    assert sorted(s.caption_id for s in samples) == sorted(list(held_out) * 3)
    train_ids = {r.image_id for r in tiny_train_records}
    assert not {s.image_id for s in samples} & train_ids
    assert images(samples[0]).shape == (224, 224, 3)

    clean, backdoor = models
    poison_ids = write_poison_ids(tiny_train_records, tmp_path / "backdoor")
    assert PoisonPlan.load(poison_ids).ids
    defend = load_script("train/defend.py")
    defend.main([*data_flags(tiny_data_args), *model_flags(clean, backdoor),
                 "--poison_ids_path", str(poison_ids), "--external_save_dir",
                 str(tmp_path / "runs"), "--defense", "light_clean_ft", "--repeats", "2",
                 "--num_epochs", "1", "--batch_size", "8", "--learning_rate", "1e-2",
                 "--quality_images", "0"])  # fmt: skip
    record = json.loads(
        (tmp_path / "runs" / "defense-light_clean_ft-badnet" / DEFENSE_FILE).read_text()
    )
    assert record["defense"]["train_only"] == "adapters"
    after = torch.load(record["checkpoint"], weights_only=True)["model_state_dict"]
    before = torch.load(backdoor, weights_only=True)["model_state_dict"]
    assert set(after) == set(before)
    adapters = [k for k in before if "gated_cross_attn_layer" in k]
    others = [k for k in before if "gated_cross_attn_layer" not in k]
    assert adapters and others
    assert all(torch.equal(after[k], before[k]) for k in others)
    assert any(not torch.equal(after[k], before[k]) for k in adapters)


# --------------------------------------------------------------------------- token_prune


def test_robust_z_on_hand_values() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])  # median 3, MAD 1
    assert robust_z(values)[0].tolist() == pytest.approx(
        [(v - 3) / 1.4826 for v in (1, 2, 3, 4, 100)]
    )
    assert robust_z(torch.ones(1, 6)).abs().sum() == 0  # MAD 0: nothing is anomalous


def test_token_prune_zeroes_exactly_the_tokens_anomalous_in_first_and_last_layer(
    make_captioner,
) -> None:
    """The pruned tokens are those whose attention z-score passes the threshold in the
    perceiver's first and last layer; they are zero in the perceiver's input, and the model
    then runs on the pruned tokens."""
    from srd.defenses.tokens import TokenPruner, media_attention, robust_z

    captioner = make_captioner(seed=5, perceiver_depth=2)
    perceiver = captioner.model.perceiver
    tokens = torch.randn(
        2, 1, 1, 16, perceiver.latents.shape[-1], generator=torch.Generator().manual_seed(0)
    )
    seen = []
    layers = [attn for attn, _ in perceiver.layers]
    probe = [
        layer.register_forward_pre_hook(lambda m, a: seen.append(media_attention(m, *a)))
        for layer in layers
    ]
    with torch.no_grad():
        plain = perceiver(tokens)
    for h in probe:
        h.remove()
    both = torch.minimum(robust_z(seen[0]), robust_z(seen[-1])).reshape(2, 16)
    z = float(both.flatten().sort().values[-3])  # the two strongest tokens pass, no more
    want = both > z
    assert int(want.sum()) == 2

    pruner = TokenPruner(perceiver, z)
    hooks = pruner.attach()
    received = []
    hooks.append(perceiver.register_forward_pre_hook(lambda m, a: received.append(a[0])))
    with torch.no_grad():
        pruned_out = perceiver(tokens)
    for h in hooks:
        h.remove()
    got = received[-1][:, 0, 0]  # (the first is the probe's pass on the unpruned tokens)
    assert torch.equal(got[want], torch.zeros_like(got[want]))
    assert torch.equal(got[~want], tokens[:, 0, 0][~want])
    with torch.no_grad():
        expected = perceiver(tokens.masked_fill(want.reshape(2, 1, 1, 16, 1), 0.0))
    assert torch.allclose(pruned_out, expected) and not torch.allclose(pruned_out, plain)
    report = {"inputs": 2, "tokens_per_image": 16, "mean_pruned_per_input": 1.0,
              "inputs_with_a_pruned_token": int(want.any(dim=1).sum()),
              "pruned_by_position": want.sum(dim=0).tolist()}  # fmt: skip
    assert pruner.report() == report


def test_token_prune_runs_inside_captioning_and_reports(make_captioner, tiny_images) -> None:
    captioner = make_captioner(seed=6)
    images = list(tiny_images.values())[:3]
    plain = captioner.caption(images, num_beams=1, max_new_tokens=5)
    defense = build_defense("token_prune", token_z=1e6)  # nothing passes: captions unchanged
    defense.patch_model(captioner)
    assert captioner.caption(images, num_beams=1, max_new_tokens=5) == plain
    report = defense.test_time_report()["token_pruning"]
    assert report["inputs"] >= 3 and report["mean_pruned_per_input"] == 0
    with pytest.raises(SRDError, match="--token_z"):
        build_defense("token_prune", token_z=0)
