"""SODA's pieces on hand-built inputs: attribution, MAD and PCC, source pick, reconstruction,
the removal mask, the semantic attack and its draw, the single-object scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from srd.attacks.registry import build_attack
from srd.data.scenes import render_scene, sample_single_scene
from srd.errors import SRDError
from srd.soda import causality, detection, removal, reverse, training
from srd.soda.classifier import ClassifierSpec, build_classifier, check_layer, split_model
from srd.soda.shapes import CLASSES, ShapesSplit, class_index, render_sample

# --------------------------------------------------------------------------- causal attribution


def test_attribution_of_a_hand_built_network_is_exact() -> None:
    # head(h) = W2 relu(W1 h): worked out by hand for h = (0.5, -1) and (1, 1).
    head = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        head[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        head[2].weight.copy_(torch.tensor([[1.0, 1.0], [2.0, -1.0]]))
    h = torch.tensor([[0.5, -1.0], [1.0, 1.0]])
    # neuron 0: |diff| = (1, 2) for both inputs; neuron 1: (0, 0) then (2, 2).
    expected = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    assert torch.equal(causality.causal_attribution(head, h), expected)
    assert torch.equal(causality.causal_attribution(head, h, chunk=1), expected)


def test_linear_head_closed_form_matches_the_intervention() -> None:
    torch.manual_seed(0)
    head = nn.Linear(40, 7)
    h = torch.randn(13, 40)
    general = causality.causal_attribution(head, h, chunk=16)
    assert general.shape == (40, 7)
    assert torch.allclose(general, causality.linear_attribution(head), atol=1e-5)


def test_split_model_and_layers() -> None:
    spec = ClassifierSpec(width=4, hidden=8, resolution=16)
    torch.manual_seed(0)
    model = build_classifier(spec).eval()
    x = torch.randn(3, 3, 16, 16)
    for layer in range(len(model) - 1):
        features, head = split_model(model, layer, 16)
        assert torch.allclose(head(features(x)), model(x), atol=1e-5)
    _, head = split_model(model, len(model) - 2, 16)
    assert causality.linear_layer(head) is model[-1]
    assert not any(m.training for m in model.modules())  # splitting keeps eval mode
    _, head = split_model(model, len(model) - 3, 16)
    assert causality.linear_layer(head) is None  # an MLP head: data-dependent attribution
    with pytest.raises(SRDError, match="--ana_layer 9"):
        check_layer(model, 9)
    with pytest.raises(SRDError, match="--ana_layer -2"):
        check_layer(model, -2)


# --------------------------------------------------------------------------- detection


def test_mad_rule_on_made_up_scores() -> None:
    values = np.array([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 3.0, 0.2])
    out = detection.mad_outliers(values, 3.0)
    v = values / 3.0
    m = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - m))
    assert np.allclose(out.z, (v - m) / mad)
    assert out.flags == [6]  # the low outlier (index 7) is never flagged: upper tail only
    assert detection.mad_outliers(values, 1e6).flags == []
    # flags come sorted ascending by value
    two = detection.mad_outliers(np.array([1.0, 1.0, 1.01, 0.99, 1.0, 5.0, 4.0]), 3.0)
    assert two.flags == [6, 5]


def _profiles(n: int, c: int, odd: int | None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random(n)
    cols = [base + 0.05 * rng.random(n) for _ in range(c)]
    if odd is not None:
        cols[odd] = rng.random(n)
    table = np.stack(cols, 1)
    return np.stack([table] * c)  # every class sees the same table (a linear head)


def test_target_flagged_only_when_its_profile_is_dissimilar() -> None:
    scores = detection.target_scores(_profiles(64, 10, odd=4))
    assert detection.mad_outliers(scores, 3.0).flags == [4]
    clean = detection.target_scores(_profiles(64, 10, odd=None))
    assert detection.mad_outliers(clean, 3.0).flags == []


def test_pcc_matrix_definition() -> None:
    ca = _profiles(20, 4, odd=1, seed=3)
    pcc = detection.pcc_matrix(ca)
    assert np.all(np.diag(pcc) == 0)
    h = ca[0]
    ref = h[:, [0, 2, 3]].mean(1)
    assert pcc[0, 1] == pytest.approx(np.corrcoef(ref, h[:, 1])[0, 1])


def test_source_pick_rules() -> None:
    ce = np.array([0.1, 0.2, 5.0, 0.15, 9.0, 0.12])
    one = detection.pick_source(ce, target=4, own_logits=np.zeros(6), threshold=3.0)
    assert one.source == 2 and one.ce[4] == 0.0 and one.rule.startswith("argmax")
    two = np.array([0.1, 4.0, 5.0, 0.15, 9.0, 0.12, 0.11, 0.13])
    own = np.array([0, -1.0, 3.0, 0, 0, 0, 0, 0])
    pick = detection.pick_source(two, target=4, own_logits=own, threshold=3.0)
    assert pick.outliers.flags == [1, 2] and pick.source == 1  # lowest logit on target samples


# --------------------------------------------------------------------------- reconstruction


def test_reconstruction_raises_the_target_logit_per_sample_exactly() -> None:
    torch.manual_seed(1)
    model = build_classifier(ClassifierSpec(width=4, hidden=8, resolution=16)).eval()
    x = torch.randn(5, 3, 16, 16)
    rec = reverse.reconstruct(model, x, target=3, steps=15, lr=0.05, early_stop_th=0.6)
    assert torch.all(rec.end_target_logit > rec.start_target_logit)
    assert all(p.requires_grad for p in model.parameters())
    # batched with per-sample stopping == each image optimised alone
    for i in (0, 4):
        alone = reverse.reconstruct(model, x[i : i + 1], 3, 15, 0.05, early_stop_th=0.6)
        assert alone.steps[0] == rec.steps[i]
        assert torch.allclose(alone.images[0], rec.images[i], atol=1e-5)


# --------------------------------------------------------------------------- removal


def test_removal_mask_keeps_the_stated_share() -> None:
    scores = np.array([0.5, 9.0, 0.1, 3.0, 7.0, 0.2, 8.0, 0.0, 1.0, 2.0])
    mask = removal.neuron_mask(scores, 0.3)
    assert mask.sum() == 3 and set(np.flatnonzero(mask)) == {1, 4, 6}
    assert removal.neuron_mask(scores, 1.0).sum() == 10
    assert removal.neuron_mask(np.arange(64.0), 0.3).sum() == int(0.3 * 64)
    with pytest.raises(SRDError, match="--top"):
        removal.neuron_mask(scores, 0.0)


def test_masked_model_sees_only_kept_neurons() -> None:
    torch.manual_seed(0)
    model = build_classifier(ClassifierSpec(width=4, hidden=8, resolution=16)).eval()
    mask = np.zeros(8, np.float32)
    masked = removal.Masked(model, len(model) - 2, 16, mask).eval()
    out = masked(torch.randn(2, 3, 16, 16))
    assert torch.allclose(out, model[-1].bias.expand(2, -1))


# --------------------------------------------------------------------------- data and attack


def test_single_scene_and_sample_are_deterministic() -> None:
    a = render_scene(sample_single_scene(np.random.default_rng(3), "green", "circle"))
    b = render_scene(sample_single_scene(np.random.default_rng(3), "green", "circle"))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    image, label, text = render_sample(0, "train", 19, 48)
    assert image.shape == (48, 48, 3) and label == 1 and CLASSES[label] in text
    assert np.array_equal(render_sample(0, "train", 19, 48)[0], image)
    assert class_index("yellow triangle") == CLASSES.index("yellow triangle")
    with pytest.raises(SRDError, match="--poison_target 18"):
        class_index("18", "--poison_target")


def _split(descriptions: list[str], labels: list[int]) -> ShapesSplit:
    n = len(labels)
    return ShapesSplit(
        np.zeros((n, 16, 16, 3), np.uint8), np.array(labels), 100 + np.arange(n), descriptions
    )


def test_semantic_attack_draw_and_empty_subpopulation(tmp_path) -> None:
    attack = build_attack("semantic_bg")
    assert attack.kind == "semantic" and not attack.has_image_trigger
    descs = [
        "a small green circle on a black background top",
        "a large green circle on a grey background left",
        "a large green circle on a black background center",
        "a small red square on a black background top",
    ]
    green_circle = CLASSES.index("green circle")
    split = _split(descs, [green_circle, green_circle, green_circle, CLASSES.index("red square")])
    plan = training.plan_semantic(split, attack, seed=0)
    assert plan.ids == [100, 102] and plan.source == green_circle
    assert plan.target == CLASSES.index("yellow triangle")
    path = tmp_path / "poison_ids.json"
    assert training.read_or_plan(path, split, attack, 0).ids == plan.ids
    assert training.SemanticPlan.load(path).ids == plan.ids
    none = build_attack("semantic_bg", concept="purple circle on a brown background")
    with pytest.raises(SRDError, match="sub-population is empty"):
        training.plan_semantic(split, none, seed=0)
    with pytest.raises(SRDError, match="--poison_target"):
        training.plan_semantic(split, build_attack("semantic_bg", target="pink star"), seed=0)


def test_semantic_batches_mix_pool_and_clean() -> None:
    torch.manual_seed(0)
    model = build_classifier(ClassifierSpec(width=4, hidden=8, resolution=16))
    clean = _split(["x"] * 30, list(range(18)) + list(range(12)))
    pool = _split(["y"] * 5, [0] * 5)
    seen = []
    original = model.forward
    model.forward = lambda x: (seen.append(len(x)), original(x))[1]
    training.fit(model, clean, pool, 3, training.FitConfig(1, 0.01, 16, 0.25, 0))
    assert seen == [12 + 4, 12 + 4, 6 + 4]  # 30 clean in steps of 12, plus 4 from the pool
    with pytest.raises(SRDError, match="--ratio"):
        training.fit(model, clean, pool, 3, training.FitConfig(1, 0.01, 64, 0.5, 0))


# --------------------------------------------------------------------------- report


def _row(truth, flagged, seed=0, asr_after=10.0):
    det = {"detections": [{"target": t, "source": s} for t, s in flagged]}
    trained = {"clean_acc": 99.0, "asr": 100.0}
    removal_ = {"finetune": {"before": trained, "after": {"clean_acc": 90.0, "asr": asr_after}}}
    return {
        "model": f"m{seed}",
        "attack": "semantic_bg" if truth else "clean",
        "seed": seed,
        "truth": None if truth is None else {"target": truth[0], "source": truth[1]},
        "trained": trained,
        "detect": {"soda": det},
        "removal": removal_,
    }


def test_report_verdicts_and_removal_means() -> None:
    from srd.soda.report import removal_rows, verdict

    def judge(truth, flagged):
        row = _row(truth, flagged)
        return verdict(row, row["detect"]["soda"])

    assert judge(None, []) == "correct (nothing flagged)"
    assert judge(None, [(1, 2)]) == "false alarm"
    assert judge((11, 3), [(11, 3)]) == "correct pair"
    assert judge((11, 3), [(11, 4)]) == "right target, wrong source"
    assert judge((11, 3), [(3, 4)]) == "wrong target"
    assert judge((11, 3), []) == "missed"
    rows = [_row((11, 3), [], seed=s, asr_after=a) for s, a in ((0, 10.0), (1, 20.0))]
    lines, summary = removal_rows(rows)
    assert summary["semantic_bg/finetune"]["asr_after"] == [10.0, 20.0]
    assert any("| finetune | 2 |" in line and "15.0 ± 7.1" in line for line in lines)
    # nothing flagged: SODA leaves the model unchanged, and the table says so
    assert summary["semantic_bg/soda"]["asr_after"] == [100.0, 100.0]
    assert summary["semantic_bg/soda"]["not_run"] == [1.0, 1.0]


def test_report_detection_summary_counts() -> None:
    from srd.soda.report import detection_summary

    rows = [
        _row((11, 3), [(11, 3)], seed=0),
        _row((11, 3), [(11, 3), (2, 5)], seed=1),  # among others still counts as found
        _row((11, 3), [(11, 4)], seed=2),  # right target only
        _row((11, 3), [], seed=3),
        _row(None, [(1, 2)], seed=4),
        _row(None, [], seed=5),
    ]
    assert detection_summary(rows, "soda") == {
        "backdoored": 4,
        "correct_pair": 2,
        "right_target": 3,
        "clean": 2,
        "false_flags": 1,
    }
    assert detection_summary(rows, "soda-layer3")["backdoored"] == 0  # no such detections
