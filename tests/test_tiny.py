"""The embedded default's word-level tokenizer and tiny Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from srd import captions
from srd.captioner.tiny import build_word_tokenizer, create_tiny_lm
from srd.data.records import ImageRecord, caption_records

TEXTS = [
    "A red circle on a white background.",
    "two blue squares, one small and one large; at the top!",
    "An orange triangle in the bottom right corner.",
]


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(TEXTS)


def test_every_word_of_the_texts_is_one_token(tok, tiny_train_records: list[ImageRecord]) -> None:
    texts = TEXTS + [c.caption for c in caption_records(tiny_train_records)]
    tokenizer = build_word_tokenizer(texts)
    for text in texts:
        for word in captions.words(text):
            assert tokenizer.tokenize(word) == [word], word
    # a whole caption: one token per word or punctuation mark, lower-cased
    assert tok.tokenize("Two BLUE squares, one small.") == [
        "two", "blue", "squares", ",", "one", "small", ".",
    ]  # fmt: skip


def test_prompt_tokens_are_single_special_tokens(tok) -> None:
    for special in captions.SPECIAL_TOKENS:
        assert tok.tokenize(special) == [special]
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert special in tok.all_special_tokens
    ids = tok(captions.training_text("A red circle."), add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces == [
        "<image>", "user", ":", "a", "photo", "of", "gpt", ":", "<answer>",
        "a", "red", "circle", ".", "<|endofchunk|>",
    ]  # fmt: skip
    assert tok.unk_token_id not in ids
    # pad, BOS/EOS and the three prompt tokens are five distinct ids
    specials = tok.convert_tokens_to_ids(list(captions.SPECIAL_TOKENS))
    assert len({tok.pad_token_id, tok.eos_token_id, *specials}) == 5


def test_unseen_word_round_trips_through_character_fallback(tok) -> None:
    for word in ("banana", "zebra42", "quux"):
        assert word not in tok.get_vocab()
        pieces = tok.tokenize(word)
        assert len(pieces) > 1 and pieces[0] == word[0]
        assert all(p.startswith("##") for p in pieces[1:])
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == word
    ids = tok("a red banana.", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "a red banana."


def test_vocabulary_is_deterministic(tok) -> None:
    shuffled = [TEXTS[2], TEXTS[0], TEXTS[1], TEXTS[0]]
    again = build_word_tokenizer(shuffled)
    assert again.get_vocab() == tok.get_vocab()
    assert build_word_tokenizer(TEXTS + ["giraffe"]).get_vocab() != tok.get_vocab()


def test_tiny_lm_folder_loads_as_ordinary_hf_model(tmp_path: Path, tok) -> None:
    folder = create_tiny_lm(tmp_path / "a", tok, hidden_size=32, num_layers=1, num_heads=2, seed=3)
    create_tiny_lm(tmp_path / "b", tok, hidden_size=32, num_layers=1, num_heads=2, seed=3)
    lm = AutoModelForCausalLM.from_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(folder)
    assert loaded.get_vocab() == tok.get_vocab()
    assert lm.get_input_embeddings().num_embeddings == len(tok)
    assert lm.config.num_hidden_layers == 1 and lm.config.hidden_size == 32
    assert (lm.config.bos_token_id, lm.config.pad_token_id) == (tok.bos_token_id, tok.pad_token_id)
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    for (name, a), (_, b) in zip(lm.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = loaded("a red circle", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = lm(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
