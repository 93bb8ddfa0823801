"""The captioner's flags (:class:`ModelArgs`), its file names, and the signature a checkpoint
records.

The same flags build the paper's ViT-L-14 + MPT-1B model and the embedded tiny model; the
defaults are the embedded default's clean captioner (``checkpoints_remote/embedded/clean``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from srd import captions
from srd.config import arg
from srd.flags import COUNT
from srd.io import file_digest

EMBEDDED_DIR = Path("checkpoints_remote/embedded/clean")
"""Where the pretrain stage exports the embedded default's clean captioner."""

VISION_WEIGHTS = "vision.safetensors"
LM_FOLDER = "lm"
FLAMINGO_CHECKPOINT = "checkpoint.pt"

TRAINABLE_MODES = ("paper", "lm", "all")
VISION_TOKENS = ("pre_ln", "post_ln")
LEGACY_VISION_TOKENS = "post_ln"
"""What checkpoints recorded before ``vision_tokens`` existed were trained with."""
MIXED_PRECISION = ("no", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OFFICIAL_TOKENS = (captions.END_OF_CHUNK, captions.IMAGE_TOKEN)
"""Special tokens the official OpenFlamingo factory adds (before ``<PAD>``), in its order."""


@dataclass
class ModelArgs:
    """Captioner: OpenFlamingo vision encoder, language model and checkpoint."""

    vision_encoder_path: str = arg(
        "tiny-clip", help="open_clip model name (ViT-L-14) or a config in srd/captioner/configs"
    )
    vision_encoder_pretrained: str | None = arg(
        str(EMBEDDED_DIR / VISION_WEIGHTS),
        help="open_clip pretrained tag (openai) or a weights file (visual tower or whole CLIP); "
        "'none' for random init",
    )
    lm_path: str = arg(str(EMBEDDED_DIR / LM_FOLDER), help="causal LM: hub id or local folder")
    lm_tokenizer_path: str | None = arg(None, help="tokenizer hub id or folder (default: lm_path)")
    cross_attn_every_n_layers: int = arg(
        1, help="a gated cross-attention block every N LM layers", check=COUNT
    )
    checkpoint_path: str | None = arg(
        str(EMBEDDED_DIR / FLAMINGO_CHECKPOINT),
        help="OpenFlamingo checkpoint (state dict) to load; 'none' to skip",
    )
    decoder_layers_attr_name: str | None = arg(
        None, help="attribute path of the LM's decoder blocks (inferred for known LMs)"
    )
    perceiver_depth: int = arg(2, help="perceiver resampler layers (OpenFlamingo: 6)", check=COUNT)
    perceiver_num_latents: int = arg(
        16,
        help="perceiver latents = visual tokens per image (OpenFlamingo: 64)",
        check=COUNT,
    )
    perceiver_heads: int = arg(4, help="perceiver attention heads (OpenFlamingo: 8)", check=COUNT)
    perceiver_dim_head: int = arg(32, help="perceiver head width (OpenFlamingo: 64)", check=COUNT)
    vision_tokens: str = arg(
        "pre_ln",
        help="patch tokens before the tower's final LayerNorm (as OpenFlamingo was trained) "
        "or after it",
        choices=list(VISION_TOKENS),
    )
    trust_remote_code: bool = arg(False, help="allow the LM's own code from the hub (e.g. MPT)")
    mixed_precision: str = arg(
        "no",
        help="autocast dtype for training and captioning; weights (and AdamW) stay fp32",
        choices=list(MIXED_PRECISION),
    )


def none_if_unset(value: str | None) -> str | None:
    return None if value is None or value.lower() in ("", "none") else value


IDENTITY_KEYS = ("lm_weights", "vision_weights")
"""Signature keys added later: a checkpoint that does not record them is not checked on them."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_identity(name: str | None) -> str:
    """What a weights flag names: ``sha256:<hex>`` of a local file or of a local folder's weight
    files (names and bytes), otherwise the name itself (a hub id, ``openai``, ``none``)."""
    if name is None or not Path(name).exists():
        return str(name)
    path = Path(name)
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    )
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _digest(key)


@functools.lru_cache(maxsize=32)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    """A file's sha256 (srd.io.file_digest), or sha256 over each file's name and digest;
    cached on the files' names, sizes and times."""
    if len(files) == 1:
        return f"sha256:{file_digest(files[0][0])}"
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(Path(name).name.encode() + b"\0" + bytes.fromhex(file_digest(name)))
    return f"sha256:{digest.hexdigest()}"


def model_signature(args: ModelArgs) -> dict[str, Any]:
    """The facts a checkpoint must agree on to fit a model (recorded in every checkpoint): the
    architecture and which LM and vision weights it was trained over."""
    return {
        "lm_weights": weights_identity(args.lm_path),
        "vision_weights": weights_identity(none_if_unset(args.vision_encoder_pretrained)),
        "vision_encoder_path": args.vision_encoder_path,
        "vision_tokens": args.vision_tokens,
        "cross_attn_every_n_layers": args.cross_attn_every_n_layers,
        "perceiver": [
            args.perceiver_depth,
            args.perceiver_num_latents,
            args.perceiver_heads,
            args.perceiver_dim_head,
        ],
    }


def with_overrides(args: ModelArgs, **changes: Any) -> ModelArgs:
    return dataclasses.replace(args, **changes)
