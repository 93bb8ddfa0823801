"""CLIP evaluation: zero-shot top-1 over the benchmark's "colour shape" classes + the target
(80 templates averaged per class), colour-only and shape-only accuracy, ASR (triggered test images
whose top-1 is the target), false-trigger rate, image->text R@1/R@5 and ASR-Text.

    python eval/clip_evaluate.py --run_dir checkpoints_remote/par/badnet/poisoned \
        --bd_attack_type badnet

Reads clip.safetensors from --run_dir (a finished run) and writes metrics.json there (or into
--out_dir), then DONE_EVAL. The attack is rebuilt from the registry with the same flags.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from srd.attacks import AttackArgs
from srd.captions import DEFAULT_TARGET
from srd.cli import run_main
from srd.clip import CLIP_CONFIG, CLIP_WEIGHTS, load_clip, model_config
from srd.config import arg, parse, to_dict
from srd.data import DataArgs, check_images_exist
from srd.errors import SRDError
from srd.io import is_finished, setup_logging, write_json, write_text
from srd.par.evaluate import evaluate_clip
from srd.par.metrics import parse_classes

log = logging.getLogger("clip_evaluate")

MARKER = "DONE_EVAL"


@dataclass
class ClipEvalArgs:
    """Which CLIP to evaluate, on which classes."""

    run_dir: str = arg(help="finished CLIP run folder holding clip.safetensors")
    clip_model: str = arg(CLIP_CONFIG, help="open_clip config the weights were trained with")
    classes: str | None = arg(
        None, help="comma-separated class names (default: the 18 'colour shape' + target)"
    )
    split: str = arg("test", help="Karpathy split to evaluate on")


def main(argv: Sequence[str] | None = None) -> dict:
    data, attack_args, args = parse(argv, DataArgs, AttackArgs, ClipEvalArgs, description=__doc__)
    model_config(args.clip_model)
    attack = attack_args.build()
    # the attack's own target (its YAML, or --target_label); without an attack, the default
    target = attack.target if attack is not None else (attack_args.target_label or DEFAULT_TARGET)
    classes = parse_classes(args.classes, target, need_target=attack is not None)
    run_dir = Path(args.run_dir)
    if not is_finished(run_dir):
        raise SRDError(f"--run_dir {run_dir}: not a finished run (no DONE)")
    model, tokenizer = load_clip(args.clip_model, run_dir / CLIP_WEIGHTS, "--run_dir")
    records = data.split(args.split)
    check_images_exist(records)
    setup_logging(run_dir / "eval.log")
    start = time.time()
    metrics = evaluate_clip(model, tokenizer, records, classes, attack, target)
    metrics["config"] = to_dict(data, attack_args, args)
    metrics["attack"] = None if attack is None else attack.to_dict()
    metrics["wall_seconds"] = round(time.time() - start, 1)
    write_json(run_dir / "metrics.json", metrics)
    write_text(run_dir / MARKER, "done\n")
    log.info(
        "%s: top1 %.1f colour %.1f shape %.1f | ASR %s | false trigger %s | R@1 %.1f R@5 %.1f",
        run_dir,
        metrics.get("top1", float("nan")),
        metrics.get("colour", float("nan")),
        metrics.get("shape", float("nan")),
        metrics.get("asr"),
        metrics.get("false_trigger"),
        metrics["R@1"],
        metrics["R@5"],
    )
    return metrics


if __name__ == "__main__":
    run_main(main)
