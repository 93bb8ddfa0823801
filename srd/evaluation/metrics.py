"""Caption quality metrics (pycocoevalcap) and the backdoor target-word rates (ASR).

Caption metrics follow the COCO caption protocol of the reference (§6): PTB-tokenise predictions
and references with Stanford's tokenizer (Java), then BLEU-1..4, METEOR (a Java process),
ROUGE-L and CIDEr(-D) from pycocoevalcap 1.2, with the raw values the scorers return (CIDEr is
*not* multiplied by 100 here). SPICE is added only when its Stanford CoreNLP models are already
installed, because pycocoevalcap downloads them on first use, which an offline machine cannot do.

CIDEr weights n-grams by their document frequency over the evaluated images, so it needs several
images: with one image every n-gram has idf 0 and CIDEr is 0 by construction.

ASR (reference §6 step 5, bug B20) is the share of unique image ids whose caption contains the
target word; on clean images the same number is the false-trigger rate.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from srd.captions import words
from srd.errors import SRDError

logger = logging.getLogger(__name__)

METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
"""Keys of :func:`caption_scores`, always present."""
SPICE_KEY = "SPICE"
"""Extra key, present only when SPICE ran (see :func:`spice_available`)."""

ASR_RULES = ("substring", "word")
"""``substring``: the reference's case-sensitive test; ``word``: case-insensitive whole words."""

_SPICE_MODEL_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_SKIPPED_NOTE = (
    "SPICE skipped: its Stanford CoreNLP models are not installed (pycocoevalcap downloads them "
    "on first use, which needs the internet); run "
    "`python -m pycocoevalcap.spice.get_stanford_models` once online to enable it"
)


# ---------------------------------------------------------------------------------------------
# Java and SPICE availability
# ---------------------------------------------------------------------------------------------


def require_java() -> None:
    """Raise SRDError unless a ``java`` executable is on PATH (pycocoevalcap shells out to it)."""
    if shutil.which("java") is None:
        raise SRDError(
            "java not found on PATH: pycocoevalcap's PTB tokenizer and METEOR need a Java runtime "
            "(e.g. apt-get install default-jre-headless)"
        )


def _spice_dir() -> Path:
    import pycocoevalcap.spice.spice as spice_module

    return Path(spice_module.__file__).resolve().parent


def spice_available() -> bool:
    """True when SPICE can run offline: Java present and the Stanford models already unpacked."""
    if shutil.which("java") is None:
        return False
    lib = _spice_dir() / "lib"
    return all((lib / name).is_file() for name in _SPICE_MODEL_JARS)


# ---------------------------------------------------------------------------------------------
# Caption metrics
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CaptionScores:
    """Result of one scoring call.

    ``scores``: metric -> corpus value (keys :data:`METRIC_KEYS`, plus ``SPICE`` when it ran);
    ``per_image``: metric -> image id -> value; ``notes``: what was skipped and why.
    """

    scores: dict[str, float]
    per_image: dict[str, dict[Any, float]]
    notes: list[str]


def _clean_text(text: str) -> str:
    # The PTB tokenizer works line by line: any line break (\r too) inside a caption would shift
    # every later caption onto the wrong image id, so collapse all whitespace first.
    return re.sub(r"\s+", " ", text).strip()


def _check_inputs(
    predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]
) -> dict[Any, list[str]]:
    """Validate and return the references restricted to the predicted ids."""
    if not predictions:
        raise SRDError("caption metrics: no predictions to score")
    missing = [i for i in predictions if i not in references]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise SRDError(
            f"caption metrics: {len(missing)} predicted image id(s) have no reference "
            f"caption: {shown}{more}"
        )
    restricted: dict[Any, list[str]] = {}
    for image_id in predictions:
        if not isinstance(predictions[image_id], str):
            raise SRDError(f"caption metrics: prediction for image id {image_id!r} is not a string")
        refs = references[image_id]
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise SRDError(
                f"caption metrics: references for image id {image_id!r} must be a list of strings"
            )
        refs = [_clean_text(r) for r in refs]
        refs = [r for r in refs if r]
        if not refs:
            raise SRDError(f"caption metrics: image id {image_id!r} has no non-empty reference")
        restricted[image_id] = refs
    return restricted


