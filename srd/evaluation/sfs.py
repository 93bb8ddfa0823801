"""The Semantic Fidelity Score (SFS): how well a caption keeps the meaning of a clean reference.

Components (reference §7), per (model caption ``y``, reference caption ``b``):

* ``S_sem = cos(E(y), E(b))`` in [-1, 1], ``E`` = attention-masked mean-pooled sentence embedding
  (all-MiniLM-L6-v2 by default). The reference pooled over padding too (bug B7), so its batched
  and single scores differed; here padding never changes an embedding.
* ``S_flu = PPL(b) / PPL(y)`` under a language model (:mod:`srd.evaluation.fluency`); > 1
  means ``y`` reads more fluently than the reference.
* optional ``clip = 100 * cos(CLIP(image), CLIP(y))`` when a CLIP model is given.
* the combined score, see :func:`combine_sfs`.

An empty caption (no word) scores ``S_sem = S_flu = SFS = 0`` (and clip 0) and keeps its place in
every array; the reference dropped empty captions from its fluency list, misaligning it (B8).

:class:`SFSScorer` takes its parts injected (an :class:`~srd.evaluation.scorers.Embedder`, a
:class:`~srd.evaluation.fluency.FluencyModel`, an optional reference captioner and CLIP scorer),
so the SRD reward, stage C and tests share one implementation; :func:`build_scorer` resolves the
defaults.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from srd.captions import is_empty
from srd.config import arg
from srd.errors import SRDError
from srd.evaluation.fluency import (
    FluencyModel,
    load_fluency,
    looks_like_path,
)
from srd.evaluation.scorers import ClipScorer, Embedder, ReferenceCaptioner, load_embedder
from srd.flags import COUNT
from srd.geometry import IMAGE_SIZE
from srd.io import read_json

log = logging.getLogger(__name__)

SFS_DEFINITION = "SFS = harmonic_mean(clip(S_sem, 0, 1), min(S_flu, 1)); 0 if both are 0"

FLU_REFERENCE_CUTOFF = 1.5
"""The reference's stage C averaged fluency only over ratios <= 1.5 (and non-empty captions)."""


# --------------------------------------------------------------------------------------------
# Scores


def combine_sfs(sem: np.ndarray, flu: np.ndarray) -> np.ndarray:
    """Combined SFS in [0, 1]: ``SFS = 2 a b / (a + b)``, ``a = clip(S_sem, 0, 1)``,
    ``b = min(S_flu, 1)`` (``SFS = 0`` when ``a + b = 0``). Shapes (N,) -> (N,).

    Why this form: both parts are first put on [0, 1] with 1 = "as good as the clean
    reference": a negative cosine means "unrelated" as much as 0 does, and a caption more fluent
    than the reference is not more faithful, so the fluency ratio is capped at 1 (the reference
    also discarded ratios above 1.5 as outliers). The harmonic mean (like F1) is 0 when either
    part is 0 and is dominated by the weaker part, so neither a fluent but off-topic caption
    (a backdoor's target sentence) nor an on-topic word salad scores well. It is non-decreasing
    in each part, and 1 only when the caption matches the reference in meaning and fluency.
    """
    a = np.clip(np.asarray(sem, dtype=np.float64), 0.0, 1.0)
    b = np.clip(np.asarray(flu, dtype=np.float64), 0.0, 1.0)
    total = a + b
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, 2.0 * a * b / safe, 0.0)


