"""Pretrain stage, part 1 (embedded default only): the tiny CLIP whose image tower the captioner
freezes, trained contrastively on the benchmark's image-caption pairs.

    python train/pretrain_clip.py <data flags> --run_name embedded/clip

Writes ``clip.safetensors`` (an open_clip state dict) and ``open_clip_config.json`` into the run
folder, plus ``clip_report.json`` (loss and zero-shot colour/shape accuracy on the single-object
test images per epoch, and before training) and ``DONE`` last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from srd.captioner.clip import (
    ClipTrainArgs,
    create_clip,
    save_clip,
    train_clip,
    zero_shot_attributes,
)
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data.records import DataArgs, check_images_exist, load_images
from srd.flags import SEED
from srd.io import mark_finished, prepare_run_dir, setup_logging, write_json
from srd.runs import check_run_name

log = logging.getLogger("pretrain_clip")

REPORT = "clip_report.json"


@dataclass
class ClipRunArgs:
    """Run folder and seed."""

    run_name: str = arg("embedded/clip", help="run folder name under --external_save_dir")
    external_save_dir: str = arg("checkpoints_remote", help="folder holding run folders")
    seed: int = arg(0, help="seed of the initialisation, batches and caption choice", check=SEED)
    clip_shape_twins: bool = arg(
        True,
        help="minimal-pair batches (ours): half of each batch are training images, the other "
        "half their shape twins (the same render with every object's shape changed, drawn anew "
        "each epoch) with captions rewritten to match, so only shape tells a pair apart; needs "
        "the embedded benchmark's scenes and doubles an epoch's images. Without it the tower "
        "learns colour but not shape (README)",
    )
    overwrite: bool = arg(False, help="redo a finished run")


def main(argv: Sequence[str] | None = None) -> dict:
    data, clip_args, run = parse(argv, DataArgs, ClipTrainArgs, ClipRunArgs, description=__doc__)
    clip_args.validate()
    train_records = data.split("train")
    test_records = data.split("test")
    check_images_exist(train_records + test_records)
    run_dir = prepare_run_dir(
        f"{run.external_save_dir}/{check_run_name(run.run_name, '--run_name')}",
        run.overwrite,
        "--run_name",
    )
    setup_logging(run_dir / "train.log")
    start = time.time()
    images = load_images([r.path for r in train_records])
    test_images = load_images([r.path for r in test_records])
    scenes = [r.objects or () for r in test_records]
    model, tokenizer = create_clip(clip_args.clip_model, run.seed)
    before = zero_shot_attributes(model, tokenizer, test_images, scenes)
    probes = [before]  # after the last epoch, probes[-1] is the trained model's

    def probe_epoch(entry: dict) -> None:  # the zero-shot curve: when does shape emerge?
        accuracy = zero_shot_attributes(model, tokenizer, test_images, scenes)
        probes.append(accuracy)
        model.train()
        entry["zero_shot"] = {k: accuracy[k] for k in ("colour", "shape", "pair")}
        log.info("zero-shot colour %.3f, shape %.3f", accuracy["colour"], accuracy["shape"])

    history = train_clip(
        model,
        tokenizer,
        images,
        [[c.caption for c in r.captions] for r in train_records],
        clip_args,
        seed=run.seed,
        twin_scenes=[r.objects for r in train_records] if run.clip_shape_twins else None,
        on_epoch=probe_epoch,
    )
    after = probes[-1]
    weights = save_clip(model, clip_args.clip_model, run_dir)
    report = {
        "config": to_dict(data, clip_args, run),
        "weights": str(weights),
        "history": history,
        "zero_shot_untrained": before,
        "zero_shot": after,
        "wall_seconds": round(time.time() - start, 1),
    }
    write_json(run_dir / REPORT, report)
    mark_finished(run_dir)
    log.info(
        "tiny CLIP: zero-shot colour %.1f%%, shape %.1f%%, pair %.1f%% on %d single-object test "
        "images (untrained: %.1f%% / %.1f%% / %.1f%%); %s",
        100 * after["colour"],
        100 * after["shape"],
        100 * after["pair"],
        after["num_images"],
        100 * before["colour"],
        100 * before["shape"],
        100 * before["pair"],
        weights,
    )
    return report


if __name__ == "__main__":
    run_main(main)
