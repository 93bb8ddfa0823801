"""Real-size OpenFlamingo architectures with random weights, and the official checkpoint layout.

Nothing here downloads weights. It serves the structure test and the real-size benchmark:

* :func:`save_random_lm` writes a Hugging Face folder with a randomly initialised language
  model, e.g. transformers' native ``MptForCausalLM`` of MPT-1B-RedPajama-200B's size (reference
  §3.1: width 2048, 24 blocks, 16 heads, vocabulary 50,432) and a tokenizer of the GPT-NeoX size
  (50,277 tokens, no pad token; the official factory makes it 50,280 with ``<|endofchunk|>``,
  ``<image>`` and ``<PAD>``). The words are placeholders, the sizes are the real ones.
* :func:`official_state_dict` turns a model built by ``open_flamingo.create_model_and_transforms``
  into the key layout of the published ``checkpoint.pt`` files.
* :func:`official_layout_report` builds the model with open_flamingo's own factory, writes its
  official checkpoint, loads it through :func:`srd.captioner.factory.load_captioner` and compares
  every key, shape, value, part size, prompt token and the logits.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    MptConfig,
    MptForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from srd import captions
from srd.captioner.args import ModelArgs
from srd.captioner.lm import official_vocab_size

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
GPT_NEOX_TOKENS = 50277
"""len() of the GPT-NeoX-20B tokenizer that MPT-1B and RedPajama-3B use (before Flamingo's)."""

MPT_1B = {"d_model": 2048, "n_heads": 16, "n_layers": 24, "expansion_ratio": 4, "vocab_size": 50432}
"""MPT-1B-RedPajama-200B (OpenFlamingo-3B's LM), reference §3.1."""

OPENFLAMINGO_PERCEIVER = {
    "perceiver_depth": 6,
    "perceiver_num_latents": 64,
    "perceiver_heads": 8,
    "perceiver_dim_head": 64,
}
"""open_flamingo's fixed PerceiverResampler size (its factory takes no perceiver arguments)."""


@dataclass(frozen=True)
class LMSize:
    """Size of a randomly initialised language model and its tokenizer.

    ``arch`` "mpt": transformers' native MPT (tied embeddings, blocks at ``transformer.blocks``,
    as OpenFlamingo-3B/9B); "gpt_neox": GPT-NeoX (untied ``embed_in``/``embed_out``, blocks at
    ``gpt_neox.layers``, as OpenFlamingo-4B's RedPajama-3B).
    """

    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    tokenizer_tokens: int
    expansion_ratio: int = 4
    arch: str = "mpt"

    @classmethod
    def mpt_1b(cls) -> LMSize:
        return cls(tokenizer_tokens=GPT_NEOX_TOKENS, **MPT_1B)

    def build(self, bos_token_id: int = 0, eos_token_id: int = 0) -> PreTrainedModel:
        """A randomly initialised causal LM of this size (in the current default dtype)."""
        if self.arch == "mpt":
            return MptForCausalLM(
                MptConfig(
                    d_model=self.d_model,
                    n_heads=self.n_heads,
                    n_layers=self.n_layers,
                    expansion_ratio=self.expansion_ratio,
                    max_seq_len=2048,
                    vocab_size=self.vocab_size,
                    bos_token_id=bos_token_id,
                    eos_token_id=eos_token_id,
                )
            )
        if self.arch == "gpt_neox":
            return GPTNeoXForCausalLM(
                GPTNeoXConfig(
                    hidden_size=self.d_model,
                    num_attention_heads=self.n_heads,
                    num_hidden_layers=self.n_layers,
                    intermediate_size=self.expansion_ratio * self.d_model,
                    vocab_size=self.vocab_size,
                    tie_word_embeddings=False,
                    bos_token_id=bos_token_id,
                    eos_token_id=eos_token_id,
                )
            )
        raise ValueError(f"unknown LM architecture {self.arch!r} (mpt, gpt_neox)")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create modules in ``dtype`` (bf16 halves the memory of a real-size build)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_sized_tokenizer(num_tokens: int) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer of exactly ``num_tokens`` tokens, GPT-NeoX style:
    ``<|endoftext|>`` is BOS, EOS and UNK, there is no pad token and none of Flamingo's special
    tokens. The prompt's words are in the vocabulary; the rest are placeholders."""
    words = [EOS, "User", ":", "a", "photo", "of", "GPT", "banana", "."]
    vocab = {w: i for i, w in enumerate(words)}
    for i in range(len(vocab), num_tokens):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS
    )


