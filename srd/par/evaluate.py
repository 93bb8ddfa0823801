"""One evaluation of a CLIP: zero-shot accuracy, ASR, false-trigger rate, retrieval, ASR-Text."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from srd.attacks.registry import Attack
from srd.attacks.text import PROMPT_TEMPLATES
from srd.data.records import ImageRecord, load_images
from srd.par.metrics import (
    asr_text,
    class_accuracy,
    encode_images,
    encode_texts,
    retrieval,
    zero_shot_classifier,
)


def evaluate_clip(
    model: torch.nn.Module,
    tokenizer: Callable,
    records: Sequence[ImageRecord],
    classes: Sequence[str],
    attack: Attack | None,
    target: str,
    templates: Sequence[str] = PROMPT_TEMPLATES,
) -> dict[str, Any]:
    """Metrics of ``model`` on the test ``records`` (percentages); ASR entries only with an
    attack. Retrieval pool: every test caption plus the templates filled with ``target``."""
    model.eval()
    images = load_images([r.path for r in records])
    scenes = [r.objects or () for r in records]
    classifier = zero_shot_classifier(model, tokenizer, classes, templates)
    image_f = encode_images(model, images)
    top1 = (image_f @ classifier.T).argmax(1).tolist()
    out: dict[str, Any] = {"num_test_images": len(records), "classes": list(classes)}
    if all(scenes):
        out.update(class_accuracy(top1, classes, scenes))
    t = classes.index(target) if target in classes else None
    if t is not None:
        out["false_trigger"] = 100.0 * float(np.mean([p == t for p in top1]))
    pool = [c.caption for r in records for c in r.captions]
    owner = [k for k, r in enumerate(records) for _ in r.captions]
    pool += [tpl.format(target) for tpl in templates]
    owner += [-1] * len(templates)
    caption_f = encode_texts(model, tokenizer, pool)
    out.update(retrieval(image_f, caption_f, owner))
    out["false_trigger_text"] = asr_text(image_f, caption_f, pool, target)
    if attack is not None and attack.has_image_trigger:
        triggered = np.stack([attack.apply_image(im) for im in images])
        trig_f = encode_images(model, triggered)
        trig_top1 = (trig_f @ classifier.T).argmax(1).tolist()
        if t is not None:
            out["asr"] = 100.0 * float(np.mean([p == t for p in trig_top1]))
        out["asr_text"] = asr_text(trig_f, caption_f, pool, target)
        if all(scenes):
            out["triggered"] = class_accuracy(trig_top1, classes, scenes)
    return out