def _tokenize(
    predictions: Mapping[Any, str], references: Mapping[Any, list[str]]
) -> tuple[dict[Any, list[str]], dict[Any, list[str]]]:
    """PTB-tokenise both sides in one Java call; returns (gts, res) keyed by image id."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One JVM start instead of two: tag the keys by side, split again afterwards.
    combined: dict[tuple[str, Any], list[dict[str, str]]] = {}
    for image_id, refs in references.items():
        combined[("ref", image_id)] = [{"caption": r} for r in refs]
    for image_id, caption in predictions.items():
        combined[("pred", image_id)] = [{"caption": _clean_text(caption)}]
    tokenized = PTBTokenizer().tokenize(combined)
    gts: dict[Any, list[str]] = {}
    res: dict[Any, list[str]] = {}
    for (side, image_id), captions in combined.items():
        out = tokenized.get((side, image_id), [])
        if len(out) != len(captions):  # the tokenizer pairs lines with ids by position
            raise RuntimeError(
                f"PTB tokenizer returned {len(out)} line(s) for {len(captions)} caption(s) of "
                f"image id {image_id!r}"
            )
        (gts if side == "ref" else res)[image_id] = out
    return gts, res


_IDLE_METEOR: list[tuple[int, Any]] = []
"""METEOR JVMs of closed scorers, with the pid of the process that started each: the next scorer
of the same process takes one instead of starting its own (a new JVM spends seconds loading
METEOR's paraphrase table on its first call: ~7 s on 2 cores; later calls take a fraction of a
second). A JVM holds ~1.2 GB; the idle ones are stopped at exit (:func:`stop_idle_meteor`)."""


def _stop_meteor(meteor: Any) -> None:
    """Stop a METEOR JVM (pycocoevalcap only stops it in ``__del__``, which waits on a lock that
    a failed ``compute_score`` leaves held: a hang at garbage collection)."""
    if meteor.lock.locked():
        meteor.lock.release()
    proc: subprocess.Popen = meteor.meteor_p
    if proc.stdin is not None and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except OSError:
            pass
    proc.kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _take_meteor() -> Any:
    """An idle METEOR JVM this process started and that still runs, else a new one."""
    from pycocoevalcap.meteor.meteor import Meteor

    while _IDLE_METEOR:
        pid, meteor = _IDLE_METEOR.pop()
        if pid != os.getpid():  # inherited through a fork: its pipes belong to the parent
            continue
        if meteor.meteor_p.poll() is None:
            return meteor
        _stop_meteor(meteor)
    return Meteor()


def stop_idle_meteor() -> None:
    """Stop the METEOR JVMs kept for reuse by this process (registered to run at exit)."""
    while _IDLE_METEOR:
        pid, meteor = _IDLE_METEOR.pop()
        if pid == os.getpid():
            _stop_meteor(meteor)


atexit.register(stop_idle_meteor)


class CaptionScorer:
    """Scores caption sets with pycocoevalcap, keeping one METEOR JVM across calls.

    Use as a context manager (``with CaptionScorer() as scorer: scorer.score(...)``) or call
    :meth:`close`; the METEOR Java process is taken on first use (an idle one of this process,
    or a new one, which costs seconds) and handed back on close for the process's next scorer
    (stopped instead when a call failed; idle ones stop at exit).

    ``spice``: None = run SPICE when :func:`spice_available` (otherwise add a note), True = require
    it (SRDError when unavailable), False = never run it.
    """

    def __init__(self, spice: bool | None = None) -> None:
        require_java()
        available = spice_available()
        if spice is True and not available:
            raise SRDError(SPICE_SKIPPED_NOTE.replace("SPICE skipped", "SPICE requested", 1))
        self._use_spice = available if spice is None else spice
        self._spice_note = None if self._use_spice or spice is False else SPICE_SKIPPED_NOTE
        self._meteor: Any = None

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Hand the METEOR JVM back for this process's next scorer, if one was taken."""
        meteor, self._meteor = self._meteor, None
        if meteor is None:
            return
        if meteor.lock.locked() or meteor.meteor_p.poll() is not None:
            _stop_meteor(meteor)  # a call failed midway: its pipes may hold half an answer
        else:
            _IDLE_METEOR.append((os.getpid(), meteor))

    def _meteor_scores(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        if self._meteor is None:
            self._meteor = _take_meteor()
        try:
            score, scores = self._meteor.compute_score(gts, res)
        except (ValueError, OSError) as exc:
            proc = self._meteor.meteor_p
            detail = ""
            if proc.poll() is not None and proc.stderr is not None:
                detail = proc.stderr.read().decode(errors="replace").strip()[-500:]
            meteor, self._meteor = self._meteor, None
            _stop_meteor(meteor)
            raise RuntimeError(f"METEOR (Java) failed: {exc} {detail}".strip()) from exc
        return float(score), [float(s) for s in scores]

    def _spice_scores(self, gts: dict, res: dict) -> tuple[float, list[float]] | None:
        from pycocoevalcap.spice.spice import Spice

        try:
            score, scores = Spice().compute_score(gts, res)
        except (subprocess.CalledProcessError, OSError) as exc:
            logger.warning("SPICE failed, skipping it: %s", exc)
            return None
        return float(score), [float(s["All"]["f"]) for s in scores]

    def score(
        self, predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]
    ) -> CaptionScores:
        """Score ``predictions`` (image id -> caption) against ``references`` (id -> captions).

        References are restricted to the predicted ids; a predicted id without a reference is an
        SRDError. Empty predictions are allowed (they score 0).
        """
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        restricted = _check_inputs(predictions, references)
        gts, res = _tokenize(predictions, restricted)
        ids = list(gts)
        res = {i: res[i] for i in ids}  # same key order on both sides: per-image lists align
        notes: list[str] = []
        if len(ids) < 2:
            notes.append(
                "CIDEr is 0 by construction with a single image (its idf is computed over the "
                "evaluated images)"
            )
        scores: dict[str, float] = {}
        per_image: dict[str, dict[Any, float]] = {}

        def put(key: str, value: float, values: Sequence[float]) -> None:
            scores[key] = float(value)
            per_image[key] = {i: float(v) for i, v in zip(ids, values, strict=True)}

        bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            put(f"BLEU-{n + 1}", bleu[n], bleu_per_image[n])
        put("METEOR", *self._meteor_scores(gts, res))
        put("ROUGE-L", *Rouge().compute_score(gts, res))
        put("CIDEr", *Cider().compute_score(gts, res))
        if self._use_spice:
            spice = self._spice_scores(gts, res)
            if spice is None:
                notes.append("SPICE skipped: the SPICE Java scorer failed (see the log)")
            else:
                put(SPICE_KEY, *spice)
        elif self._spice_note:
            notes.append(self._spice_note)
        return CaptionScores(scores=scores, per_image=per_image, notes=notes)


