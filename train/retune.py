"""The re-tuning attack (Min et al., NeurIPS 2024): does a removed backdoor come back?

After a defense, the attacker fine-tunes the defended model on a small set: ``--retune_poisons``
of the attack's own poisoned training samples (its poison plan, ``--poison_ids_path``; the
default 15 is 1% of the 1,500 the embedded default's attack poisons), padded with
``--retune_benign`` clean samples of images the attack never triggered, for a few epochs at the
attack's learning rate. Evaluating the result (``eval/evaluate.py``, result
``retune-<defense run>.json``, run/run_retune.sh) gives the ASR after re-tuning beside the ASR
after the defense: a removal that returns within a few steps is superficial.

The re-tune set is one seeded draw (``--seed``); the images of the poisoned samples carry the
trigger, as in the attack's training set. What it trains is the attack's (``--trainable``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from srd.attacks.trainset import PoisonPlan, TrainingImages, build_samples, plan_attack
from srd.budgets import ATTACK
from srd.captioner.args import ModelArgs, model_signature
from srd.captioner.engine import CaptionDataset, Sample, TrainArgs, train
from srd.captioner.factory import load_captioner
from srd.captioner.runfiles import holds_training
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data.records import DataArgs, check_images_exist
from srd.defenses.stage import defense_of_checkpoint
from srd.errors import SRDError
from srd.flags import COUNT, at_least, positive
from srd.io import ensure_dir, is_finished, require_files, setup_logging, writer_lock
from srd.runs import check_run_config, check_writable, clear_folder, input_digests

log = logging.getLogger("retune")

RETUNE_POISONS = 15
"""Poisoned samples in the re-tune set: 1% of the embedded default attack's 1,500."""
RETUNE_BENIGN = 135
"""Clean samples padding it (10% of the set poisoned)."""
RETUNE_EPOCHS = 5


@dataclass
class RetuneArgs(TrainArgs):
    """The re-tuning attack: its set, its budget and its run folder."""

    run_name: str = arg("", help="run folder name (default: retune-<the defense run's folder>)")
    poison_ids_path: str = arg(
        "", help="the attack's poison plan (its run's poison_ids.json): the poisons drawn from"
    )
    retune_poisons: int = arg(
        RETUNE_POISONS, help="poisoned samples of the attack in the set", check=COUNT
    )
    retune_benign: int = arg(
        RETUNE_BENIGN, help="clean samples (of never-triggered images) padding the set",
        check=at_least(0),
    )  # fmt: skip
    num_epochs: int = arg(RETUNE_EPOCHS, help="epochs over the re-tune set", check=COUNT)
    learning_rate: float = arg(
        ATTACK.learning_rate, help="peak learning rate (default: the attack's)", check=positive()
    )


def retune_samples(
    samples: Sequence[Sample], plan: PoisonPlan, poisons: int, benign: int, seed: int
) -> tuple[list[Sample], list[int]]:
    """A seeded draw of ``poisons`` poisoned samples and ``benign`` samples of images no
    poisoned caption touches; returns the samples (sorted by caption id) and the poisoned ids."""
    poisoned_ids = set(plan.ids)
    triggered = {s.image_id for s in samples if s.caption_id in poisoned_ids}
    bad = sorted(s.caption_id for s in samples if s.caption_id in poisoned_ids)
    good = sorted(s.caption_id for s in samples if s.image_id not in triggered)
    if poisons > len(bad) or benign > len(good):
        raise SRDError(
            f"--retune_poisons {poisons} / --retune_benign {benign}: the data hold "
            f"{len(bad)} poisoned and {len(good)} clean samples"
        )
    rng = random.Random(seed)
    chosen_bad = rng.sample(bad, poisons)
    chosen = set(chosen_bad) | set(rng.sample(good, benign))
    return [s for s in samples if s.caption_id in chosen], sorted(chosen_bad)


def main(argv: Sequence[str] | None = None) -> str:
    data, model_args, args = parse(argv, DataArgs, ModelArgs, RetuneArgs, description=__doc__)
    require_files(
        ("--checkpoint_path", model_args.checkpoint_path),
        ("--poison_ids_path", args.poison_ids_path),
    )
    defended = defense_of_checkpoint(model_args.checkpoint_path)  # None: a bare checkpoint
    if not args.run_name:
        name = f"retune-{Path(model_args.checkpoint_path).parent.name}"
        args = dataclasses.replace(args, run_name=name)
    run_dir, where = args.run_dir, f"--run_name {args.run_name}"
    plan = PoisonPlan.load(args.poison_ids_path)
    attack = plan_attack(plan, args.poison_ids_path)
    records = data.split("train")
    check_images_exist(records)
    samples, poisoned = retune_samples(
        build_samples(records, plan), plan, args.retune_poisons, args.retune_benign, args.seed
    )
    if is_finished(run_dir) and not args.overwrite:
        raise SRDError(f"{where}: {run_dir} already finished (pass --overwrite)")
    captioner = load_captioner(model_args)
    record = {
        "stage": "retune",
        **to_dict(data, model_args, args),
        "attack": attack.to_dict(),
        "defense_record": defended,
        "retune_poisoned_ids": poisoned,
        "model_signature": model_signature(model_args),
        **input_digests(
            {
                **data.read_paths(),
                "checkpoint_path": model_args.checkpoint_path,
                "poison_ids_path": args.poison_ids_path,
            }
        ),
    }
    if not args.overwrite and holds_training(run_dir):
        check_run_config(run_dir, record, where)
    check_writable(run_dir, "--external_save_dir")
    with writer_lock(run_dir, "--run_name"):
        if args.overwrite:
            clear_folder(run_dir, "--run_name")
        ensure_dir(run_dir, "--external_save_dir")
        setup_logging(run_dir / "train.log")
        log.info("re-tune set: %d poisoned + %d clean samples (%s), %d epochs from %s",
                 len(poisoned), len(samples) - len(poisoned), attack.name, args.num_epochs,
                 model_args.checkpoint_path)  # fmt: skip
        images = TrainingImages(records, attack, poisoned, cache_mb=data.image_cache_mb)
        final = train(captioner, CaptionDataset(samples, images), args, record)
    log.info("re-tuned checkpoint: %s", final)
    return str(final)


if __name__ == "__main__":
    run_main(main)
