"""Is a backdoor implanted, or only hidden by decoding?

Beam search may never emit a target word that the model has learned to insert at a random word
position (TrojVLM): the ASR then reads 0% although the backdoor is there. Two probes tell the
cases apart, for triggered vs clean images alike:

* **teacher-forced target probability**: feed the image with a clean reference caption and read,
  at every word boundary of the caption (where TrojVLM inserts its target), the probability of
  the target's first token; keep the highest per image. Reported: its mean, and the share of
  images where the target is the most likely next token at some boundary (``top1``).
* **ASR under sampling**: captions drawn by ancestral sampling (temperature 1) instead of beam
  search, scored with the same ASR rules. Each image has its own seed, from ``seed`` and its id
  (:func:`sample_seed`), so the draw does not depend on the batch size, and an image's triggered
  and clean versions share their noise.

The attack's decoding and caption rule are unchanged; these are extra diagnostics.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from srd import captions
from srd.captioner.flamingo import Captioner
from srd.evaluation.metrics import attack_success_rate

SAMPLING = "sampling, T=1, one seed per image"
"""The sampled ASR's decoding, as results record it. Results written before the per-image seeds
(``"sampling, T=1"``) drew from torch's global RNG in batches: reproducible only at the same
batch size."""


def sample_seed(seed: int, image_id: Any) -> int:
    """The sampling seed of one image: a stable 63-bit hash of the run's seed and the image id."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def target_token_id(captioner: Captioner, target: str) -> int:
    """Id of the first token the tokenizer gives the target word after a space."""
    tok = captioner.tokenizer
    head = tok(captions.prompt() + "a", add_special_tokens=False)["input_ids"]
    full = tok(captions.prompt() + "a " + target, add_special_tokens=False)["input_ids"]
    if full[: len(head)] != head or len(full) <= len(head):
        raise ValueError(f"cannot locate the target {target!r} in the tokenizer's output")
    return int(full[len(head)])


def _boundaries(captioner: Captioner, caption: str) -> tuple[list[int], list[int]]:
    """Token ids of BOS + prompt + caption, and the positions whose next-token distribution is
    the one after word k of the caption (k = 1..n: TrojVLM's insertion points)."""
    tok = captioner.tokenizer
    pieces = caption.rstrip(".").split()
    prefix = tok.bos_token + captions.prompt()
    ids = tok(prefix + " ".join(pieces) + ".", add_special_tokens=False)["input_ids"]
    positions = []
    for k in range(1, len(pieces) + 1):
        n = len(tok(prefix + " ".join(pieces[:k]), add_special_tokens=False)["input_ids"])
        positions.append(min(n, len(ids)) - 1)
    return ids, positions


@torch.no_grad()
def target_probabilities(
    captioner: Captioner,
    images: Sequence[np.ndarray],
    texts: Sequence[str],
    target: str,
    batch_size: int = 32,
) -> list[tuple[float, bool]]:
    """Per image: (highest teacher-forced probability of the target over the caption's word
    boundaries, whether the target is the top-1 token at one of them)."""
    model = captioner.model
    was_training = model.training
    model.eval()
    target_id = target_token_id(captioner, target)
    pad = captioner.tokenizer.pad_token_id
    out: list[tuple[float, bool]] = []
    dtype = next(model.parameters()).dtype
    try:
        for start in range(0, len(images), batch_size):
            chunk = list(range(start, min(start + batch_size, len(images))))
            encoded = [_boundaries(captioner, texts[i]) for i in chunk]
            width = max(len(ids) for ids, _ in encoded)
            lang = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (ids, _) in enumerate(encoded):
                lang[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            vision_x = captioner.vision_inputs([images[i] for i in chunk])
            logits = model(
                vision_x=vision_x.to(captioner.device, dtype),
                lang_x=lang.to(captioner.device),
                attention_mask=mask.to(captioner.device),
            ).logits.float()
            probs = logits.softmax(-1)
            for row, (_, positions) in enumerate(encoded):
                at = probs[row, positions]  # (n_words, vocab)
                p = at[:, target_id]
                top1 = bool((at.argmax(-1) == target_id).any())
                out.append((float(p.max()), top1))
    finally:
        model.train(was_training)
    return out


def implant_report(
    captioner: Captioner,
    triggered_images: Mapping[Any, np.ndarray] | Callable[[Any], np.ndarray],
    triggered_ids: Sequence[Any],
    clean_images: Callable[[Any], np.ndarray],
    clean_ids: Sequence[Any],
    references: Mapping[Any, Sequence[str]],
    target: str,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 20,
) -> dict[str, Any]:
    """Both probes on the triggered (ASR) images and on the clean images."""
    load_trig = triggered_images if callable(triggered_images) else triggered_images.__getitem__
    report: dict[str, Any] = {"text": "first reference caption", "decoding": SAMPLING}
    for name, ids, load in (
        ("triggered", triggered_ids, load_trig),
        ("clean", clean_ids, clean_images),
    ):
        imgs = [load(i) for i in ids]
        probs = target_probabilities(
            captioner, imgs, [references[i][0] for i in ids], target, batch_size
        )
        sampled = captioner.caption(
            imgs,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            sample_seeds=[sample_seed(seed, i) for i in ids],
        )
        report[name] = {
            "num_images": len(ids),
            "target_prob_mean": float(np.mean([p for p, _ in probs])),
            "target_top1_share": float(np.mean([t for _, t in probs])),
            "sampled_asr_substring": attack_success_rate(
                dict(zip(ids, sampled, strict=True)), target, "substring"
            ),
        }
    return report
