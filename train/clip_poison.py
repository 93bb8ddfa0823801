"""CLIP stage 1: the poisoned tiny CLIP (a poisoning fine-tune of the clean one, else scratch).

    python train/clip_poison.py --bd_attack_type badnet --poison_rate 0.05 \
        --clip_pretrained checkpoints_remote/embedded/clip/clip.safetensors --run_name par/badnet
    python train/clip_poison.py --bd_attack_type badnet_stripes --clip_model ViT-B-32 \
        --clip_pretrained open_clip_pytorch_model.bin --train_data cc3m.csv   (real mode)

A seeded share of the training images (srd.attacks.poison over image ids) gets the attack's trigger
and target-template captions; the CLIP is trained with open_clip's ClipLoss
(srd.captioner.clip.train_clip). Writes config.json, attack.json, poison_ids.json, clip.safetensors
(+ open_clip_config.json), history.json and DONE last into the run folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from srd.attacks.poison import save_poison_ids
from srd.attacks.registry import AttackArgs
from srd.captioner.clip import ClipTrainArgs, create_clip, load_clip, save_clip, train_clip
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data.records import DataArgs, check_images_exist
from srd.errors import SRDError
from srd.flags import SEED
from srd.io import mark_finished, prepare_run_dir, setup_logging, write_json
from srd.par.data import load_pairs, poison_loaded_pairs, poison_pairs
from srd.runs import check_run_name

log = logging.getLogger("clip_poison")


@dataclass
class PoisonRunArgs:
    """Run folder, seed and starting weights."""

    run_name: str = arg("par/badnet/poisoned", help="run folder under --external_save_dir")
    external_save_dir: str = arg("checkpoints_remote", help="folder holding run folders")
    seed: int = arg(0, help="seed of the poison draw, batches and caption choice", check=SEED)
    clip_pretrained: str | None = arg(
        None,
        help="clean CLIP weights to start from (safetensors or torch state dict of --clip_model); "
        "none = from scratch",
    )
    train_data: str = arg(
        "",
        help="training pairs: a benchmark/Karpathy folder or an image,caption CSV (with header; "
        "paths relative to it); empty = the train split of the data flags",
    )
    overwrite: bool = arg(False, help="redo a finished run")


def main(argv: Sequence[str] | None = None) -> dict:
    data, attack_args, clip_args, run = parse(
        argv, DataArgs, AttackArgs, ClipTrainArgs, PoisonRunArgs, description=__doc__
    )
    clip_args.validate()
    attack = attack_args.build()
    if attack is None or not attack.has_image_trigger:
        raise SRDError(f"--bd_attack_type {attack_args.bd_attack_type}: needs an image trigger")
    if run.clip_pretrained is not None and not Path(run.clip_pretrained).is_file():
        raise SRDError(f"--clip_pretrained {run.clip_pretrained}: file not found")
    if run.train_data:
        pairs = load_pairs(run.train_data, "--train_data")
    else:
        records = data.split("train")
        check_images_exist(records)
    if run.clip_pretrained is not None:
        model, tokenizer = load_clip(clip_args.clip_model, run.clip_pretrained, "--clip_pretrained")
    else:
        model, tokenizer = create_clip(clip_args.clip_model, run.seed)
    run_dir = prepare_run_dir(
        f"{run.external_save_dir}/{check_run_name(run.run_name, '--run_name')}",
        run.overwrite,
        "--run_name",
    )
    setup_logging(run_dir / "train.log")
    start = time.time()
    write_json(run_dir / "config.json", to_dict(data, attack_args, clip_args, run))
    write_json(run_dir / "attack.json", attack.to_dict())
    if run.train_data:
        images, captions = pairs
        images, captions, ids, meta = poison_loaded_pairs(images, captions, attack, run.seed)
        meta["ids"] = f"image indices in the order of --train_data {run.train_data}"
    else:
        images, captions, ids, meta = poison_pairs(records, attack, run.seed)
    save_poison_ids(run_dir / "poison_ids.json", ids, meta)
    log.info("poisoned %d of %d training images (%s)", len(ids), len(images), attack.name)
    history = train_clip(model, tokenizer, images, captions, clip_args, seed=run.seed)
    save_clip(model, clip_args.clip_model, run_dir)
    report = {"history": history, "wall_seconds": round(time.time() - start, 1)}
    write_json(run_dir / "history.json", report)
    mark_finished(run_dir)
    return report


if __name__ == "__main__":
    run_main(main)