def caption_scores(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    spice: bool | None = None,
) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L, CIDEr (+SPICE when available) of ``predictions``.

    One-shot convenience over :class:`CaptionScorer`; use the class to score several sets, or to
    get per-image values and notes.
    """
    with CaptionScorer(spice=spice) as scorer:
        return scorer.score(predictions, references).scores


def per_image_cider(
    predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]
) -> dict[Any, float]:
    """CIDEr of each predicted image id (idf over all the predicted images)."""
    with CaptionScorer(spice=False) as scorer:
        return scorer.score(predictions, references).per_image["CIDEr"]


# ---------------------------------------------------------------------------------------------
# Target word rates (ASR and false-trigger rate)
# ---------------------------------------------------------------------------------------------


def contains_target(caption: str, target: str, rule: str = "substring") -> bool:
    """Whether ``caption`` mentions ``target`` (or its plural ``target + "s"``).

    ``substring`` is the reference's test: case-sensitive substring, so "bananas" and
    "bananarama" match and "Banana" does not. ``word`` is case-insensitive on whole words
    (:func:`srd.captions.words`), so "Banana" and "bananas" match and "bananarama" does not; a
    multi-word target must appear as consecutive words (plural on its last word).
    """
    if not target:
        raise SRDError("target word is empty (--target_label)")
    if rule == "substring":
        # target+"s" is implied by target; kept to mirror the reference's two-pattern test.
        return target in caption or target + "s" in caption
    if rule == "word":
        target_words = words(target)
        if not target_words:
            raise SRDError(f"target {target!r} has no letters or digits (--target_label)")
        tokens = words(caption)
        n = len(target_words)
        head, last = target_words[:-1], target_words[-1]
        for start in range(len(tokens) - n + 1):
            window = tokens[start : start + n]
            if window[:-1] == head and window[-1] in (last, last + "s"):
                return True
        return False
    raise SRDError(f"unknown ASR rule {rule!r}: choose one of {', '.join(ASR_RULES)}")


def unique_predictions(pairs: Mapping[Any, str] | Iterable[tuple[Any, str]]) -> dict[Any, str]:
    """Image id -> caption, de-duplicating (id, caption) pairs.

    Distributed generation pads the last batch with repeated images, so the same id can arrive
    twice; repeats must carry the same caption (a conflict is an SRDError, since it is unclear
    which one to count).
    """
    if isinstance(pairs, Mapping):
        return dict(pairs)
    out: dict[Any, str] = {}
    for image_id, caption in pairs:
        if image_id in out and out[image_id] != caption:
            raise SRDError(
                f"image id {image_id!r} has two different predictions: "
                f"{out[image_id]!r} and {caption!r}"
            )
        out[image_id] = caption
    return out


def attack_success_rate(
    predictions: Mapping[Any, str] | Iterable[tuple[Any, str]],
    target: str,
    rule: str = "substring",
) -> float:
    """Share (0..1) of unique image ids whose caption contains ``target`` under ``rule``.

    Numerator and denominator both count unique ids (fixing reference bug B20). On triggered
    images this is the ASR; on clean images it is the false-trigger rate.
    """
    unique = unique_predictions(predictions)
    if not unique:
        raise SRDError("attack success rate: no predictions")
    hits = sum(contains_target(caption, target, rule) for caption in unique.values())
    return hits / len(unique)


def target_rates(
    clean: Mapping[Any, str] | Iterable[tuple[Any, str]],
    triggered: Mapping[Any, str] | Iterable[tuple[Any, str]] | None,
    target: str,
) -> dict[str, float | None]:
    """The rate entries of a result JSON's ``metrics``: ASR per rule (None without triggered
    predictions) and false-trigger rate per rule on clean images."""
    out: dict[str, float | None] = {}
    for rule in ASR_RULES:
        out[f"asr_{rule}"] = (
            None if triggered is None else attack_success_rate(triggered, target, rule)
        )
    for rule in ASR_RULES:
        out[f"false_trigger_{rule}"] = attack_success_rate(clean, target, rule)
    return out


__all__ = [
    "ASR_RULES",
    "METRIC_KEYS",
    "SPICE_KEY",
    "SPICE_SKIPPED_NOTE",
    "CaptionScorer",
    "CaptionScores",
    "attack_success_rate",
    "caption_scores",
    "contains_target",
    "per_image_cider",
    "require_java",
    "spice_available",
    "stop_idle_meteor",
    "target_rates",
    "unique_predictions",
]
