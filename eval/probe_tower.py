"""Linear probe of a frozen vision tower: can colour and shape be read off its tokens?

    python eval/probe_tower.py                                    # the clean captioner's tower
    python eval/probe_tower.py --vision_encoder_pretrained none      # a random tower: the floor

Encodes the benchmark's single-object training (at most --probe_train_images) and test images
with the tower exactly as the captioner reads it (``srd.captioner.vision.tower_tokens``), fits one
linear probe per attribute (``srd.evaluation.probe``) and writes train/test accuracy and chance to
--output. A randomly initialised tower (seed 0) gives the floor. ``--trigger_shift badnet blended
...`` also measures how far each attack's trigger moves the tokens of the test images, and whether a
linear probe tells triggered from clean images, on the pooled tokens and on every token
(``srd.evaluation.probe.trigger_detection``: fitted on the first --probe_train_images training
images, any object count, scored on all test images).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from srd.attacks.registry import build_attack
from srd.captioner.vision import build_vision_encoder, images_to_vision_x, tower_tokens
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data.records import DataArgs, check_images_exist, load_images
from srd.data.scenes import COLOURS, SHAPES
from srd.errors import SRDError
from srd.evaluation.probe import (
    FEATURES,
    pooled_tokens,
    probe_attributes,
    token_features,
    trigger_detection,
    trigger_shift,
)
from srd.flags import COUNT
from srd.io import ensure_dir, write_json

log = logging.getLogger("probe_tower")


@dataclass
class ProbeArgs:
    """The tower to probe and where the result goes."""

    vision_encoder_path: str = arg("tiny-clip", help="open_clip config of the tower")
    vision_encoder_pretrained: str = arg(
        "checkpoints_remote/embedded/clean/vision.safetensors",
        help="tower weights (a captioner's vision.safetensors or a whole CLIP); 'none' = random",
    )
    vision_tokens: str = arg("pre_ln", help="ViT towers: tokens before or after ln_post",
                             choices=["pre_ln", "post_ln"])  # fmt: skip
    probe_train_images: int = arg(
        1000, help="at most this many single-object training images", check=COUNT
    )
    trigger_shift: list[str] = arg(
        [],
        help="attacks (image triggers) whose feature shift on the test images to measure: "
        "distance clean -> triggered tokens over the distance between two clean images",
    )
    output: str = arg("result/diagnostics/tower_probe.json", help="JSON result file (written last)")


def single_objects(records: Sequence, limit: int | None = None) -> list:
    chosen = [r for r in records if r.objects and len(r.objects) == 1]
    return chosen[:limit] if limit is not None else chosen


def attributes(records: Sequence) -> list[dict[str, str]]:
    return [{"colour": r.objects[0].colour, "shape": r.objects[0].shape} for r in records]


def main(argv: Sequence[str] | None = None) -> dict:
    data, args = parse(argv, DataArgs, ProbeArgs, description=__doc__)
    train = single_objects(data.split("train"), args.probe_train_images)
    test = single_objects(data.split("test"))
    if not train or not test:
        raise SRDError(
            f"--coco_karpathy_json_path {data.coco_karpathy_json_path}: no single-object images "
            "with scene annotations in the train and test splits (the probe needs the benchmark)"
        )
    detect = data.split("train")[: args.probe_train_images] if args.trigger_shift else []
    check_images_exist(train + test + detect)
    # Not beside the result JSONs: eval/results_table.py reads every result/*.json as one.
    ensure_dir(Path(args.output).parent, "--output")
    trigger_attacks = [build_attack(name) for name in args.trigger_shift]
    for name, attack in zip(args.trigger_shift, trigger_attacks, strict=True):
        if not attack.has_image_trigger:
            raise SRDError(f"--trigger_shift {name}: the attack has no image trigger")
    torch.manual_seed(0)
    visual, transform, _ = build_vision_encoder(
        args.vision_encoder_path, args.vision_encoder_pretrained, args.vision_tokens
    )
    visual.eval()

    def encode(images: np.ndarray) -> torch.Tensor:
        return tower_tokens(visual, images_to_vision_x(images, transform).flatten(0, 2))

    shifts, detection = {}, {}
    if trigger_attacks:  # the images and their clean features, once for every attack
        pixels = load_images([r.path for r in data.split("test")])
        detect_pixels = load_images([r.path for r in detect])
        clean_train = token_features(encode, detect_pixels)
        clean_test = token_features(encode, pixels)
    for name, attack in zip(args.trigger_shift, trigger_attacks, strict=True):
        moved_test = token_features(encode, np.stack([attack.apply_image(im) for im in pixels]))
        moved_train = token_features(
            encode, np.stack([attack.apply_image(im) for im in detect_pixels])
        )
        shifts[name] = trigger_shift(clean_test["tokens"], moved_test["tokens"])
        detection[name] = {
            kind: trigger_detection(
                clean_train[kind], moved_train[kind], clean_test[kind], moved_test[kind]
            )
            for kind in FEATURES
        }
        log.info("%s trigger shift: %.3f of the distance between two images; a linear probe "
                 "tells triggered from clean test images at %.1f%% (pooled tokens), %.1f%% "
                 "(every token)", name, shifts[name]["ratio"],
                 100 * detection[name]["pooled"]["test_accuracy"],
                 100 * detection[name]["tokens"]["test_accuracy"])  # fmt: skip

    labels = {"colour": list(COLOURS), "shape": list(SHAPES)}
    result = {
        "config": to_dict(data, args),
        "num_train_images": len(train),
        "num_test_images": len(test),
        "probe": probe_attributes(
            pooled_tokens(encode, load_images([r.path for r in train])),
            attributes(train),
            pooled_tokens(encode, load_images([r.path for r in test])),
            attributes(test),
            labels,
        ),
    }
    if shifts:
        result["trigger_shift"] = shifts
        result["trigger_detection"] = detection
    write_json(args.output, result)
    for name, res in result["probe"].items():
        accs = (100 * res[k] for k in ("test_accuracy", "train_accuracy", "chance"))
        log.info("%s: test %.1f%% (train %.1f%%, chance %.1f%%)", name, *accs)
    print(json.dumps({k: v["test_accuracy"] for k, v in result["probe"].items()}))
    return result


if __name__ == "__main__":
    run_main(main)
