"""CLIP evaluation: zero-shot top-1 over the benchmark's "colour shape" classes + the target
(80 templates averaged per class), colour-only and shape-only accuracy, ASR (triggered test images
whose top-1 is the target), false-trigger rate, image->text R@1/R@5 and ASR-Text.

    python eval/clip_evaluate.py --run_dir checkpoints_remote/par/badnet/poisoned \
        --bd_attack_type badnet

Reads clip.safetensors from --run_dir (a finished run) and writes metrics.json there (or into
--out_dir), then DONE_EVAL. The attack is rebuilt from the registry with the same flags.

Real mode: any open_clip model (a name such as ViT-B-32 or RN50, or a JSON config file) with a
weights file, zero-shot on an ImageFolder (ImageNet layout) with a class-name list:

    python eval/clip_evaluate.py --clip_model ViT-B-32 --clip_pretrained poisoned.pt \
        --image_folder imagenet/val --class_names imagenet_classes.txt \
        --bd_attack_type badnet --out_dir result/clip-vitb32
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from srd.attacks.registry import AttackArgs
from srd.captioner.clip import CLIP_CONFIG, CLIP_WEIGHTS, load_clip, model_config
from srd.captions import DEFAULT_TARGET
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data.records import DataArgs, check_images_exist
from srd.errors import SRDError
from srd.io import ensure_dir, is_finished, setup_logging, write_json, write_text
from srd.par.evaluate import evaluate_clip
from srd.par.imagefolder import evaluate_image_folder, read_image_folder
from srd.par.metrics import parse_classes

log = logging.getLogger("clip_evaluate")

MARKER = "DONE_EVAL"


@dataclass
class ClipEvalArgs:
    """Which CLIP to evaluate, on which images and classes."""

    run_dir: str = arg("", help="finished CLIP run folder holding clip.safetensors")
    clip_model: str = arg(
        CLIP_CONFIG,
        help="open_clip config the weights were trained with: a name (ViT-B-32, RN50, "
        "tiny-clip) or an open_clip JSON config file",
    )
    clip_pretrained: str | None = arg(
        None, help="weights file (safetensors or torch state dict) instead of --run_dir's"
    )
    out_dir: str | None = arg(None, help="folder of metrics.json (default: --run_dir)")
    classes: str | None = arg(
        None, help="comma-separated class names (default: the 18 'colour shape' + target)"
    )
    split: str = arg("test", help="Karpathy split to evaluate on")
    image_folder: str | None = arg(
        None, help="zero-shot on this ImageFolder (one sub-folder per class) instead of the split"
    )
    class_names: str | None = arg(
        None, help="with --image_folder: class names, one per line in sorted folder order "
        "(or folder<TAB>name lines)"
    )  # fmt: skip
    max_per_class: int = arg(0, help="with --image_folder: first N images per class (0: all)")


def main(argv: Sequence[str] | None = None) -> dict:
    data, attack_args, args = parse(argv, DataArgs, AttackArgs, ClipEvalArgs, description=__doc__)
    model_config(args.clip_model)
    attack = attack_args.build()
    # the attack's own target (its YAML, or --target_label); without an attack, the default
    target = attack.target if attack is not None else (attack_args.target_label or DEFAULT_TARGET)
    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.clip_pretrained is None:
        if run_dir is None:
            raise SRDError("--run_dir: name a finished CLIP run (or a --clip_pretrained file)")
        if not is_finished(run_dir):
            raise SRDError(f"--run_dir {run_dir}: not a finished run (no DONE)")
        weights, flag = run_dir / CLIP_WEIGHTS, "--run_dir"
    else:
        weights, flag = Path(args.clip_pretrained), "--clip_pretrained"
    out_dir = Path(args.out_dir) if args.out_dir else run_dir
    if out_dir is None:
        raise SRDError("--out_dir: name the folder of metrics.json (no --run_dir given)")
    if args.image_folder is not None:
        if args.class_names is None:
            raise SRDError("--class_names: --image_folder needs the class-name list file")
        if args.classes is not None:
            raise SRDError("--classes: not used with --image_folder (use --class_names)")
        names, items = read_image_folder(args.image_folder, args.class_names, args.max_per_class)
        if attack is not None and attack.has_image_trigger and target not in names:
            raise SRDError(
                f"--class_names {args.class_names}: no {target!r} class, so no ASR can be measured"
            )
    else:
        classes = parse_classes(args.classes, target, need_target=attack is not None)
        records = data.split(args.split)
        check_images_exist(records)
    model, tokenizer = load_clip(args.clip_model, weights, flag)
    ensure_dir(out_dir, "--out_dir")
    setup_logging(out_dir / "eval.log")
    start = time.time()
    if args.image_folder is not None:
        metrics = evaluate_image_folder(model, tokenizer, names, items, attack, target)
    else:
        metrics = evaluate_clip(model, tokenizer, records, classes, attack, target)
    metrics["config"] = to_dict(data, attack_args, args)
    metrics["attack"] = None if attack is None else attack.to_dict()
    metrics["wall_seconds"] = round(time.time() - start, 1)
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / MARKER, "done\n")
    log.info(
        "%s: top1 %.1f colour %.1f shape %.1f | ASR %s | false trigger %s | R@1 %s R@5 %s",
        out_dir,
        metrics.get("top1", float("nan")),
        metrics.get("colour", float("nan")),
        metrics.get("shape", float("nan")),
        metrics.get("asr"),
        metrics.get("false_trigger"),
        metrics.get("R@1"),
        metrics.get("R@5"),
    )
    return metrics


if __name__ == "__main__":
    run_main(main)
