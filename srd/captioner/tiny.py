"""The embedded default's tiny language model and word-level tokenizer, made offline.

The tokenizer is WordPiece over a vocabulary holding every whole word of the given texts (so each
caption word is one token), plus single characters as a fallback so that any other word (a new
target label, say) can still be spelt. The LM is a small Llama created from a config with random
weights, saved as an ordinary Hugging Face folder that ``--lm_path`` loads like any other.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from srd import captions

log = logging.getLogger(__name__)

BOS = "<|endoftext|>"
UNK = "<unk>"
CHAR_ALPHABET = string.ascii_lowercase + string.digits


def _pieces(text: str) -> list[str]:
    pre = pre_tokenizers.BertPreTokenizer()
    return [p for p, _ in pre.pre_tokenize_str(text.lower())]


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer whose vocabulary is every word of ``texts``.

    Deterministic: the vocabulary is sorted. Includes the prompt's words and punctuation, the
    Flamingo special tokens, and a character fallback (``x`` / ``##x``) for unseen words.
    """
    specials = [captions.PAD_TOKEN, UNK, BOS, *captions.SPECIAL_TOKENS]
    words: set[str] = set()
    for text in [*texts, captions.prompt()]:
        for special in captions.SPECIAL_TOKENS:
            text = text.replace(special, " ")
        words.update(_pieces(text))
    words.update(CHAR_ALPHABET)
    words.update(string.punctuation)
    vocab_list = specials + sorted(words) + sorted("##" + c for c in CHAR_ALPHABET)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=50))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        unk_token=UNK,
        pad_token=captions.PAD_TOKEN,
        additional_special_tokens=list(captions.SPECIAL_TOKENS),
    )
    return fast


def create_tiny_lm(
    folder: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised small Llama and its tokenizer as an HF model folder."""
    import torch

    folder = Path(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    log.info(
        "tiny LM (%d parameters, vocab %d) saved to %s",
        model.num_parameters(),
        len(tokenizer),
        folder,
    )
    return folder