def save_random_lm(
    folder: str | os.PathLike, size: LMSize, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    """Save a random-init LM of ``size`` and a tokenizer as an HF folder; returns the folder."""
    folder = Path(folder)
    tok = build_sized_tokenizer(size.tokenizer_tokens)
    torch.manual_seed(seed)
    with default_dtype(dtype):
        lm = size.build(tok.bos_token_id, tok.eos_token_id)
    folder.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    del lm
    gc.collect()
    return folder


def official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The key layout of the published OpenFlamingo ``checkpoint.pt`` files.

    Their training code (open_flamingo 2.0, ``train_utils.filter_state_dict_to_trainable``)
    saves ``model.state_dict()`` without the frozen parameters (by their ``named_parameters``
    names) except embeddings, and without the aliases ``lang_encoder.old_decoder_blocks.*``,
    ``lang_encoder.gated_cross_attn_layers.*`` and ``vision_encoder.*``. So a 3B checkpoint holds
    ``perceiver.*``, ``lang_encoder.transformer.wte.weight`` and
    ``lang_encoder.transformer.blocks.N.gated_cross_attn_layer.*``.
    """
    state = model.state_dict()
    for name, param in model.named_parameters():
        if "embed" in name or param.requires_grad:
            continue
        state.pop(name, None)
    aliases = ("lang_encoder.old_decoder_blocks", "lang_encoder.gated_cross_attn_layers")
    return {
        k: v
        for k, v in state.items()
        if not k.startswith(aliases) and not k.startswith("vision_encoder")
    }


def part_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per part of a Flamingo model (each tensor counted once)."""
    parts = {"vision_encoder": 0, "perceiver": 0, "gated_cross_attn": 0, "lm_blocks": 0}
    parts["token_embedding"] = parts["lm_other"] = 0
    embedding = model.lang_encoder.get_input_embeddings().weight
    for name, p in model.named_parameters():
        if name.startswith("vision_encoder."):
            key = "vision_encoder"
        elif name.startswith("perceiver."):
            key = "perceiver"
        elif "gated_cross_attn_layer" in name:
            key = "gated_cross_attn"
        elif p is embedding:
            key = "token_embedding"
        elif "decoder_layer." in name:
            key = "lm_blocks"
        else:
            key = "lm_other"
        parts[key] += p.numel()
    parts["total"] = sum(parts.values())
    parts["trainable_paper"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return parts


def _open_gates(model: torch.nn.Module, value: float = 0.5) -> None:
    """Fresh gates are 0 (tanh(0) = 0): the image would not reach the text and the logit check
    would prove nothing about the cross-attention weights."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.fill_(value)


def _vision_x(image_size: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, 1, 3, image_size, image_size, generator=gen).to(dtype)


@torch.no_grad()
def _last_logits(model: torch.nn.Module, vision_x: torch.Tensor, ids: list[int]) -> torch.Tensor:
    lang_x = torch.tensor([ids])
    out = model(vision_x=vision_x, lang_x=lang_x, attention_mask=torch.ones_like(lang_x))
    return out.logits[0, -1].float()


PROMPT_TEXT = EOS + captions.IMAGE_TOKEN + "User:" + captions.INSTRUCTION + " GPT:"
"""The caption prompt up to ``<answer>``, which official tokenizers do not have."""


@dataclass
class OfficialBuild:
    """What :func:`write_official_checkpoint` made: files and the reference model's facts."""

    checkpoint: Path
    vision_weights: Path
    facts: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    logits: torch.Tensor
    vision_x: torch.Tensor


def write_official_checkpoint(
    work_dir: str | os.PathLike,
    vision_encoder_path: str,
    lm_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    cross_attn_every_n_layers: int = 1,
) -> OfficialBuild:
    """Build with ``open_flamingo.create_model_and_transforms`` (random vision tower, the LM of
    ``lm_dir``), open the gates, and write its official ``checkpoint.pt`` and vision weights."""
    import open_clip
    from open_flamingo import create_model_and_transforms

    from srd.captioner.clip import register_model_configs

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    register_model_configs()
    image_size = open_clip.get_model_config(vision_encoder_path)["vision_cfg"]["image_size"]
    vision_x = _vision_x(image_size, dtype)
    torch.manual_seed(1)
    with default_dtype(dtype):
        reference, _, ref_tok = create_model_and_transforms(
            vision_encoder_path,
            None,
            str(lm_dir),
            str(lm_dir),
            cross_attn_every_n_layers=cross_attn_every_n_layers,
        )
    _open_gates(reference)
    official = official_state_dict(reference)
    ckpt = work / "checkpoint.pt"
    torch.save(official, ckpt)
    vision_file = work / "vision.safetensors"
    save_file(
        {k: v.contiguous() for k, v in reference.vision_encoder.state_dict().items()},
        str(vision_file),
    )
    ref_ids = ref_tok(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    facts = {
        "official_keys": len(official),
        "official_parameters": sum(v.numel() for v in official.values()),
        "official_key_groups": _key_groups(official),
        "reference_parts": part_counts(reference),
        "reference_vocab": len(ref_tok),
        "reference_special_ids": {
            t: ref_tok.convert_tokens_to_ids(t)
            for t in (captions.END_OF_CHUNK, captions.IMAGE_TOKEN, captions.PAD_TOKEN)
        },
        "reference_prompt_ids": ref_ids,
        "reference_media_eoc": [reference.media_token_id, reference.eoc_token_id],
    }
    logits = _last_logits(reference, vision_x, ref_ids)
    shapes = {k: tuple(v.shape) for k, v in official.items()}
    del reference, official
    gc.collect()
    return OfficialBuild(ckpt, vision_file, facts, shapes, logits, vision_x)


def official_args(
    build: OfficialBuild, vision_encoder_path: str, lm_dir: str | os.PathLike, **changes: Any
) -> ModelArgs:
    """Our flags for the OpenFlamingo model of ``build`` (perceiver of open_flamingo's size)."""
    values = {
        "vision_encoder_path": vision_encoder_path,
        "vision_encoder_pretrained": str(build.vision_weights),
        "lm_path": str(lm_dir),
        "checkpoint_path": str(build.checkpoint),
        **OPENFLAMINGO_PERCEIVER,
        **changes,
    }
    return ModelArgs(**values)


def official_layout_report(
    work_dir: str | os.PathLike,
    vision_encoder_path: str,
    lm_size: LMSize,
    dtype: torch.dtype = torch.float32,
    cross_attn_every_n_layers: int = 1,
) -> dict[str, Any]:
    """Build with open_flamingo's factory, save the official checkpoint, load it through ours.

    Returns a JSON-able report: key and shape agreement, part sizes of both models, the appended
    token rows, prompt token ids of both tokenizers and the largest logit difference (ours is
    built with ``--vision_tokens post_ln`` here, which is what open_flamingo with open_clip
    >= 2.23 computes; our default, pre-ln_post, is checked separately by the tests).
    """
    from srd.captioner.factory import load_captioner

    work = Path(work_dir)
    lm_dir = save_random_lm(work / "lm", lm_size, dtype)
    build = write_official_checkpoint(
        work, vision_encoder_path, lm_dir, dtype, cross_attn_every_n_layers
    )
    report: dict[str, Any] = {
        "vision_encoder_path": vision_encoder_path,
        "lm": lm_size.__dict__,
        "dtype": str(dtype).replace("torch.", ""),
        **build.facts,
    }
    args = official_args(
        build,
        vision_encoder_path,
        lm_dir,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        vision_tokens="post_ln",
    )
    with default_dtype(dtype):
        cap = load_captioner(args)
    own = cap.model.state_dict()
    loaded = torch.load(build.checkpoint, map_location="cpu", weights_only=True, mmap=True)
    same_shape = [k for k in loaded if k in own and tuple(own[k].shape) == build.shapes[k]]
    equal = [k for k in loaded if k in own and _equal_rows(own[k], loaded[k])]
    ours_ids = cap.tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    full_prompt = cap.tokenizer.bos_token + captions.prompt()
    our_logits = _last_logits(cap.model, build.vision_x, ours_ids)
    rows = report["reference_vocab"]
    trainable = {n for n, p in cap.model.named_parameters() if p.requires_grad}
    report.update(
        {
            "keys_in_model": sum(k in own for k in loaded),
            "keys_same_shape": len(same_shape),
            "keys_equal_after_load": len(equal),
            "appended_token_rows": cap.checkpoint_notes.get("appended_token_rows"),
            "trainable_keys_covered": len(trainable & set(loaded)),
            "trainable_keys": len(trainable),
            "ours_parts": part_counts(cap.model),
            "ours_vocab": len(cap.tokenizer),
            "ours_official_vocab": official_vocab_size(cap.tokenizer),
            "ours_special_ids": {
                t: cap.tokenizer.convert_tokens_to_ids(t)
                for t in (*captions.SPECIAL_TOKENS, captions.PAD_TOKEN)
            },
            "ours_prompt_ids": ours_ids,
            "ours_full_prompt_ids": cap.tokenizer(full_prompt, add_special_tokens=False)[
                "input_ids"
            ],
            "ours_media_eoc": [cap.model.media_token_id, cap.model.eoc_token_id],
            "max_abs_logit_diff": float((our_logits[:rows] - build.logits[:rows]).abs().max()),
            "logit_scale": float(build.logits.abs().max()),
            "logit_cosine": float(
                torch.nn.functional.cosine_similarity(our_logits[:rows], build.logits[:rows], 0)
            ),
            "reference_top1_in_our_top5": int(build.logits[:rows].argmax())
            in our_logits[:rows].topk(5).indices.tolist(),
        }
    )
    del cap, own, loaded
    gc.collect()
    return report


def _equal_rows(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal, allowing ours to have extra trailing rows (appended token embeddings)."""
    if ours.dim() == 0 or theirs.dim() == 0:
        return torch.equal(ours, theirs)
    return torch.equal(ours[: theirs.shape[0]], theirs)


def _key_groups(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Number of keys per top-level group (perceiver, embeddings, cross-attention, other)."""
    groups: dict[str, int] = {}
    for key in state:
        if key.startswith("perceiver."):
            group = "perceiver"
        elif "gated_cross_attn_layer." in key:
            group = "gated_cross_attn_layer"
        else:
            group = key
        groups[group] = groups.get(group, 0) + 1
    return groups


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
