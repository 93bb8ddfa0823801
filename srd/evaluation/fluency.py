"""Sentence perplexity for the SFS fluency ratio ``S_flu = PPL(reference) / PPL(caption)``.

Two scorers share one protocol, :class:`FluencyModel` (``perplexity(texts) -> (N,)``):

* :class:`CausalLMFluency`: any local Hugging Face causal LM folder (GPT-2-large in the paper).
* :class:`NGramFluency`: the embedded default, a smoothed word trigram LM fitted on clean reference
  captions in well under a second, used when no causal LM is given.

Every text is scored on its own, also when batched: ``PPL(s) = exp(mean NLL of the tokens of s)``.
A text with no tokens at all gets ``inf`` (the SFS scorer turns that into ``S_flu = 0``).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm import tqdm

from srd.captions import words
from srd.errors import SRDError

log = logging.getLogger(__name__)

BOS = "<s>"
EOS = "</s>"


@runtime_checkable
class FluencyModel(Protocol):
    """Anything that gives one perplexity per text."""

    def perplexity(self, texts: Sequence[str]) -> np.ndarray:
        """Per-text perplexity, shape (N,) float64; ``inf`` for a text with no tokens."""
        ...


class NGramFluency:
    """Word n-gram LM with hierarchical Dirichlet (add-beta-to-lower-order) smoothing.

    ``P_n(w | h) = (c(h, w) + beta * P_{n-1}(w | h')) / (c(h) + beta)`` where ``h'`` drops the
    oldest word of ``h``; the recursion ends at an add-k unigram over the training vocabulary plus
    one unknown-word slot. Every probability is therefore positive: an unseen context falls back
    to shorter ones, and an out-of-vocabulary word (the attack's "banana" never occurs in clean
    captions) gets a small finite probability. nltk's Kneser-Ney and Witten-Bell models give
    zero probability (infinite perplexity) to such words, and its Lidstone model has no back-off,
    which is why this small model is written here.

    Tokens are :func:`srd.captions.words` (lower-case letters/digits), padded with ``order - 1``
    ``<s>`` and one ``</s>``; every word and the ``</s>`` are predicted, so a one-word caption has
    two scored tokens and a finite perplexity.
    """

    def __init__(self, order: int = 3, beta: float = 1.0, add_k: float = 0.1) -> None:
        if order < 1:
            raise ValueError(f"n-gram order must be >= 1, got {order}")
        if beta <= 0 or add_k <= 0:
            raise ValueError("beta and add_k must be positive")
        self.order = order
        self.beta = beta
        self.add_k = add_k
        # counts[n][(context..., word)] for n-grams of length n + 1; context_counts likewise.
        self.counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order)]
        self.context_counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order)]
        self.vocab: set[str] = set()
        self.n_tokens = 0

    @classmethod
    def fit(
        cls, captions: Iterable[str], order: int = 3, beta: float = 1.0, add_k: float = 0.1
    ) -> NGramFluency:
        """Count n-grams of ``captions`` (clean reference captions)."""
        lm = cls(order, beta, add_k)
        n_sentences = 0
        for caption in captions:
            tokens = lm._padded(caption)
            if len(tokens) == order:  # only padding: an empty caption carries no evidence
                continue
            n_sentences += 1
            for i in range(order - 1, len(tokens)):
                for n in range(order):
                    gram = tuple(tokens[i - n : i + 1])
                    lm.counts[n][gram] += 1
                    lm.context_counts[n][gram[:-1]] += 1
        if n_sentences == 0:
            raise SRDError("n-gram fluency LM: no non-empty captions to fit on")
        lm.vocab = {gram[0] for gram in lm.counts[0]}
        lm.n_tokens = sum(lm.counts[0].values())
        log.info(
            "fitted %d-gram fluency LM on %d captions (%d word types, %d tokens)",
            order,
            n_sentences,
            len(lm.vocab),
            lm.n_tokens,
        )
        return lm

    def _padded(self, text: str) -> list[str]:
        return [BOS] * (self.order - 1) + words(text) + [EOS]

    def _prob(self, history: tuple[str, ...], word: str) -> float:
        # Unknown words share one extra vocabulary slot in the unigram base.
        p = (self.counts[0][(word,)] + self.add_k) / (
            self.n_tokens + self.add_k * (len(self.vocab) + 1)
        )
        for n in range(1, self.order):
            context = history[len(history) - n :]
            c_context = self.context_counts[n][context]
            if c_context == 0:
                break  # longer contexts containing an unseen one are unseen too
            p = (self.counts[n][context + (word,)] + self.beta * p) / (c_context + self.beta)
        return p

    def log_likelihoods(self, text: str) -> list[float]:
        """Natural-log probability of each predicted token of ``text`` (words and ``</s>``)."""
        tokens = self._padded(text)
        return [
            math.log(self._prob(tuple(tokens[i - self.order + 1 : i]), tokens[i]))
            for i in range(self.order - 1, len(tokens))
        ]

    def perplexity(self, texts: Sequence[str]) -> np.ndarray:
        """Per-text perplexity (N,); ``inf`` for a text without words."""
        out = np.empty(len(texts), dtype=np.float64)
        for i, text in enumerate(texts):
            if not words(text):
                out[i] = math.inf
                continue
            lls = self.log_likelihoods(text)
            out[i] = math.exp(-sum(lls) / len(lls))
        return out


class CausalLMFluency:
    """Perplexity under a Hugging Face causal LM (GPT-2 for real runs), batched per sentence.

    Each text is tokenized alone, a BOS token is put in front (GPT-2's ``<|endoftext|>``; EOS when
    the tokenizer has no BOS), and the NLL is averaged over the text's own tokens only (attention
    mask + per-row mean), so batching and padding do not change a text's score. Reference
    difference: the reference scores without BOS, so the first token is never predicted and a
    one-token caption gives NaN; here every token of the caption is scored.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        batch_size: int = 32,
        max_length: int = 512,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
        if start is None:
            start = tokenizer.eos_token_id
        if start is None:
            raise SRDError("fluency LM tokenizer has neither a BOS nor an EOS token to start from")
        self.start_id = int(start)
        # Padding positions are masked out, so any id will do: pad, else eos, else the start id.
        pad = tokenizer.pad_token_id
        pad = tokenizer.eos_token_id if pad is None else pad
        self.pad_id = int(self.start_id if pad is None else pad)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        trust_remote_code: bool = False,
        flag: str = "--gpt_model",
    ) -> CausalLMFluency:
        """Load a causal LM and its tokenizer from a local folder (or the local HF cache)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        model, tokenizer = load_pretrained(
            path,
            flag,
            "a causal LM",
            lambda name: AutoModelForCausalLM.from_pretrained(name, **kw),
            lambda name: AutoTokenizer.from_pretrained(name, **kw),
        )
        log.info("fluency LM %s: %s", path, type(model).__name__)
        return cls(model, tokenizer, batch_size=batch_size, device=device)

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.start_id] + list(ids)[: self.max_length - 1]

    @torch.inference_mode()
    def perplexity(self, texts: Sequence[str]) -> np.ndarray:
        """Per-text perplexity (N,); ``inf`` for a text that tokenizes to nothing."""
        out = np.full(len(texts), math.inf, dtype=np.float64)
        encoded = [self._encode(t) if t.strip() else [] for t in texts]
        scored = [i for i, ids in enumerate(encoded) if len(ids) > 1]
        scored.sort(key=lambda i: len(encoded[i]))  # similar lengths together: less padding
        batches = range(0, len(scored), self.batch_size)
        for start in tqdm(batches, desc="perplexity", leave=False, disable=len(batches) < 8):
            rows = scored[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, : len(encoded[i])] = 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
            target_mask = mask[:, 1:].to(nll.dtype)
            mean_nll = (nll * target_mask).sum(1) / target_mask.sum(1)
            out[rows] = torch.exp(mean_nll).double().cpu().numpy()
        return out


def first_line(exc: BaseException) -> str:
    """First non-empty line of an exception message (library errors run to many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_pretrained(name: str | os.PathLike, flag: str, kind: str, *loaders: Any) -> tuple:
    """``tuple(loader(name) for loader in loaders)`` for Hugging Face parts of one model folder.

    SRDError naming ``flag`` when ``name`` is a path that does not exist, or when a loader fails
    (list the model first: an incomplete folder fails there with the clearest message).
    """
    name = str(name)
    where = f"{flag} {name}"
    if not Path(name).is_dir() and looks_like_path(name):
        raise SRDError(f"{where}: folder not found")
    try:
        return tuple(load(name) for load in loaders)
    except (OSError, ValueError, ImportError) as exc:
        raise SRDError(f"{where}: cannot load {kind} ({first_line(exc)})") from None


def looks_like_path(name: str) -> bool:
    """True for strings that can only be a file-system path, never a hub id ("owner/name")."""
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def load_fluency(
    gpt_model: str | None = None,
    reference_captions: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    trust_remote_code: bool = False,
    ngram_order: int = 3,
) -> FluencyModel:
    """The causal LM at ``gpt_model`` when given, else an n-gram LM fitted on the captions."""
    if gpt_model:
        return CausalLMFluency.from_pretrained(
            gpt_model, device=device, batch_size=batch_size, trust_remote_code=trust_remote_code
        )
    if reference_captions is None:
        raise SRDError(
            "--gpt_model: not given, and no clean captions to fit the n-gram fluency LM on "
            "(give --annotations_path)"
        )
    return NGramFluency.fit(reference_captions, order=ngram_order)
