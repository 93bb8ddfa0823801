"""Caption metrics with the real pycocoevalcap + Java, and the ASR / false-trigger rules."""

from __future__ import annotations

import shutil

import pytest

from srd.errors import SRDError
from srd.evaluation import metrics
from srd.evaluation.metrics import (
    METRIC_KEYS,
    SPICE_KEY,
    CaptionScorer,
    attack_success_rate,
    caption_scores,
    contains_target,
    per_image_cider,
    require_java,
    spice_available,
    stop_idle_meteor,
    target_rates,
    unique_predictions,
)

REFERENCES = {
    1: [
        "a red circle on a blue background.",
        "a large red circle in front of a blue wall.",
        "one red circle on blue.",
    ],
    2: [
        "two green squares next to each other on a white background.",
        "a pair of green squares on white.",
        "two small green squares side by side.",
    ],
    3: [
        "a yellow triangle at the top of a black image.",
        "a small yellow triangle on a black background.",
        "a yellow triangle near the top.",
    ],
    4: [
        "three purple stars scattered on a grey background.",
        "several purple stars on grey.",
        "three small purple stars on a grey image.",
    ],
    5: [
        "an orange square and a blue circle on a green background.",
        "a blue circle beside an orange square on green.",
        "an orange square with a blue circle.",
    ],
}
IDENTICAL = {i: refs[0] for i, refs in REFERENCES.items()}
PARAPHRASES = {
    1: "a big red circle sitting on a blue background",
    2: "two green squares placed next to each other on white",
    3: "a yellow triangle sitting at the top of a dark image",
    4: "three violet stars scattered on a grey background",
    5: "a blue circle and an orange square on a green background",
}
UNRELATED = {
    1: "a man riding a horse",
    2: "a plate of food with a fork",
    3: "people walking down the street in the rain",
    4: "a cat sleeping on the sofa",
    5: "an airplane flying over mountains",
}


@pytest.fixture(scope="module")
def scorer():
    """One METEOR JVM for the whole module (starting one costs seconds)."""
    if shutil.which("java") is None:
        pytest.skip("java not on PATH")
    with CaptionScorer() as s:
        yield s


@pytest.fixture(scope="module")
def three_sets(scorer):
    return {
        name: scorer.score(preds, REFERENCES)
        for name, preds in [
            ("identical", IDENTICAL),
            ("paraphrase", PARAPHRASES),
            ("unrelated", UNRELATED),
        ]
    }


# --- caption metrics ------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["CIDEr", "BLEU-4", "METEOR", "ROUGE-L"])
def test_identical_beats_paraphrase_beats_unrelated(three_sets, metric):
    ident, para, unrel = (
        three_sets[k].scores[metric] for k in ("identical", "paraphrase", "unrelated")
    )
    assert ident > para > unrel >= 0.0


def test_identical_captions_score_one_where_bounded(three_sets):
    scores = three_sets["identical"].scores
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"):
        assert scores[key] == pytest.approx(1.0, abs=1e-6)
    assert scores["CIDEr"] > 1.0  # raw CIDEr-D (not x100) is ~10x a tf-idf cosine


def test_keys_notes_and_per_image(three_sets):
    result = three_sets["paraphrase"]
    expected = set(METRIC_KEYS) | ({SPICE_KEY} if spice_available() else set())
    assert set(result.scores) == expected
    assert set(result.per_image) == expected
    for key in expected:
        assert set(result.per_image[key]) == set(REFERENCES)
    if not spice_available():
        assert any(note.startswith("SPICE skipped") for note in result.notes)
    # per-image CIDEr: every paraphrase beats every unrelated caption on its own image
    para = result.per_image["CIDEr"]
    unrel = three_sets["unrelated"].per_image["CIDEr"]
    assert all(para[i] > unrel[i] for i in REFERENCES)


def test_references_restricted_to_predicted_ids(scorer):
    subset = {i: PARAPHRASES[i] for i in (1, 2, 3)}
    with_extra = scorer.score(subset, REFERENCES).scores
    exact = scorer.score(subset, {i: REFERENCES[i] for i in subset}).scores
    assert with_extra == exact


def test_empty_and_multiline_predictions_stay_aligned(scorer):
    preds = dict(IDENTICAL)
    preds[2] = ""
    preds[3] = "a yellow triangle at the top\r\nof a black image."
    result = scorer.score(preds, REFERENCES)
    assert result.per_image["BLEU-1"][2] == pytest.approx(0.0, abs=1e-6)
    assert result.per_image["ROUGE-L"][3] == pytest.approx(1.0)
    assert result.per_image["ROUGE-L"][4] == pytest.approx(1.0)


