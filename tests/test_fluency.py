"""Sentence perplexity: the n-gram default and a (tiny, random) Hugging Face causal LM."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from srd.errors import SRDError
from srd.evaluation.fluency import EOS, CausalLMFluency, FluencyModel, NGramFluency, load_fluency

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "white")


def scene_captions(n: int, seed: int = 0) -> list[str]:
    """Template captions like the synthetic benchmark's."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        size = rng.choice(("small", "large"))
        shape, colour, bg = rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(COLOURS)
        template = rng.choice(
            (
                "a {size} {colour} {shape} on a {bg} background.",
                "there is a {size} {colour} {shape} in front of a {bg} wall.",
                "a photo of a {colour} {shape} on {bg}.",
            )
        )
        out.append(template.format(size=size, colour=colour, shape=shape, bg=bg))
    return out


def tiny_causal_lm_folder(folder: Path, with_pad: bool = True) -> Path:
    """Save a random-init 2-layer GPT-2 with a word-level tokenizer (BOS/EOS) to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if with_pad else [])
    words = sorted({w for c in scene_captions(50) for w in c.replace(".", " .").split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "<pad>"} if with_pad else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kwargs
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ngram() -> NGramFluency:
    return NGramFluency.fit(scene_captions(40))


# --------------------------------------------------------------------------- n-gram LM


def test_fluent_caption_beats_scrambled_words(ngram: NGramFluency) -> None:
    rng = random.Random(1)
    fluent = scene_captions(10, seed=7)
    scrambled = []
    for caption in fluent:
        tokens = caption.rstrip(".").split()
        while True:
            rng.shuffle(tokens)
            if " ".join(tokens) + "." != caption:
                break
        scrambled.append(" ".join(tokens) + ".")
    ppl_fluent, ppl_scrambled = ngram.perplexity(fluent), ngram.perplexity(scrambled)
    assert isinstance(ngram, FluencyModel)
    assert np.all(ppl_fluent < ppl_scrambled)
    assert np.all(ppl_fluent > 1.0)


def test_ngram_edge_cases_are_finite_except_empty(ngram: NGramFluency) -> None:
    ppl = ngram.perplexity(["circle", "banana", "a banana zebra", "", " ... ", "A Red Circle."])
    assert np.all(np.isfinite(ppl[[0, 1, 2, 5]])) and np.all(ppl[[0, 1, 2, 5]] > 1)
    assert math.isinf(ppl[3]) and math.isinf(ppl[4])
    # Case and punctuation do not matter (tokens are srd.captions.words).
    assert ngram.perplexity(["a red circle"])[0] == pytest.approx(ppl[5])
    # An out-of-vocabulary word is less likely than a known one in the same place.
    known, unknown = ngram.perplexity(["a red circle.", "a red banana."])
    assert known < unknown


@pytest.mark.parametrize("history", [("<s>", "<s>"), ("a", "small"), ("on", "a"), ("zz", "qq")])
def test_ngram_distribution_sums_to_one(ngram: NGramFluency, history: tuple[str, str]) -> None:
    # Probability over every known word (incl. </s>) plus the one unknown-word slot.
    total = sum(ngram._prob(history, w) for w in ngram.vocab)
    unknown = ngram._prob(history, "never-seen-word")
    assert EOS in ngram.vocab
    assert total + unknown == pytest.approx(1.0, abs=1e-9)


def test_ngram_scores_1000_captions_fast() -> None:
    start = time.perf_counter()
    lm = NGramFluency.fit(scene_captions(2000))
    ppl = lm.perplexity(scene_captions(2000, seed=3))
    assert np.all(np.isfinite(ppl))
    assert time.perf_counter() - start < 5.0


def test_ngram_needs_captions() -> None:
    with pytest.raises(SRDError, match="no non-empty captions"):
        NGramFluency.fit(["", "..."])
    with pytest.raises(SRDError, match="--gpt_model"):
        load_fluency(None, None)
    assert isinstance(load_fluency(None, scene_captions(5)), NGramFluency)


# --------------------------------------------------------------------------- causal LM


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> CausalLMFluency:
    folder = tiny_causal_lm_folder(tmp_path_factory.mktemp("tiny_lm"))
    return CausalLMFluency.from_pretrained(folder, batch_size=4)


def test_causal_lm_batched_equals_one_by_one(tiny_lm: CausalLMFluency) -> None:
    texts = scene_captions(6, seed=5) + ["circle", "a very small blue star on a white background ."]
    batched = tiny_lm.perplexity(texts)
    alone = np.array([tiny_lm.perplexity([t])[0] for t in texts])
    assert np.all(np.isfinite(batched)) and np.all(batched > 1)
    np.testing.assert_allclose(batched, alone, rtol=1e-4)
    # Padding to the longest text in the batch does not leak into the short ones.
    assert tiny_lm.perplexity(["circle", texts[-1] * 3])[0] == pytest.approx(batched[6], rel=1e-4)


def test_causal_lm_matches_mean_token_nll(tiny_lm: CausalLMFluency) -> None:
    text = "a red circle on a blue background ."
    ids = torch.tensor([tiny_lm._encode(text)])
    with torch.no_grad():
        loss = tiny_lm.model(input_ids=ids, labels=ids).loss  # HF mean NLL of tokens 2..T
    assert tiny_lm.perplexity([text])[0] == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_causal_lm_empty_and_one_token(tiny_lm: CausalLMFluency) -> None:
    ppl = tiny_lm.perplexity(["", "   ", "star"])
    assert math.isinf(ppl[0]) and math.isinf(ppl[1])
    assert math.isfinite(ppl[2]) and ppl[2] > 1


def test_causal_lm_pad_falls_back_to_eos(tmp_path: Path) -> None:
    lm = CausalLMFluency.from_pretrained(tiny_causal_lm_folder(tmp_path, with_pad=False))
    assert lm.tokenizer.pad_token_id is None
    assert lm.pad_id == lm.tokenizer.eos_token_id
    ppl = lm.perplexity(["a red circle .", "star"])
    assert np.all(np.isfinite(ppl))


def test_causal_lm_missing_folder_names_flag(tmp_path: Path) -> None:
    with pytest.raises(SRDError, match="--gpt_model .*missing.*folder not found"):
        CausalLMFluency.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SRDError, match="--gpt_model .*empty.*cannot load"):
        CausalLMFluency.from_pretrained(tmp_path / "empty")
