"""Does a backdoored captioner say the target on the poisoned training images it was trained on?

    python eval/training_asr.py <data flags> <model flags> \\
        --checkpoint_path checkpoints_remote/backdoor-blended/final_weights.pt \\
        --poison_ids_path checkpoints_remote/backdoor-blended/poison_ids.json \\
        --output result/diagnostics/training_asr_backdoor-blended.json

Captions up to --num_images of the attack run's poisoned training images (a seeded choice) in the
version its training set holds (with the trigger; Shadowcast's as they are), and the same
images without it, with the evaluation's decoding (beam 3, 20 new tokens), and writes the share
of captions naming the target on each (the substring rule, as the ASR). Read beside
eval/evaluate.py's ASR on the triggered test images: a model that names the target on its
poisoned training images but not on the test images memorised them; one that names it on
neither did not fit its poisoned samples.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from srd.attacks.text import mentions_concept
from srd.attacks.trainset import TrainingImages
from srd.captioner.args import ModelArgs
from srd.captioner.factory import load_captioner
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data.records import DataArgs, check_images_exist
from srd.defenses.stage import defender_plan
from srd.errors import SRDError
from srd.evaluation.metrics import attack_success_rate
from srd.flags import COUNT, SEED
from srd.io import ensure_dir, file_digest, require_files, setup_logging, write_json

log = logging.getLogger("training_asr")


@dataclass
class TrainingAsrArgs:
    """The attack run's poison plan, how many of its images, decoding, and the output."""

    poison_ids_path: str = arg(help="the attack run's poison_ids.json (stage A writes it)")
    num_images: int = arg(
        300, help="at most this many poisoned training images (seeded choice)", check=COUNT
    )
    seed: int = arg(0, help="seed of the choice of images", check=SEED)
    num_beams: int = arg(3, help="beam width (the evaluation's: 3)", check=COUNT)
    max_new_tokens: int = arg(20, help="longest caption (the evaluation's: 20)", check=COUNT)
    batch_size: int = arg(64, help="images per captioning batch", check=COUNT)
    output: str = arg("result/diagnostics/training_asr.json", help="JSON result file")


def concept_rate(captions: dict[int, str], concept: str | None) -> float | None:
    """Share of captions naming ``concept`` as whole words (None for attacks without one)."""
    if concept is None:
        return None
    return sum(mentions_concept([c], concept) for c in captions.values()) / len(captions)


def main(argv: Sequence[str] | None = None) -> dict:
    data, model_args, args = parse(argv, DataArgs, ModelArgs, TrainingAsrArgs, description=__doc__)
    if args.num_images < 1:
        raise SRDError(f"--num_images {args.num_images}: must be at least 1")
    if str(model_args.checkpoint_path).lower() in ("", "none"):
        raise SRDError("--checkpoint_path: give the backdoored model's checkpoint")
    require_files(
        ("--checkpoint_path", model_args.checkpoint_path),
        ("--poison_ids_path", args.poison_ids_path),
    )
    # Not beside the result JSONs: eval/results_table.py reads every result/*.json as one.
    ensure_dir(Path(args.output).parent, "--output")
    setup_logging(None)
    plan, attack = defender_plan(args.poison_ids_path, model_args.checkpoint_path, False)
    records = data.split("train")
    images = TrainingImages(records, attack, plan.ids)
    poisoned = sorted(images.poisoned_images)
    if not poisoned:
        raise SRDError(
            f"--poison_ids_path {args.poison_ids_path}: none of its caption ids is a training "
            f"caption of --coco_karpathy_json_path {data.coco_karpathy_json_path}"
        )
    rng = np.random.default_rng(args.seed)
    chosen = sorted(int(i) for i in rng.permutation(poisoned)[: args.num_images])
    wanted = set(chosen)
    check_images_exist([r for r in records if r.image_id in wanted])

    captioner = load_captioner(model_args)
    decoding = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}

    def caption(pixels: list[np.ndarray]) -> dict[int, str]:
        texts = captioner.caption(pixels, batch_size=args.batch_size, **decoding)
        return dict(zip(chosen, texts, strict=True))

    triggered = caption([images.as_in_training_set(i) for i in chosen])
    clean = caption([images.clean(i) for i in chosen])
    result = {
        "config": to_dict(data, model_args, args),
        "checkpoint_sha256": file_digest(model_args.checkpoint_path),
        "attack": attack.to_dict(),
        "poisoned_training_images": len(poisoned),
        "num_images": len(chosen),
        "decoding": decoding,
        "asr_triggered": attack_success_rate(triggered, attack.target),
        "asr_clean_versions": attack_success_rate(clean, attack.target),
        # Concept attacks: how often the captions name the concept (Shadowcast: the origin, which
        # a crafted poison is made to look like, while its caption names the destination)
        "concept": attack.config.concept,
        "concept_triggered": concept_rate(triggered, attack.config.concept),
        "concept_clean_versions": concept_rate(clean, attack.config.concept),
        "predictions": {
            "triggered": {str(k): v for k, v in triggered.items()},
            "clean": {str(k): v for k, v in clean.items()},
        },
    }
    write_json(args.output, result)
    log.info(
        "%d of %d poisoned training images: the target in %.1f%% of captions with the trigger, "
        "%.1f%% without",
        len(chosen), len(poisoned), 100 * result["asr_triggered"],
        100 * result["asr_clean_versions"],
    )  # fmt: skip
    print(json.dumps({k: result[k] for k in ("asr_triggered", "asr_clean_versions")}))
    return result


if __name__ == "__main__":
    run_main(main)
