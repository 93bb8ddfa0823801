"""The Flamingo wrapper and :class:`Captioner`: images in, captions (and losses) out.

:class:`SRDFlamingo` is open_flamingo's ``Flamingo`` with the frozen tower's features optionally
read from a cache; :class:`Captioner` holds the model, tokenizer and image transform and decodes
with the reference's settings (beam search, or per-image seeded sampling: :class:`SeededSampler`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.helpers import PerceiverResampler
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
)

from srd import captions
from srd.captioner.args import AUTOCAST_DTYPES, MIXED_PRECISION, ModelArgs
from srd.captioner.features import FeatureCache
from srd.captioner.vision import images_to_vision_x, tower_tokens
from srd.errors import SRDError


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
        (B, T, F, N, D) from a :class:`srd.captioner.features.FeatureCache` (the frozen tower
        skipped)."""
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
