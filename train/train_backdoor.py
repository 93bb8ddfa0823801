"""Stage A: backdoor training (run/run_train.sh).

Poisons a seeded share of the training captions with an attack from the registry (image trigger
+ target caption), saves the draw in the run folder (poison_ids.json, read back by every later
stage), and fine-tunes a clean captioner on the poisoned data, training what the paper trains
(perceiver + gated cross-attention + token embeddings).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from srd.attacks import AttackArgs
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data import DataArgs, check_images_exist
from srd.engine import CaptionDataset, TrainArgs, process_state, train
from srd.errors import SRDError
from srd.io import ensure_dir, setup_logging
from srd.model import ModelArgs, load_captioner, model_signature
from srd.trainset import POISON_FILE, PoisonPlan, TrainingImages, build_samples, plan_poison

log = logging.getLogger("train_backdoor")


@dataclass
class BackdoorTrainArgs(TrainArgs):
    """Training: run folder, optimiser, schedule, checkpoints."""

    run_name: str = arg("", help="run folder name (default: backdoor-<attack>)")
    num_epochs: int = arg(6, help="training epochs over all training captions")
    learning_rate: float = arg(1e-3, help="peak learning rate (AdamW)")
    poison_unit: str = arg(
        "caption",
        help="caption: poison caption samples (the reference; a triggered image keeps clean "
        "captions); image: poison every caption of the chosen images",
        choices=["caption", "image"],
    )


def main(argv: Sequence[str] | None = None) -> str:
    data, model_args, attack_args, train_args = parse(
        argv, DataArgs, ModelArgs, AttackArgs, BackdoorTrainArgs, description=__doc__
    )
    attack = attack_args.build()
    if attack is None:
        raise SRDError("--bd_attack_type clean: backdoor training needs an attack")
    if not train_args.run_name:
        train_args = dataclasses.replace(train_args, run_name=f"backdoor-{attack.name}")
    state = process_state()
    run_dir = train_args.run_dir
    if state.is_main_process:
        ensure_dir(run_dir, "--external_save_dir")
    setup_logging(run_dir / "train.log" if state.is_main_process else None)

    records = data.split("train")
    check_images_exist(records)
    plan_path = run_dir / POISON_FILE
    if plan_path.is_file() and not train_args.overwrite:
        plan = PoisonPlan.load(plan_path)
        if plan.meta.get("attack", {}).get("name") != attack.name:
            raise SRDError(f"{plan_path}: poison ids were drawn for another attack")
        if plan.meta.get("poison_unit", "caption") != train_args.poison_unit:
            raise SRDError(
                f"--poison_unit {train_args.poison_unit}: {plan_path} was drawn per "
                f"{plan.meta.get('poison_unit', 'caption')} (pass --overwrite to redraw)"
            )
        log.info("read %d poisoned caption ids from %s", len(plan.ids), plan_path)
    else:
        plan = plan_poison(records, attack, train_args.seed, train_args.poison_unit)
        if state.is_main_process:
            plan.save(plan_path)
    state.wait_for_everyone()

    captioner = load_captioner(model_args)
    images = TrainingImages(records, attack, plan.ids, cache_mb=data.image_cache_mb)
    samples = build_samples(records, plan)
    record = {
        "stage": "backdoor",
        **to_dict(data, model_args, attack_args, train_args),
        "attack": attack.to_dict(),
        "num_poisoned": len(plan.ids),
        "model_signature": model_signature(model_args),
        "loaded_checkpoint": captioner.checkpoint_notes,
    }
    final = train(captioner, CaptionDataset(samples, images), train_args, record)
    log.info("backdoored checkpoint: %s", final)
    return str(final)


if __name__ == "__main__":
    run_main(main)
