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
from contextlib import nullcontext
from dataclasses import dataclass

from srd.attacks.craft import crafted_for_run, tower_encoder
from srd.attacks.registry import AttackArgs
from srd.attacks.trainset import (
    POISON_FILE,
    PoisonPlan,
    TrainingImages,
    build_samples,
    draw_coverage,
    plan_poison,
)
from srd.budgets import ATTACK
from srd.captioner.args import ModelArgs, model_signature
from srd.captioner.engine import (
    EPOCH_CAPTIONS_HELP,
    CaptionDataset,
    TrainArgs,
    process_state,
    train,
)
from srd.captioner.factory import load_captioner
from srd.captioner.runfiles import holds_training
from srd.captioner.sampling import epoch_sampler
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data.records import DataArgs, check_images_exist
from srd.errors import SRDError
from srd.flags import COUNT, at_least, positive
from srd.io import ensure_dir, is_finished, setup_logging, writer_lock
from srd.runs import (
    check_run_config,
    check_same_config,
    check_writable,
    clear_folder,
    input_digests,
)

log = logging.getLogger("train_backdoor")


@dataclass
class BackdoorTrainArgs(TrainArgs):
    """Training: run folder, optimiser, schedule, checkpoints."""

    run_name: str = arg("", help="run folder name (default: backdoor-<attack>)")
    num_epochs: int = arg(
        ATTACK.epochs, help="training epochs over all training captions", check=COUNT
    )
    learning_rate: float = arg(
        ATTACK.learning_rate, help="peak learning rate (AdamW)", check=positive()
    )
    epoch_captions_per_image: int = arg(
        ATTACK.epoch_captions_per_image, help=EPOCH_CAPTIONS_HELP, check=at_least(0)
    )
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
    if train_args.max_steps:  # the reports name an attack's budget by its epochs
        raise SRDError(
            f"--max_steps {train_args.max_steps}: the attack trains whole epochs "
            "(--num_epochs, ATTACK_EPOCHS in the run scripts); a light budget is a defense's"
        )
    if attack.needs_crafting and state.num_processes > 1:
        raise SRDError(f"--bd_attack_type {attack.name}: crafting runs in one process")
    run_dir = train_args.run_dir
    where = f"--run_name {train_args.run_name}"

    # Everything is checked before the first byte is written (srd.runs).
    records = data.split("train")
    check_images_exist(records)
    plan = plan_poison(
        records, attack, train_args.seed, train_args.poison_unit
    )  # the draw these flags make
    plan_path = run_dir / POISON_FILE
    kept = not train_args.overwrite and holds_training(run_dir)  # else: leftovers replaced
    if not train_args.overwrite:
        if is_finished(run_dir):
            raise SRDError(f"{where}: {run_dir} already finished (pass --overwrite)")
        if kept and plan_path.is_file():
            saved = PoisonPlan.load(plan_path)
            check_same_config(saved.identity(), plan.identity(), str(plan_path), "the poison plan")
    captioner = load_captioner(model_args)
    samples = build_samples(records, plan)
    record = {
        "stage": "backdoor",
        **to_dict(data, model_args, attack_args, train_args),
        "attack": attack.to_dict(),
        "num_poisoned": len(plan.ids),
        "model_signature": model_signature(model_args),
        "loaded_checkpoint": captioner.checkpoint_notes,
        **input_digests({**data.read_paths(), "checkpoint_path": model_args.checkpoint_path}),
    }
    if train_args.epoch_sampling == "fixed_replacement":  # what the replayed draw leaves out
        order = list(epoch_sampler(samples, train_args))  # the sampler train() replays
        record["fixed_draw"] = draw_coverage(samples, plan.ids, order)
    if kept:
        check_run_config(run_dir, record, where)
    check_writable(run_dir, "--external_save_dir")

    with writer_lock(run_dir, "--run_name") if state.is_main_process else nullcontext():
        if state.is_main_process:
            if train_args.overwrite:
                clear_folder(run_dir, "--run_name")
            ensure_dir(run_dir, "--external_save_dir")
        setup_logging(run_dir / "train.log" if state.is_main_process else None)
        if attack.needs_crafting:  # Shadowcast: poisons crafted against the frozen tower
            saved = PoisonPlan.load(plan_path) if kept and plan_path.is_file() else None
            attack = crafted_for_run(
                lambda: tower_encoder(captioner),
                attack,
                plan.meta,
                records,
                train_args.seed,
                run_dir,
                reuse=kept,
                recorded_sha=((saved.meta.get("crafted") or {}).get("sha256") if saved else None),
            )
        if state.is_main_process and not (kept and plan_path.is_file()):
            plan.save(plan_path)
        state.wait_for_everyone()
        log.info("%d poisoned caption ids in %s", len(plan.ids), plan_path)
        if "fixed_draw" in record:
            log.info("the replayed draw holds %s", record["fixed_draw"])

        images = TrainingImages(records, attack, plan.ids, cache_mb=data.image_cache_mb)
        final = train(captioner, CaptionDataset(samples, images), train_args, record)
    log.info("backdoored checkpoint: %s", final)
    return str(final)


if __name__ == "__main__":
    run_main(main)