@dataclass
class SFSScores:
    """Per-item SFS components, all of shape (N,) and aligned with the input order."""

    sem: np.ndarray
    flu: np.ndarray
    sfs: np.ndarray
    empty: np.ndarray
    """bool: the caption (or its reference) had no word, so every score is 0."""
    clip: np.ndarray | None = None
    references: list[str] | None = None

    def __len__(self) -> int:
        return len(self.sem)

    def means(self) -> dict[str, float]:
        """Means over all items (empty captions count as 0): sem, flu, sfs and clip if any."""
        out = {
            "sem": _mean(self.sem),
            "flu": _mean(self.flu),
            "sfs": _mean(self.sfs),
        }
        if self.clip is not None:
            out["clip"] = _mean(self.clip)
        return out

    def flu_reference_style(self) -> float | None:
        """Mean fluency as the reference's stage C printed it: non-empty items with ratio <= 1.5."""
        keep = ~self.empty & np.isfinite(self.flu) & (self.flu <= FLU_REFERENCE_CUTOFF)
        return _mean(self.flu[keep])

    def item(self, i: int) -> dict[str, Any]:
        """Item ``i`` as a JSON-ready dict."""
        out: dict[str, Any] = {
            "sem": _finite(self.sem[i]),
            "flu": _finite(self.flu[i]),
            "sfs": _finite(self.sfs[i]),
        }
        if self.clip is not None:
            out["clip"] = _finite(self.clip[i])
        if self.references is not None:
            out["reference"] = self.references[i]
        out["empty"] = bool(self.empty[i])
        return out

    @classmethod
    def concat(cls, parts: Sequence[SFSScores]) -> SFSScores:
        """Join the scores of consecutive chunks."""
        if not parts:
            raise ValueError("nothing to concatenate")
        has_clip = all(p.clip is not None for p in parts)
        has_refs = all(p.references is not None for p in parts)
        return cls(
            sem=np.concatenate([p.sem for p in parts]),
            flu=np.concatenate([p.flu for p in parts]),
            sfs=np.concatenate([p.sfs for p in parts]),
            empty=np.concatenate([p.empty for p in parts]),
            clip=np.concatenate([p.clip for p in parts]) if has_clip else None,  # type: ignore[misc]
            references=[r for p in parts for r in p.references] if has_refs else None,  # type: ignore[union-attr]
        )


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (N, D) arrays -> (N,) in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1.0), 0.0)


class SFSScorer:
    """Scores model captions against reference captions (stage C and the SRD reward)."""

    def __init__(
        self,
        embedder: Embedder,
        fluency: FluencyModel,
        reference_captioner: ReferenceCaptioner | None = None,
        clip: ClipScorer | None = None,
    ) -> None:
        self.embedder = embedder
        self.fluency = fluency
        self.reference_captioner = reference_captioner
        self.clip = clip

    def score(self, captions: Sequence[str], references: Sequence[str]) -> SFSScores:
        """S_sem, S_flu and SFS of each (caption, reference) pair; arrays of shape (N,)."""
        if len(captions) != len(references):
            raise ValueError(f"{len(captions)} captions but {len(references)} references")
        n = len(captions)
        pairs = zip(captions, references, strict=True)
        empty = np.array([is_empty(c) or is_empty(r) for c, r in pairs], dtype=bool)
        sem = np.zeros(n, dtype=np.float64)
        flu = np.zeros(n, dtype=np.float64)
        keep = np.flatnonzero(~empty)
        if len(keep):
            caps = [captions[i] for i in keep]
            refs = [references[i] for i in keep]
            # One call each: the parts batch internally, and both sides share the batches.
            emb = self.embedder.embed(caps + refs)
            sem[keep] = _cosine_rows(emb[: len(keep)], emb[len(keep) :])
            ppl = np.asarray(self.fluency.perplexity(caps + refs), dtype=np.float64)
            ppl_cap, ppl_ref = ppl[: len(keep)], ppl[len(keep) :]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = ppl_ref / ppl_cap
            bad = ~np.isfinite(ratio)
            if bad.any():  # a perplexity overflowed: said, and scored as no fluency
                log.warning("%d of %d fluency ratios are not finite (perplexity overflow; "
                            "e.g. %r): scored 0", int(bad.sum()), len(keep),
                            caps[int(np.flatnonzero(bad)[0])])  # fmt: skip
            flu[keep] = np.where(bad, 0.0, ratio)
        return SFSScores(sem=sem, flu=flu, sfs=combine_sfs(sem, flu), empty=empty)

    def score_images(
        self,
        images: Sequence[np.ndarray],
        captions: Sequence[str],
        batch_size: int = 32,
    ) -> SFSScores:
        """Caption ``images`` (uint8 (N, 224, 224, 3)) with the reference captioner, then score.

        Adds the CLIP score of (image, caption) when a CLIP scorer is present (0 for an empty
        caption). Work is done in chunks of ``batch_size`` images.
        """
        if self.reference_captioner is None:
            raise ValueError("score_images needs a reference_captioner")
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        parts = []
        chunks = range(0, len(captions), batch_size)
        for start in tqdm(chunks, desc="SFS", disable=len(chunks) < 2):
            imgs = images[start : start + batch_size]
            caps = list(captions[start : start + batch_size])
            refs = list(self.reference_captioner(imgs))
            if len(refs) != len(caps):
                raise ValueError(f"reference captioner gave {len(refs)} captions for {len(caps)}")
            part = self.score(caps, refs)
            part.references = refs
            if self.clip is not None:
                clip = self.clip.score(imgs, caps)
                part.clip = np.where(np.array([is_empty(c) for c in caps], bool), 0.0, clip)
            parts.append(part)
        return SFSScores.concat(parts)