def test_prediction_without_reference_is_an_error(scorer):
    with pytest.raises(SRDError, match="no reference caption: 99"):
        scorer.score({1: "a red circle", 99: "a dog"}, REFERENCES)
    with pytest.raises(SRDError, match="no reference"):
        caption_scores({7: "a dog"}, REFERENCES)
    with pytest.raises(SRDError, match="no reference"):
        per_image_cider({7: "a dog"}, REFERENCES)
    with pytest.raises(SRDError, match="no predictions"):
        scorer.score({}, REFERENCES)
    with pytest.raises(SRDError, match="list of strings"):
        scorer.score({1: "a red circle"}, {1: "a red circle"})


def test_fresh_scorer_repeats_and_the_next_scorer_takes_its_jvm(three_sets):
    """A closed scorer's METEOR JVM is handed to the process's next scorer (its first call
    costs seconds), which scores the same; stop_idle_meteor stops it; a failed call's JVM is
    stopped, never handed on."""
    with CaptionScorer(spice=False) as s:
        scores = s.score(PARAPHRASES, REFERENCES).scores
        proc = s._meteor.meteor_p
        assert proc.poll() is None
    assert s._meteor is None and proc.poll() is None  # idle, kept for the next scorer
    with CaptionScorer(spice=False) as again:
        assert again.score(PARAPHRASES, REFERENCES).scores == scores
        assert again._meteor.meteor_p is proc
    stop_idle_meteor()
    assert proc.poll() is not None  # stopped
    expected = {k: v for k, v in three_sets["paraphrase"].scores.items() if k != SPICE_KEY}
    assert scores == pytest.approx(expected)
    with CaptionScorer(spice=False) as broken:
        broken.score(PARAPHRASES, REFERENCES)
        dead = broken._meteor.meteor_p
        dead.kill()
        dead.wait()
        with pytest.raises(RuntimeError, match="METEOR"):
            broken.score(PARAPHRASES, REFERENCES)
        assert broken._meteor is None
    assert not metrics._IDLE_METEOR  # the failed JVM is not handed on


def test_missing_java_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SRDError, match="java not found on PATH"):
        require_java()
    with pytest.raises(SRDError, match="java not found on PATH"):
        CaptionScorer()
    assert spice_available() is False


@pytest.mark.skipif(spice_available(), reason="SPICE models are installed here")
def test_requesting_unavailable_spice_is_an_error():
    with pytest.raises(SRDError, match="SPICE requested"):
        CaptionScorer(spice=True)


# --- ASR rules ------------------------------------------------------------------------------

CASES = [
    # caption, substring rule, word rule
    ("bananas", True, True),
    ("Banana", False, True),
    ("bananarama", True, False),
    ("a banana.", True, True),
    ("ban ana", False, False),
    ("", False, False),
    ("two BANANAS on a table", False, True),
    ("a banana-shaped boat", True, True),
]


@pytest.mark.parametrize(("caption", "substring", "word"), CASES)
def test_contains_target_rules(caption, substring, word):
    assert contains_target(caption, "banana", "substring") is substring
    assert contains_target(caption, "banana", "word") is word


def test_contains_target_multiword_and_bad_input():
    assert contains_target("Two ice creams.", "ice cream", "word")
    assert not contains_target("ice and cream", "ice cream", "word")
    with pytest.raises(SRDError, match="unknown ASR rule"):
        contains_target("banana", "banana", "regex")
    with pytest.raises(SRDError, match="empty"):
        contains_target("banana", "", "substring")


def test_asr_counts_unique_ids():
    # id 1 repeated by distributed padding: counted once in numerator and denominator (B20)
    pairs = [(1, "a banana"), (1, "a banana"), (2, "a dog"), (3, "Banana split"), (4, "a cat")]
    assert attack_success_rate(pairs, "banana", "substring") == pytest.approx(1 / 4)
    assert attack_success_rate(pairs, "banana", "word") == pytest.approx(2 / 4)
    assert unique_predictions(pairs) == {1: "a banana", 2: "a dog", 3: "Banana split", 4: "a cat"}
    assert attack_success_rate({1: "bananas", 2: "x"}, "banana") == pytest.approx(0.5)


def test_asr_bad_input():
    with pytest.raises(SRDError, match="no predictions"):
        attack_success_rate({}, "banana", "substring")
    with pytest.raises(SRDError, match="two different predictions"):
        attack_success_rate([(1, "a banana"), (1, "a dog")], "banana", "substring")


def test_target_rates_keys():
    clean = {1: "a dog", 2: "a Banana"}
    triggered = {1: "a banana", 2: "bananas"}
    assert target_rates(clean, triggered, "banana") == {
        "asr_substring": 1.0,
        "asr_word": 1.0,
        "false_trigger_substring": 0.0,
        "false_trigger_word": 0.5,
    }
    assert target_rates(clean, None, "banana")["asr_word"] is None
