"""Captioner factory on the ``open_flamingo`` package, for real and embedded (tiny) models.

A captioner is an OpenFlamingo model (open_clip vision tower -> perceiver resampler -> gated
cross-attention inside a Hugging Face causal LM) plus its tokenizer and image transform. The same
code builds the paper's ViT-L-14 + MPT-1B model and the embedded tiny model: only the flags differ.

Checkpoints (``--checkpoint_path``) are state dicts of the Flamingo model holding at least the
trainable parts (perceiver, gated cross-attention, token embeddings), either raw (official
OpenFlamingo ``checkpoint.pt``) or wrapped as ``{"model_state_dict": ..., "config": ...}`` by our
training engine. Loading refuses keys the model does not have and trainable parts that are absent.

Faithful to the published OpenFlamingo models (reference §3.2, B5):

* OpenAI CLIP weights were trained with QuickGELU; a tag whose weights need it builds the tower
  with QuickGELU (open_clip itself only warns), a tag that contradicts the config is refused.
* The perceiver reads the patch tokens *before* the tower's final LayerNorm (``ln_post``), as
  OpenFlamingo was trained; ``--vision_tokens post_ln`` takes them after it (open_clip >= 2.23).
* The tokenizer gets the official special tokens in the official order (``<|endofchunk|>``,
  ``<image>``, then ``<PAD>`` if it has no pad token) and only then our ``<answer>``, so the ids of
  an official checkpoint stay valid and its embedding is one row short: loading appends the
  missing rows, initialised to the mean of the checkpoint's rows, and records that it did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.helpers import PerceiverResampler
from open_flamingo.src.utils import extend_instance, getattr_recursive
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
)

from srd import captions
from srd.captioner.clip import MODEL_CONFIG_DIR, register_model_configs
from srd.captioner.features import FeatureCache
from srd.config import arg
from srd.errors import SRDError

log = logging.getLogger(__name__)

EMBEDDED_DIR = Path("checkpoints_remote/embedded/clean")
"""Where the pretrain stage exports the embedded default's clean captioner."""

VISION_WEIGHTS = "vision.safetensors"
LM_FOLDER = "lm"
FLAMINGO_CHECKPOINT = "checkpoint.pt"

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
    cross_attn_every_n_layers: int = arg(1, help="a gated cross-attention block every N LM layers")
    checkpoint_path: str | None = arg(
        str(EMBEDDED_DIR / FLAMINGO_CHECKPOINT),
        help="OpenFlamingo checkpoint (state dict) to load; 'none' to skip",
    )
    decoder_layers_attr_name: str | None = arg(
        None, help="attribute path of the LM's decoder blocks (inferred for known LMs)"
    )
    perceiver_depth: int = arg(2, help="perceiver resampler layers (OpenFlamingo: 6)")
    perceiver_num_latents: int = arg(
        16, help="perceiver latents = visual tokens per image (OpenFlamingo: 64)"
    )
    perceiver_heads: int = arg(4, help="perceiver attention heads (OpenFlamingo: 8)")
    perceiver_dim_head: int = arg(32, help="perceiver head width (OpenFlamingo: 64)")
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


def _none(value: str | None) -> str | None:
    return None if value is None or value.lower() in ("", "none") else value