def build_scorer(
    text_model: str | None = None,
    gpt_model: str | None = None,
    reference_captions_for_ngram: Iterable[str] | None = None,
    clip_model: str | None = None,
    reference_captioner: ReferenceCaptioner | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    trust_remote_code: bool = False,
    ngram_order: int = 3,
) -> SFSScorer:
    """Build an :class:`SFSScorer` from model names, with the embedded defaults.

    ``text_model`` None -> the offline all-MiniLM-L6-v2 package; ``gpt_model`` None -> an n-gram
    LM fitted on ``reference_captions_for_ngram`` (clean captions); ``clip_model`` None -> no CLIP
    score. SRDError naming the flag when a model cannot be found or loaded.
    """
    # Fail on a mistyped folder before spending time loading the other models.
    for name, flag in ((text_model, "--text_model"), (gpt_model, "--gpt_model"),
                       (clip_model, "--clip_model")):  # fmt: skip
        if name and looks_like_path(str(name)) and not Path(str(name)).expanduser().is_dir():
            raise SRDError(f"{flag} {name}: folder not found")
    embedder = load_embedder(text_model, device=device, batch_size=batch_size)
    fluency = load_fluency(
        gpt_model,
        reference_captions_for_ngram,
        device=device,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        ngram_order=ngram_order,
    )
    clip = ClipScorer.from_pretrained(clip_model, device, batch_size) if clip_model else None
    return SFSScorer(embedder, fluency, reference_captioner=reference_captioner, clip=clip)


@dataclass
class SFSModelArgs:
    """SFS scoring models: the text embedder, the fluency LM and a BLIP reference captioner."""

    text_model: str | None = arg(
        None, help="sentence-transformers folder or hub id (default: offline all-MiniLM-L6-v2)"
    )
    gpt_model: str | None = arg(
        None, help="local causal LM folder for the fluency perplexity (default: n-gram LM)"
    )
    annotations_path: str | None = arg(
        None,
        help="COCO caption annotations JSON whose captions fit the n-gram fluency LM "
        "(required when --gpt_model is not given)",
    )
    ngram_order: int = arg(3, help="order of the n-gram fluency LM", check=COUNT)
    blip_model: str | None = arg(
        None,
        help="BLIP captioning folder or hub id for the reference captions (the paper's "
        "BLIP-large; default: the clean captioner)",
    )


