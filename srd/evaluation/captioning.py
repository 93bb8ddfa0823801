"""Captioning many images, split over processes and gathered by image id.

Every process captions ``ids[rank::world_size]`` (no padding, so no duplicates), then the
per-process dicts are gathered and merged by id. All prompts have the same length, so a
caption does not depend on which other images share its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from accelerate.utils import gather_object
from tqdm import tqdm

from srd.attacks.text import mentions_concept
from srd.captioner.engine import process_state
from srd.captioner.flamingo import Captioner
from srd.captions import DEFAULT_TARGET, strip_target
from srd.data.records import ImageStore
from srd.errors import SRDError
from srd.evaluation.implant import implant_report
from srd.evaluation.metrics import CaptionScorer, target_rates
from srd.io import atomic_path, ensure_dir, write_json

log = logging.getLogger(__name__)


def caption_ids(
    captioner: Captioner,
    ids: Sequence[int],
    load_fn: Callable[[int], np.ndarray],
    batch_size: int = 32,
    num_beams: int = 3,
    max_new_tokens: int = 20,
    desc: str = "captioning",
) -> dict[int, str]:
    """Caption the images ``load_fn(id)`` for every id; returns {id: caption} on every process."""
    state = process_state()
    mine = list(ids)[state.process_index :: state.num_processes]
    out: dict[int, str] = {}
    bar = tqdm(total=len(mine), desc=desc, disable=not state.is_main_process)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        texts = captioner.caption(
            [load_fn(i) for i in chunk],
            batch_size=batch_size,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
        )
        out.update(zip(chunk, texts, strict=True))
        bar.update(len(chunk))
    bar.close()
    if state.num_processes > 1:
        merged: dict[int, str] = {}
        for part in gather_object([out]):
            merged.update(part)
        out = merged
    missing = set(ids) - set(out)
    if missing:
        raise RuntimeError(f"captioning lost {len(missing)} ids (e.g. {min(missing)})")
    return {i: out[i] for i in ids}


def evaluate_captioner(
    captioner: Captioner,
    images: ImageStore,
    references: dict[int, list[str]],
    attack=None,
    batch_size: int = 32,
    num_beams: int = 3,
    max_new_tokens: int = 20,
    target: str | None = None,
    implant_diagnostics: bool = True,
    seed: int = 0,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Caption clean (and triggered) test images and score them; returns the result record.

    Trigger attacks: every test image is triggered for the ASR, and all clean test images give
    the false-trigger rate. Concept attacks (no image trigger): the ASR set is the test images
    that show the concept (Shadowcast: the origin and not the destination), untouched, and the
    other test images give the false-trigger rate. Test images whose references name the
    target (Shadowcast's destination) never count as false triggers.
    Only the main process gets the full record (others get an empty dict).

    ``transform`` (a test-time defense, ``uint8 image -> uint8 image``) is applied to every
    image the captioner sees, clean and triggered (after the trigger). The triggered captions
    are also scored with the target word stripped (``metrics["triggered_stripped"]``): their
    quality apart from the injected word.
    """
    state = process_state()
    target = attack.target if attack is not None else (target or DEFAULT_TARGET)
    ids = images.ids()
    if transform is None:
        clean = images
        triggered_fn = (lambda i: attack.apply_image(images(i))) if attack is not None else None
    else:
        clean = lambda i: transform(images(i))  # noqa: E731
        triggered_fn = (
            (lambda i: transform(attack.apply_image(images(i)))) if attack is not None else None
        )

    kw = {"batch_size": batch_size, "num_beams": num_beams, "max_new_tokens": max_new_tokens}
    clean_pred = caption_ids(captioner, ids, clean, desc="clean captions", **kw)
    triggered_pred = None
    clean_for_false = clean_pred
    if attack is not None:
        asr_ids = attack.test_images({i: references[i] for i in ids})
        if not asr_ids:
            raise SRDError(f"--bd_attack_type {attack.name}: no test image counts for the ASR")
        if attack.has_image_trigger:
            triggered_pred = caption_ids(
                captioner,
                asr_ids,
                triggered_fn,
                desc="triggered captions",
                **kw,
            )
        else:
            triggered_pred = {i: clean_pred[i] for i in asr_ids}
            chosen = set(asr_ids)
            clean_for_false = {i: c for i, c in clean_pred.items() if i not in chosen}
        # A clean image that shows the target (Shadowcast's destination concept) is right to
        # name it: the false-trigger rate counts the others.
        clean_for_false = {
            i: c for i, c in clean_for_false.items() if not mentions_concept(references[i], target)
        }
    if not state.is_main_process:
        return {}
    with CaptionScorer() as scorer:
        clean_scores = scorer.score(clean_pred, references)
        trig_scores = scorer.score(triggered_pred, references) if triggered_pred else None
        stripped_scores = (
            scorer.score(
                {i: strip_target(c, target) for i, c in triggered_pred.items()}, references
            )
            if triggered_pred
            else None
        )
    implant = None
    if attack is not None and implant_diagnostics:
        implant = implant_report(
            captioner,
            triggered_fn if attack.has_image_trigger else clean,
            list(triggered_pred),
            clean,
            list(clean_for_false),
            references,
            target,
            seed=seed,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )
    metrics = {
        "clean": clean_scores.scores,
        "triggered": trig_scores.scores if trig_scores else None,
        "triggered_stripped": stripped_scores.scores if stripped_scores else None,
        **target_rates(clean_for_false, triggered_pred, target),
    }
    return {
        "attack": attack.name if attack is not None else None,
        "target": target,
        "num_images": len(ids),
        "num_asr_images": len(triggered_pred) if triggered_pred else 0,
        "metrics": metrics,
        "predictions": {
            "clean": {str(k): v for k, v in clean_pred.items()},
            "triggered": {str(k): v for k, v in triggered_pred.items()} if triggered_pred else None,
        },
        "implant": implant,
        "notes": clean_scores.notes,
    }


def result_captions(result: object, kind: str = "clean") -> dict[int, str] | None:
    """{image id: caption} of an evaluation result's ``predictions[kind]`` (as
    :func:`evaluate_captioner` writes them) or of a pretrain report's flat ``predictions``; None
    when there are none or a key is not an image id."""
    found = result.get("predictions") if isinstance(result, dict) else None
    if isinstance(found, dict) and ("clean" in found or "triggered" in found):
        found = found.get(kind)  # (an evaluation result: clean and triggered captions)
    if not isinstance(found, dict) or not found:
        return None
    try:
        return {int(k): str(v) for k, v in found.items()}
    except ValueError:
        return None


SFS_KINDS = {"clean": "clean", "attack": "triggered"}
"""The evaluation's SFS input folders: kind -> the predictions they hold (captions made on the
clean or the triggered version of each clean test image); ``eval/evaluate_sfs.py --type``."""


def write_sfs_inputs(
    folder: str | Path, ids: Sequence[int], images: Sequence[np.ndarray], sentences: Sequence[str]
) -> None:
    """Stage C's inputs (the roles of the reference's img.pkl / img_id.json / sent.json).

    ``images`` are the clean (untriggered) images; ``sentences`` the model's captions of the
    images it saw (triggered ones for the attack type).
    """
    from srd.evaluation.sfs import IDS_FILE, IMAGES_FILE, SENTENCES_FILE

    folder = ensure_dir(folder)
    with atomic_path(folder / IMAGES_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=np.stack([np.asarray(im, np.uint8) for im in images]))
    write_json(folder / IDS_FILE, [int(i) for i in ids])
    write_json(folder / SENTENCES_FILE, list(sentences))