def model_signature(args: ModelArgs) -> dict[str, Any]:
    """The facts a checkpoint must agree on to fit a model (recorded in every checkpoint)."""
    return {
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


class SRDFlamingo(Flamingo):
    """open_flamingo's Flamingo with two knobs the embedded default needs.

    1. The perceiver resampler's size is configurable (the package hard-codes depth 6 and 64
       latents; the tiny model uses a smaller PerceiverResampler of the same class, which makes
       CPU training and beam search about 4x faster).
    2. The package always encodes images under ``torch.no_grad()`` (its vision tower is frozen).
       The embedded default pretrains a randomly initialised tiny tower, so we only drop the
       ``no_grad`` when some vision parameter requires a gradient; otherwise nothing changes.
    """

    def __init__(self, *args: Any, perceiver: dict[str, int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if perceiver is not None:
            self.perceiver = PerceiverResampler(dim=self.vis_dim, **perceiver)

    def _encode_vision_x(self, vision_x: torch.Tensor) -> None:
        """Condition the LM on images (B, T, F, C, H, W) or on precomputed vision tokens
        (B, T, F, N, D) from a :class:`srd.captioner.features.FeatureCache` (the frozen tower skipped)."""
        b, t, f = vision_x.shape[:3]
        if vision_x.ndim == 5:
            tokens = vision_x
        else:
            trainable = any(p.requires_grad for p in self.vision_encoder.parameters())
            flat = vision_x.reshape(b * t * f, *vision_x.shape[3:])
            with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
                tokens = tower_tokens(self.vision_encoder, flat)
            tokens = tokens.reshape(b, t, f, *tokens.shape[1:])
        media = self.perceiver(tokens)
        for layer in self.lang_encoder._get_decoder_layers():
            layer.condition_vis_x(media)

    def train(self, mode: bool = True) -> SRDFlamingo:
        """As nn.Module.train, but a frozen vision tower stays in eval mode: its batch-norm
        statistics (ResNet towers) must not drift, and its features must not depend on the
        batch, when only the perceiver and the LM side train."""
        super().train(mode)
        if not any(p.requires_grad for p in self.vision_encoder.parameters()):
            self.vision_encoder.eval()
        return self


def tower_tokens(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Patch tokens (B, N, D) of an open_clip visual tower for normalised pixels (B, C, H, W).

    ViT towers give their patch tokens (``output_tokens``); ModifiedResNet towers (the embedded
    tiny CLIP) give the cells of their last feature map, before the attention pool, as tokens.
    """
    if isinstance(visual, ModifiedResNet):
        x = visual.stem(pixels)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        return x.flatten(2).transpose(1, 2)
    return visual(pixels)[1]


def vision_width(name: str) -> int:
    """Width of the tokens :func:`tower_tokens` returns for open_clip config ``name``."""
    cfg = open_clip.get_model_config(name)["vision_cfg"]
    if isinstance(cfg.get("layers"), (list, tuple)):  # ModifiedResNet: width * 32 channels
        return int(cfg["width"]) * 32
    return int(cfg["width"])


@dataclass
class Captioner:
    """A Flamingo model with its tokenizer and image transform."""

    model: SRDFlamingo
    tokenizer: PreTrainedTokenizerBase
    image_transform: Any
    args: ModelArgs
    feature_cache: FeatureCache | None = None
    checkpoint_notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What loading ``--checkpoint_path`` changed (e.g. appended token rows), for run records."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (224, 224, 3) images -> vision_x of shape (B, 1, 1, C, H, W)."""
        return images_to_vision_x(images, self.image_transform)

    def vision_inputs(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """The model's vision input for uint8 images: pixels (B, 1, 1, C, H, W), or the frozen
        tower's tokens (B, 1, 1, N, D) from the feature cache when one is enabled."""
        if self.feature_cache is None:
            return self.pixel_values(images)
        return self.feature_cache(images, self._encode_tokens)[:, None, None]

    @torch.no_grad()
    def _encode_tokens(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        tower = self.model.vision_encoder
        param = next(tower.parameters())
        pixels = self.pixel_values(images).flatten(0, 2).to(param.device, param.dtype)
        return tower_tokens(tower, pixels)

    def enable_feature_cache(self, max_mb: float = float("inf")) -> FeatureCache:
        """Compute each image version's tokens once (the tower must be frozen), keeping at most
        ``max_mb`` MiB of them."""
        if self.feature_cache is None or self.feature_cache.tower is not self.model.vision_encoder:
            self.feature_cache = FeatureCache(self.model.vision_encoder, max_mb)
        self.feature_cache.check()
        return self.feature_cache

    @torch.no_grad()
    def caption(
        self,
        images: Sequence[np.ndarray],
        batch_size: int = 32,
        num_beams: int = 3,
        max_new_tokens: int = 20,
        instruction: str = captions.INSTRUCTION,
        sample_seeds: Sequence[int] | None = None,
        min_new_tokens: int = 0,
    ) -> list[str]:
        """Caption images (uint8 HxWx3) in batches with beam search; returns cleaned captions.

        With ``sample_seeds`` (one per image) each caption is instead drawn by ancestral sampling
        at temperature 1 from its image's own seeded RNG (:class:`SeededSampler`), so it does not
        depend on the batch size or on the other images of its batch.
        ``min_new_tokens`` > 0 forbids ending earlier (benchmarks time a fixed length)."""
        if sample_seeds is not None and len(sample_seeds) != len(images):
            raise ValueError(f"{len(sample_seeds)} sample seeds for {len(images)} images")
        was_training = self.model.training
        self.model.eval()
        out: list[str] = []
        try:
            for start in range(0, len(images), batch_size):
                end = start + batch_size
                seeds = None if sample_seeds is None else sample_seeds[start:end]
                out.extend(
                    self._caption_batch(
                        images[start:end], num_beams, max_new_tokens, instruction, min_new_tokens,
                        seeds,
                    )
                )  # fmt: skip
        finally:
            self.model.train(was_training)
        return out

    def _caption_batch(
        self,
        images: Sequence[np.ndarray],
        num_beams: int,
        max_new_tokens: int,
        instruction: str,
        min_new_tokens: int = 0,
        sample_seeds: Sequence[int] | None = None,
    ) -> list[str]:
        tok = self.tokenizer
        tok.padding_side = "left"
        text = [tok.bos_token + captions.prompt(instruction)] * len(images)
        enc = tok(text, return_tensors="pt", padding=True, add_special_tokens=False)
        dtype = next(self.model.parameters()).dtype
        vision_x = self.vision_inputs(images).to(self.device, dtype)
        with autocast(self.device, self.args.mixed_precision):
            generated = self._generate(
                vision_x, enc, num_beams, max_new_tokens, min_new_tokens, sample_seeds
            )
        new_tokens = generated[:, enc["input_ids"].shape[1] :]
        decoded = tok.batch_decode(new_tokens, skip_special_tokens=True)
        return [captions.postprocess_caption(t) for t in decoded]

    def _generate(
        self,
        vision_x: torch.Tensor,
        enc: Any,
        num_beams: int,
        max_new_tokens: int,
        min_new_tokens: int,
        sample_seeds: Sequence[int] | None = None,
    ) -> torch.Tensor:
        # Sampling is greedy decoding of Gumbel-perturbed log-probabilities (SeededSampler).
        sampling = {} if sample_seeds is None else {
            "logits_processor": LogitsProcessorList([SeededSampler(sample_seeds)])
        }  # fmt: skip
        return self.model.generate(
            vision_x=vision_x,
            lang_x=enc["input_ids"].to(self.device),
            attention_mask=enc["attention_mask"].to(self.device),
            num_beams=1 if sample_seeds is not None else num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            length_penalty=0.0,
            do_sample=False,
            eos_token_id=self.model.eoc_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            **sampling,
        )


class SeededSampler(LogitsProcessor):
    """Ancestral sampling at temperature 1 with one RNG per batch row.

    The argmax of log p + Gumbel(0, 1) noise is a draw from p (the Gumbel-max trick), so greedy
    decoding of the scores this returns samples every row from its own ``torch.Generator``:
    a caption depends on its seed and image only, not on the batch it shares (torch's global
    RNG, which Hugging Face's ``do_sample`` draws from, would hand each row different numbers
    at another batch size). Runs after the built-in processors (min_new_tokens' -inf stays)."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows for {len(self.generators)} sample seeds")
        vocab = scores.shape[-1]
        uniform = torch.stack(
            [torch.rand(vocab, generator=g, dtype=torch.float64) for g in self.generators]
        ).clamp_(min=torch.finfo(torch.float64).tiny)
        gumbel = -torch.log(-torch.log(uniform))
        return scores.float().log_softmax(-1) + gumbel.to(scores.device, torch.float32)


def autocast(device: torch.device, mixed_precision: str) -> Any:
    """Autocast context of ``--mixed_precision`` on ``device`` (a no-op for "no")."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[mixed_precision])


def check_mixed_precision(
    mixed_precision: str, device: torch.device, bf16_supported: bool | None = None
) -> None:
    """Refuse a ``--mixed_precision`` the device cannot run (one-line SRDError).

    bf16 needs a GPU with native bf16 (Ampere or newer); ``bf16_supported`` overrides the query
    of the current GPU."""
    if mixed_precision not in MIXED_PRECISION:
        raise SRDError(f"--mixed_precision {mixed_precision}: expected one of {MIXED_PRECISION}")
    if mixed_precision == "bf16" and device.type == "cuda":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
        if not bf16_supported:
            name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else device
            raise SRDError(f"--mixed_precision bf16: {name} has no bf16 support (use fp16 or no)")
    if mixed_precision == "fp16" and device.type == "cpu":
        raise SRDError("--mixed_precision fp16: needs a GPU (loss scaling); use bf16 or no on CPUs")


def images_to_vision_x(images: Sequence[np.ndarray], image_transform: Any) -> torch.Tensor:
    """Apply the open_clip image transform to uint8 RGB arrays -> (B, 1, 1, C, H, W)."""
    tensors = [image_transform(Image.fromarray(np.asarray(im, dtype=np.uint8))) for im in images]
    return torch.stack(tensors).unsqueeze(1).unsqueeze(1)


def quick_gelu_for(name: str, tag: str | None) -> bool:
    """Whether the tower must be built with QuickGELU to fit the weights of open_clip ``tag``.

    OpenAI's CLIP weights were trained with QuickGELU, but open_clip's ``ViT-L-14`` config uses
    GELU and only warns when they meet: the features are then silently wrong. A tag that needs
    QuickGELU turns it on; a config with QuickGELU and a tag trained without it is refused.
    """
    model_cfg = open_clip.get_model_config(name) or {}
    tag_cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    model_quick, tag_quick = bool(model_cfg.get("quick_gelu")), bool(tag_cfg.get("quick_gelu"))
    if tag_cfg and model_quick and not tag_quick:
        raise SRDError(
            f"--vision_encoder_pretrained {tag}: these weights were trained with GELU but "
            f"--vision_encoder_path {name} uses QuickGELU"
        )
    return tag_quick or model_quick


def set_vision_tokens(visual: torch.nn.Module, vision_tokens: str, name: str) -> None:
    """Make ``visual(x)[1]`` the patch tokens before (``pre_ln``) or after ``ln_post``.

    open_clip's VisionTransformer applies ``ln_post`` to every token unless
    ``final_ln_after_pool`` is set, in which case only the pooled token is normalised.
    """
    if vision_tokens not in VISION_TOKENS:
        raise SRDError(f"--vision_tokens {vision_tokens}: expected one of {VISION_TOKENS}")
    if isinstance(visual, ModifiedResNet):
        # the tokens are the last feature map, before the attention pool: no ln_post to skip
        if vision_tokens != "pre_ln":
            raise SRDError(
                f"--vision_tokens {vision_tokens}: {name} is a ResNet tower (its tokens are the "
                "feature map before pooling); only pre_ln applies"
            )
        return
    if not hasattr(visual, "final_ln_after_pool") or getattr(visual, "attn_pool", None):
        raise SRDError(
            f"--vision_encoder_path {name}: not a plain ViT tower, its patch tokens cannot be "
            "taken around ln_post (--vision_tokens)"
        )
    visual.final_ln_after_pool = vision_tokens == "pre_ln"
    visual.output_tokens = True


def build_vision_encoder(
    name: str, pretrained: str | None, vision_tokens: str = "pre_ln"
) -> tuple[torch.nn.Module, Any, int]:
    """(visual tower, eval image transform, feature width) from an open_clip config.

    ``pretrained`` is an open_clip tag (downloaded by open_clip), a weights file (the visual
    tower's state dict, or a whole CLIP state dict whose ``visual.`` keys are used), or None.
    """
    register_model_configs()
    if name not in open_clip.list_models():
        raise SRDError(
            f"--vision_encoder_path {name}: unknown vision config "
            f"(shipped: {sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))}; "
            "or any open_clip model name)"
        )
    pretrained = _none(pretrained)
    is_file = pretrained is not None and (os.sep in pretrained or Path(pretrained).suffix)
    tag = None if is_file else pretrained
    quick_gelu = quick_gelu_for(name, tag)
    try:
        clip, _, transform = open_clip.create_model_and_transforms(
            name, pretrained=tag, force_quick_gelu=quick_gelu
        )
    except RuntimeError as exc:
        raise SRDError(f"--vision_encoder_pretrained {pretrained}: {exc}") from None
    if quick_gelu:
        log.info("vision tower %s built with QuickGELU (weights %s)", name, tag)
    visual = clip.visual
    set_vision_tokens(visual, vision_tokens, name)
    if is_file:
        state = read_state_dict(pretrained, "--vision_encoder_pretrained")
        if any(k.startswith("visual.") for k in state):
            state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        try:
            visual.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise SRDError(
                f"--vision_encoder_pretrained {pretrained}: does not fit {name} ({first})"
            ) from None
        # open_clip has just warned "no pretrained weights loaded": they are loaded now
        log.info("vision tower weights loaded from %s", pretrained)
    return visual, transform, vision_width(name)


def read_state_dict(path: str | os.PathLike, flag: str) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch file (weights only, never pickle code)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raw = _read_checkpoint_file(path, flag)
        return raw.get("model_state_dict", raw)
    if not path.is_file():
        raise SRDError(f"{flag} {path}: file not found")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # corrupt or foreign file
        raise SRDError(f"{flag} {path}: cannot read checkpoint ({type(exc).__name__})") from None


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
    except (OSError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "trust_remote_code" in str(exc) and not args.trust_remote_code:
            detail = "this LM needs its own code: pass --trust_remote_code"
        raise SRDError(f"--lm_path {args.lm_path}: cannot load language model ({detail})") from None
    ensure_embedding_accessors(lm)
    return lm


def build_flamingo(args: ModelArgs) -> Captioner:
    """Build the OpenFlamingo model from the flags (no checkpoint loaded)."""
    visual, transform, vis_dim = build_vision_encoder(
        args.vision_encoder_path, args.vision_encoder_pretrained, args.vision_tokens
    )
    tok = load_tokenizer(args.lm_tokenizer_path or args.lm_path, args.trust_remote_code)
    return assemble_flamingo(args, (visual, transform, vis_dim), tok, load_lm(args))


def assemble_flamingo(
    args: ModelArgs,
    vision: tuple[torch.nn.Module, Any, int],
    tok: PreTrainedTokenizerBase,
    lm: torch.nn.Module,
) -> Captioner:
    """Put a vision tower (tower, transform, width), a tokenizer and a causal LM together:
    cross-attention into the LM's decoder blocks, embeddings sized to the tokenizer."""
    visual, transform, vis_dim = vision
    ensure_embedding_accessors(lm)
    attr = decoder_layers_attr(lm, args.decoder_layers_attr_name)
    num_blocks = len(getattr_recursive(lm, attr))
    if not 1 <= args.cross_attn_every_n_layers <= num_blocks:
        raise SRDError(
            f"--cross_attn_every_n_layers {args.cross_attn_every_n_layers}: the LM has "
            f"{num_blocks} decoder blocks"
        )
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(attr)
    if lm.get_input_embeddings().num_embeddings != len(tok):
        lm.resize_token_embeddings(len(tok), mean_resizing=lm.device.type != "meta")
    model = SRDFlamingo(
        clip_like(visual),
        lm,
        eoc_token_id=tok.convert_tokens_to_ids(captions.END_OF_CHUNK),
        media_token_id=tok.convert_tokens_to_ids(captions.IMAGE_TOKEN),
        vis_dim=vis_dim,
        cross_attn_every_n_layers=args.cross_attn_every_n_layers,
        perceiver={
            "depth": args.perceiver_depth,
            "num_latents": args.perceiver_num_latents,
            "heads": args.perceiver_heads,
            "dim_head": args.perceiver_dim_head,
        },
    )
    set_trainable(model, "paper")
    return Captioner(model=model, tokenizer=tok, image_transform=transform, args=args)


def clip_like(visual: torch.nn.Module) -> torch.nn.Module:
    """Flamingo's constructor takes a CLIP model and keeps its ``.visual``."""
    holder = torch.nn.Module()
    holder.visual = visual
    return holder


def set_trainable(model: Flamingo, mode: str) -> None:
    """Choose what trains: "paper" = perceiver + gated cross-attention + token embeddings
    (vision tower and LM blocks frozen, as the paper); "lm" = everything but the vision tower
    (the embedded pretrain over a pretrained tiny CLIP tower); "all" = every parameter."""
    if mode not in TRAINABLE_MODES:
        raise SRDError(f"--trainable {mode}: expected one of {TRAINABLE_MODES}")
    if mode == "lm":
        model.requires_grad_(True)
        model.vision_encoder.requires_grad_(False)
        return
    if mode == "all":
        model.requires_grad_(True)
        # Flamingo reads the tower's patch tokens, never its pooled projection (nor, with
        # pre-ln_post tokens, the final LayerNorm); a parameter that gets no gradient makes
        # multi-process (DDP) training fail, so these stay frozen.
        for part in pooled_only_parts(model.vision_encoder):
            part.requires_grad_(False)
        return
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)


def pooled_only_parts(visual: torch.nn.Module) -> list[torch.nn.Module | torch.nn.Parameter]:
    """Parts of the tower that only the pooled embedding uses (never the patch tokens)."""
    parts: list[torch.nn.Module | torch.nn.Parameter] = []
    if isinstance(getattr(visual, "proj", None), torch.nn.Parameter):
        parts.append(visual.proj)
    if getattr(visual, "final_ln_after_pool", False) and hasattr(visual, "ln_post"):
        parts.append(visual.ln_post)
    return parts


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require grad, detached on the CPU (one name per tensor)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


_XATTN_KEY = re.compile(r"^lang_encoder\.(.+)\.(\d+)\.gated_cross_attn_layer\.attn\.to_q\.weight$")


def describe_layout(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The size facts of a Flamingo state dict: where and how often cross-attention sits, the LM
    width it attends from (OpenFlamingo-3B: every block of MPT-1B, width 2048; 4B: every 2nd
    block of RedPajama-3B, 2560; 9B: every 4th block of MPT-7B, 4096)."""
    found = sorted(
        (m.group(1), int(m.group(2)), tuple(v.shape))
        for k, v in state.items()
        if (m := _XATTN_KEY.match(k))
    )
    if not found:
        return {}
    blocks = sorted({path for path, _, _ in found})
    indices = [i for _, i, _ in found]
    return {
        "blocks": blocks[0] if len(blocks) == 1 else blocks,
        "cross_attn_blocks": len(indices),
        "cross_attn_every_n_layers": indices[0] + 1,
        "lm_width": found[0][2][1],
    }


def _embedding_keys(model: torch.nn.Module) -> set[str]:
    """State-dict names of the LM's token embedding and (possibly tied) output embedding."""
    lm = model.lang_encoder
    ids = {id(lm.get_input_embeddings().weight)}
    out = lm.get_output_embeddings()
    if out is not None:
        ids.add(id(out.weight))
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}


def _append_token_rows(
    state: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    model: torch.nn.Module,
    official_rows: int | None,
    where: str,
) -> list[str]:
    """Grow embedding matrices of an official checkpoint by the rows of our appended tokens.

    The new rows (``<answer>``) are the mean of the checkpoint's rows, in place in ``state``.
    SRDError when the row counts match neither our vocabulary nor the official one.
    """
    grown = []
    for key in sorted(_embedding_keys(model) & set(state)):
        rows, want = state[key].shape[0], own[key].shape[0]
        if rows == want or state[key].dim() != 2 or state[key].shape[1] != own[key].shape[1]:
            continue
        if rows != official_rows:
            raise SRDError(
                f"{where}: its vocabulary ({rows} rows of {key}) does not fit the tokenizer "
                f"({want} tokens{f', {official_rows} without <answer>' if official_rows else ''}); "
                "check --lm_tokenizer_path"
            )
        old = state[key]
        extra = old.float().mean(dim=0, keepdim=True).to(old.dtype).expand(want - rows, -1)
        state[key] = torch.cat([old, extra], dim=0)
        grown.append(key)
    return grown


def load_checkpoint_into(
    model: torch.nn.Module,
    path: str | os.PathLike,
    flag: str = "--checkpoint_path",
    expected_signature: dict[str, Any] | None = None,
    official_rows: int | None = None,
) -> dict[str, Any]:
    """Load a Flamingo state dict, strictly for what matters.

    Refuses: keys the model does not have, tensors of the wrong shape, and trainable parameters
    the file lacks (frozen towers may be absent: they come from the pretrained encoders); a
    checkpoint of another OpenFlamingo size is named as such. ``official_rows`` (the official
    vocabulary size, :func:`official_vocab_size`) allows an official checkpoint whose embeddings
    lack our appended ``<answer>`` row: the row is added as the mean of the others and the
    returned metadata records it under ``"appended_token_rows"``.
    Returns the checkpoint's metadata (empty for raw state dicts, apart from that record).
    """
    path = Path(path)
    where = f"{flag} {path}"
    raw = _read_checkpoint_file(path, flag)
    meta = dict(raw) if "model_state_dict" in raw else {}
    state = dict(raw.get("model_state_dict", raw))
    meta.pop("model_state_dict", None)
    recorded = meta.get("config", {}).get("model_signature") if meta else None
    if recorded:
        recorded = {"vision_tokens": LEGACY_VISION_TOKENS, **recorded}
    if expected_signature and recorded and recorded != expected_signature:
        diff = {
            k: (recorded.get(k), v) for k, v in expected_signature.items() if recorded.get(k) != v
        }
        detail = ", ".join(f"{k}: checkpoint {a!r} vs flags {b!r}" for k, (a, b) in diff.items())
        raise SRDError(f"{where}: made for another model configuration ({detail})")
    own = model.state_dict()
    theirs, ours = describe_layout(state), describe_layout(own)
    if theirs and theirs != ours:
        raise SRDError(
            f"{where}: a checkpoint of another OpenFlamingo size (checkpoint: {_layout(theirs)}; "
            f"model: {_layout(ours)}; check --lm_path and --cross_attn_every_n_layers)"
        )
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise SRDError(
            f"{where}: does not fit the model ({len(unexpected)} unexpected keys, "
            f"e.g. {unexpected[0]})"
        )
    grown = _append_token_rows(state, own, model, official_rows, where)
    wrong = [k for k in state if own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise SRDError(
            f"{where}: does not fit the model ({k} has shape {tuple(state[k].shape)}, "
            f"model expects {tuple(own[k].shape)})"
        )
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            aliases.setdefault(id(p), []).append(name)
    missing = [names[0] for names in aliases.values() if not any(n in state for n in names)]
    if missing:
        raise SRDError(
            f"{where}: does not fit the model ({len(missing)} trainable tensors missing, "
            f"e.g. {missing[0]})"
        )
    model.load_state_dict(state, strict=False)
    if grown:
        rows = own[grown[0]].shape[0] - raw.get("model_state_dict", raw)[grown[0]].shape[0]
        meta["appended_token_rows"] = {
            "keys": grown,
            "rows": rows,
            "tokens": [captions.ANSWER_TOKEN],
            "init": "mean of the checkpoint's rows",
        }
        log.info("%s: appended %d token row(s) to %s (mean init)", path, rows, ", ".join(grown))
    return meta


def _layout(facts: dict[str, Any]) -> str:
    if not facts:
        return "no cross-attention"
    return (
        f"{facts['cross_attn_blocks']} cross-attention blocks in {facts['blocks']} every "
        f"{facts['cross_attn_every_n_layers']}, LM width {facts['lm_width']}"
    )


def _read_checkpoint_file(path: Path, flag: str) -> dict[str, Any]:
    if not path.is_file():
        raise SRDError(f"{flag} {path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise SRDError(f"{flag} {path}: cannot read checkpoint ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise SRDError(f"{flag} {path}: not a state dict")
    return obj


def load_captioner(args: ModelArgs, device: str | torch.device = "cpu") -> Captioner:
    """Build the captioner and load ``args.checkpoint_path`` when given; ready for inference."""
    cap = build_flamingo(args)
    ckpt = _none(args.checkpoint_path)
    if ckpt:
        meta = load_checkpoint_into(
            cap.model,
            ckpt,
            expected_signature=model_signature(args),
            official_rows=official_vocab_size(cap.tokenizer),
        )
        cap.checkpoint_notes = {k: meta[k] for k in ("appended_token_rows", "epoch") if k in meta}
    device = torch.device(device)
    check_mixed_precision(args.mixed_precision, device)
    cap.model.to(device=device)
    cap.model.eval()
    return cap


def with_overrides(args: ModelArgs, **changes: Any) -> ModelArgs:
    return dataclasses.replace(args, **changes)


def export_captioner(cap: Captioner, out_dir: str | os.PathLike) -> ModelArgs:
    """Save a trained captioner as pretrained parts plus an OpenFlamingo checkpoint.

    Writes ``vision.safetensors`` (the visual tower), ``lm/`` (an ordinary HF model folder with
    the tokenizer: the LM blocks without the cross-attention) and ``checkpoint.pt`` (the
    paper-trainable parts), and returns the ModelArgs that load them back. This is how the
    embedded default's clean captioner looks exactly like a real pretrained OpenFlamingo.
    """
    from safetensors.torch import save_file

    from srd.io import atomic_path, ensure_dir

    out = ensure_dir(out_dir)
    model = cap.model
    with atomic_path(out / VISION_WEIGHTS) as tmp:
        state = {
            k: v.detach().cpu().contiguous() for k, v in model.vision_encoder.state_dict().items()
        }
        save_file(state, str(tmp))

    lm = model.lang_encoder
    attr = lm.decoder_layers_attr_name
    base_state = {}
    for key, value in lm.state_dict().items():
        if key.startswith("old_decoder_blocks."):
            base_state[f"{attr}." + key[len("old_decoder_blocks.") :]] = value
        elif key.startswith(f"{attr}.") or key.startswith("gated_cross_attn_layers."):
            continue  # Flamingo wrappers and cross-attention: not part of the base LM
        else:
            base_state[key] = value
    fresh = AutoModelForCausalLM.from_config(lm.config)
    fresh.load_state_dict(base_state, strict=True)
    lm_dir = out / LM_FOLDER
    fresh.save_pretrained(lm_dir)
    cap.tokenizer.save_pretrained(lm_dir)

    paper = {}
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    set_trainable(model, "paper")
    paper = trainable_state_dict(model)
    for n, p in model.named_parameters():
        p.requires_grad_(was[n])
    args = dataclasses.replace(
        cap.args,
        vision_encoder_pretrained=str(out / VISION_WEIGHTS),
        lm_path=str(lm_dir),
        lm_tokenizer_path=None,
        checkpoint_path=str(out / FLAMINGO_CHECKPOINT),
    )
    with atomic_path(out / FLAMINGO_CHECKPOINT) as tmp:
        torch.save(
            {"model_state_dict": paper, "config": {"model_signature": model_signature(args)}}, tmp
        )
    return args