def load_scorer(
    models: SFSModelArgs,
    device: str | torch.device,
    batch_size: int,
    trust_remote_code: bool = False,
    clip_model: str | None = None,
) -> SFSScorer:
    """The SFS scorer of the flags: MiniLM (or --text_model) and --gpt_model's perplexity, or
    an n-gram LM fitted on the captions of --annotations_path."""
    ngram_captions = None
    if not models.gpt_model:
        if not models.annotations_path:
            raise SRDError(
                "--annotations_path: required when --gpt_model is not given "
                "(its captions fit the n-gram fluency LM)"
            )
        from srd.data.records import load_references

        references = load_references(models.annotations_path, flag="--annotations_path")
        ngram_captions = [c for caps in references.values() for c in caps]
    return build_scorer(
        text_model=models.text_model,
        gpt_model=models.gpt_model,
        reference_captions_for_ngram=ngram_captions,
        clip_model=clip_model,
        device=device,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        ngram_order=models.ngram_order,
    )


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# --------------------------------------------------------------------------------------------
# Stage C inputs and record

IMAGES_FILE = "images.npz"
IDS_FILE = "img_id.json"
SENTENCES_FILE = "sent.json"


@dataclass
class SFSInputs:
    """What the evaluation stage leaves for stage C, aligned by position and keyed by id."""

    image_ids: list[int]
    captions: list[str]
    images: np.ndarray
    """uint8 (N, 224, 224, 3): the clean (untriggered) images."""


def load_sfs_inputs(input_dir: str | os.PathLike) -> SFSInputs:
    """Read ``images.npz``, ``img_id.json`` and ``sent.json`` from ``input_dir`` and check them."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise SRDError(f"{input_dir}: input folder not found (check --data_dir_path/--name/--type)")
    ids_path, sent_path, images_path = (
        input_dir / IDS_FILE,
        input_dir / SENTENCES_FILE,
        input_dir / IMAGES_FILE,
    )
    ids = read_json(ids_path)
    sents = read_json(sent_path)
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise SRDError(f"{ids_path}: expected a JSON list of integer image ids")
    if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
        raise SRDError(f"{sent_path}: expected a JSON list of caption strings")
    if len(set(ids)) != len(ids):
        raise SRDError(f"{ids_path}: repeated image ids")
    if len(ids) != len(sents):
        raise SRDError(f"{sent_path}: {len(sents)} captions but {ids_path.name} has {len(ids)} ids")
    if not ids:
        raise SRDError(f"{ids_path}: no images to score")
    if not images_path.is_file():
        raise SRDError(f"{images_path}: file not found")
    try:
        with np.load(images_path, allow_pickle=False) as data:
            if "images" not in data:
                raise SRDError(f"{images_path}: no array named 'images'")
            images = data["images"]
    except (OSError, ValueError) as exc:
        raise SRDError(f"{images_path}: cannot read npz ({exc})") from None
    expected = (len(ids), IMAGE_SIZE, IMAGE_SIZE, 3)
    if images.dtype != np.uint8 or images.shape != expected:
        raise SRDError(
            f"{images_path}: images are {images.dtype} {images.shape}, expected uint8 {expected}"
        )
    return SFSInputs(image_ids=list(ids), captions=list(sents), images=images)


def evaluate_sfs(inputs: SFSInputs, scorer: SFSScorer, batch_size: int = 32) -> dict[str, Any]:
    """Score every (clean image, model caption); the record stage C writes (means over all)."""
    scores = scorer.score_images(inputs.images, inputs.captions, batch_size=batch_size)
    per_image = {}
    for i, (image_id, caption) in enumerate(zip(inputs.image_ids, inputs.captions, strict=True)):
        per_image[str(image_id)] = {"caption": caption, **scores.item(i)}
    return {
        "sfs_definition": SFS_DEFINITION,
        "n_images": len(scores),
        "n_empty": int(scores.empty.sum()),
        "means": scores.means(),
        "flu_reference_style": scores.flu_reference_style(),
        "per_image": per_image,
    }
