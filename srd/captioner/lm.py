"""The language side: the tokenizer with OpenFlamingo's special tokens, and the causal LM.

The tokenizer gets the official special tokens in the official order (``<|endofchunk|>``,
``<image>``, then ``<PAD>`` if it has no pad token) and only then our ``<answer>``, so the ids of
an official checkpoint stay valid. The LM is any Hugging Face causal LM whose decoder block list
open_flamingo can wrap (the attribute path is inferred for known LM classes).
"""

from __future__ import annotations

from typing import Any

import torch
from open_flamingo.src.utils import extend_instance, getattr_recursive
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from srd import captions
from srd.captioner.args import OFFICIAL_TOKENS, ModelArgs
from srd.errors import SRDError

# Attribute path of the decoder block list, by model class name (lower case substring).
DECODER_LAYERS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
    "gptneox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    "mpt": "transformer.blocks",
    "mosaicgpt": "transformer.blocks",
}


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The LM's tokenizer plus the Flamingo special tokens (and a pad token if missing).

    Order matters for official checkpoints: ``<|endofchunk|>`` and ``<image>`` first, then
    ``<PAD>`` (only if the tokenizer has no pad token), exactly as open_flamingo's factory adds
    them, and our ``<answer>`` last. Every special token must stay one token.
    """
    flag = "--lm_tokenizer_path"
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SRDError(f"{flag} {path}: cannot load tokenizer ({exc})") from None
    vocab = tok.get_vocab()
    missing = [t for t in OFFICIAL_TOKENS if t not in vocab]
    if missing:
        tok.add_special_tokens(
            {"additional_special_tokens": missing}, replace_additional_special_tokens=False
        )
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": captions.PAD_TOKEN})
    if captions.ANSWER_TOKEN not in tok.get_vocab():
        tok.add_special_tokens(
            {"additional_special_tokens": [captions.ANSWER_TOKEN]},
            replace_additional_special_tokens=False,
        )
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    for token in (*captions.SPECIAL_TOKENS, tok.pad_token):
        ids = tok(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or tok.convert_tokens_to_ids(token) != ids[0]:
            raise SRDError(
                f"{flag} {path}: the tokenizer cannot hold the special token {token} "
                f"(it becomes {len(ids)} tokens)"
            )
    return tok


def official_vocab_size(tok: PreTrainedTokenizerBase) -> int:
    """Rows of the token embedding an official OpenFlamingo checkpoint has with this tokenizer:
    every token except the ones we append after the official ones (``<answer>``)."""
    extra = tok.convert_tokens_to_ids(captions.ANSWER_TOKEN)
    return extra if extra == len(tok) - 1 else len(tok)


class _TransformerWteAccess:
    """Input-embedding accessors for LMs that lack them (MosaicGPT, i.e. MPT-1B's own code),
    as open_flamingo's factory patches them for ``mpt-1b-redpajama-200b``."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.transformer.wte

    def set_input_embeddings(self, new_embeddings: torch.nn.Module) -> None:
        self.transformer.wte = new_embeddings


def ensure_embedding_accessors(lm: torch.nn.Module, flag: str = "--lm_path") -> None:
    """Give ``lm`` get/set_input_embeddings when its class has none (in place)."""
    try:
        found = lm.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        found = None
    if isinstance(found, torch.nn.Embedding):
        return
    wte = getattr(getattr(lm, "transformer", None), "wte", None)
    if not isinstance(wte, torch.nn.Embedding):
        raise SRDError(f"{flag}: {type(lm).__name__} exposes no input token embedding")
    extend_instance(lm, _TransformerWteAccess)


def _is_block_list(obj: Any) -> bool:
    return isinstance(obj, torch.nn.ModuleList) and len(obj) > 0


def decoder_layers_attr(lm: torch.nn.Module, override: str | None = None) -> str:
    """Attribute path of the LM's decoder block list, where cross-attention is placed.

    The class name picks the path (GPT-NeoX/RedPajama ``gpt_neox.layers``, Llama
    ``model.layers``, GPT-2 ``transformer.h``, MPT/MosaicGPT ``transformer.blocks``...); the
    path must lead to a non-empty ModuleList. SRDError when no known path fits.
    """
    if override:
        try:
            found = getattr_recursive(lm, override)
        except AttributeError:
            found = None
        if not _is_block_list(found):
            raise SRDError(
                f"--decoder_layers_attr_name {override}: "
                f"{type(lm).__name__} has no block list there"
            )
        return override
    cls = type(lm).__name__.lower()
    candidates = [attr for key, attr in DECODER_LAYERS.items() if key in cls]
    for attr in candidates:
        try:
            if _is_block_list(getattr_recursive(lm, attr)):
                return attr
        except AttributeError:
            continue
    known = sorted(set(DECODER_LAYERS))
    raise SRDError(
        f"--lm_path: cannot place cross-attention in {type(lm).__name__} (no decoder block list "
        f"at a known path; known architectures: {', '.join(known)}); "
        "pass --decoder_layers_attr_name"
    )


def load_lm(args: ModelArgs) -> torch.nn.Module:
    """The causal LM of ``--lm_path`` with input-embedding accessors."""
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            args.lm_path, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError, SafetensorError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, SafetensorError):  # e.g. a truncated model.safetensors
            detail = f"a damaged .safetensors weights file: {detail}"
        if "trust_remote_code" in str(exc) and not args.trust_remote_code:
            detail = "this LM needs its own code: pass --trust_remote_code"
        raise SRDError(f"--lm_path {args.lm_path}: cannot load language model ({detail})") from None
    ensure_embedding_accessors(lm)
    return lm
