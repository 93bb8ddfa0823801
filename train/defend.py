"""Run one defense from the registry on a backdoored captioner (``--defense NAME``).

Reads the defender's data as the attack left it (the attack run's poison_ids.json rebuilds the
triggered images) and the backdoored weights (--checkpoint_path), then, by the defense's kind:

* refine-tune defenses (srd, no_mask, clean_finetune, random_squares, oracle_square,
  fine_pruning, par): build the defense's data (and change the model first where it does), then
  refine-tune with one engine and one set of budget flags (SRD's stage D4 is --defense srd;
  par replaces the caption loss with its own and logs it per step in step_log.jsonl);
* test-time defenses (blur, spatial) and none: no training; the record names the backdoored
  checkpoint and the transform, applied by ``eval/evaluate.py --defense NAME``.

``--retrain_from CLEAN`` is the retrain-from-clean protocol (a defender who cleans the data
before training): the same defense data train the clean captioner at CLEAN (give the attack's
budget flags) instead of refine-tuning the backdoored model; data-level defenses only; runs named
retrain-<defense>-<attack>, records with ``protocol: retrain_from_clean``.

``--benign_control`` runs the defense on the clean captioner instead (its --checkpoint_path),
with the defender's data as if no caption were poisoned: the report's benign control, what the
defense costs a model without a backdoor (evaluate with ``--defense_run`` naming this run); srd
then needs a cleaning run made the same way (``run/run_SRD.sh`` with BENIGN=1).

Writes <external_save_dir>/<run_name>/defense.json (what eval/evaluate.py copies into its
result: defense, attack, seed, checkpoint, SSIM/PSNR of processed vs original training images).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

from srd.captioner.args import ModelArgs, model_signature
from srd.captioner.checkpoint import trainable_state_dict
from srd.captioner.engine import CaptionDataset, process_state, train, trained_steps
from srd.captioner.factory import load_captioner
from srd.captioner.runfiles import FINAL_WEIGHTS
from srd.captioner.weights import write_checkpoint_file
from srd.cli import run_main
from srd.config import parse, to_dict
from srd.data.records import DataArgs, check_images_exist
from srd.defenses import DefenderData, DefenseArgs, build_defense, chosen_defense
from srd.defenses.stage import (
    DEFENSE_FILE,
    RETRAIN_PROTOCOL,
    RefineTrainArgs,
    Timer,
    backdoor_facts,
    defender_plan,
    named_run,
    require_backdoored_inputs,
    retrain_start,
    square_coverage,
    training_quality,
)
from srd.errors import SRDError
from srd.io import ensure_dir, mark_finished, setup_logging, write_json
from srd.runs import input_digests

log = logging.getLogger("defend")


def main(argv: Sequence[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    cls = chosen_defense(argv)  # its own flags (cls.Args) join the shared ones
    data_args, model_args, dargs, own, train_args = parse(
        argv, DataArgs, ModelArgs, DefenseArgs, cls.Args, RefineTrainArgs, description=__doc__
    )
    defense = build_defense(cls.name, own)
    if train_args.max_steps and defense.kind != "refine":
        raise SRDError(
            f"--max_steps {train_args.max_steps}: --defense {defense.name} does not refine-tune "
            "(a light budget is for the defenses that do: python -m srd.defenses --trains)"
        )
    checkpoint = model_args.checkpoint_path
    require_backdoored_inputs(argv, checkpoint, dargs.poison_ids_path)
    plan, attack = defender_plan(dargs.poison_ids_path, checkpoint, dargs.benign_control)
    defense.check_inputs(checkpoint, dargs.poison_ids_path, dargs.benign_control)
    start = retrain_start(defense, dargs.retrain_from, dargs.benign_control)
    prefix = "benign" if dargs.benign_control else "defense" if start is None else "retrain"
    light = f"-steps{train_args.max_steps}" if train_args.max_steps else ""  # a light budget
    train_args = named_run(train_args, f"{prefix}-{defense.name}-{attack.name}{light}")
    run_dir = train_args.run_dir
    state = process_state()
    records = data_args.split("train")
    check_images_exist(records)
    holdout = data_args.split("val") if defense.uses_holdout else ()
    check_images_exist(holdout)
    data = DefenderData(
        records, plan, attack, train_args.seed, data_args.image_cache_mb, holdout, model_args
    )
    timer = Timer()
    training = defense.training_set(data)  # checks the defense's inputs before any output
    if (training is not None) != (defense.kind == "refine"):  # the registry's kind says it
        raise SRDError(f"--defense {defense.name} (kind {defense.kind}): training set "
                       f"{'built' if training is not None else 'missing'}")  # fmt: skip
    captioner, prepared = None, None
    edits = defense.kind == "edit"  # changes the weights without training (e.g. clp)
    if training is not None or edits:  # a checkpoint of another model is refused before output
        loaded = model_args if start is None else replace(model_args, checkpoint_path=start)
        captioner = load_captioner(loaded)
        prepared = defense.prepare_model(captioner, data)
    if state.is_main_process:
        ensure_dir(run_dir, "--external_save_dir")
    setup_logging(run_dir / "defend.log" if state.is_main_process else None)
    record = {
        "defense": defense.describe(),
        "attack": attack.name,
        **backdoor_facts(model_args.checkpoint_path),
        "seed": train_args.seed,
        "benign_control": dargs.benign_control,
        "backdoored_checkpoint": None if dargs.benign_control else model_args.checkpoint_path,
        "checkpoint": model_args.checkpoint_path,
        "protocol": "refine" if start is None else RETRAIN_PROTOCOL,
        "max_steps": train_args.max_steps or None,  # a light budget (the report's "N steps")
        "start_checkpoint": start or model_args.checkpoint_path,
        "image_quality": training_quality(defense, data, dargs.quality_images, training),
        "trigger_coverage": square_coverage(training, attack),
    }
    if training is not None:
        record["prepare"] = prepared
        samples, images = training
        config = {
            "stage": "defend",
            **to_dict(data_args, model_args, dargs, own, train_args),
            "attack": attack.to_dict(),
            "num_poisoned": len(plan.ids),
            "model_signature": model_signature(model_args),
            "loaded_checkpoint": captioner.checkpoint_notes,
            **input_digests(
                {
                    **data_args.read_paths(),
                    "checkpoint_path": model_args.checkpoint_path,
                    **({"retrain_from": start} if start else {}),
                    "poison_ids_path": dargs.poison_ids_path,
                    **defense.read_paths(),
                }
            ),
            "defense_record": record,
        }
        log.info("%s: %s %s on %d captions", defense.name,
                 "refine-tuning" if start is None else "retraining from clean",
                 loaded.checkpoint_path, len(samples))  # fmt: skip
        loss_fn = defense.training_loss(captioner, train_args)
        final = train(
            captioner, CaptionDataset(samples, images), train_args, config, loss_fn=loss_fn
        )
        record["checkpoint"] = str(final)
        record["train_steps"] = trained_steps(run_dir)
        if loss_fn is not None:
            record["training_loss"] = loss_fn.summary()
    elif edits:  # the edited weights, in the training engine's format
        record["prepare"] = prepared
        final = run_dir / FINAL_WEIGHTS
        if state.is_main_process:
            config = {
                "stage": "defend",
                **to_dict(data_args, model_args, dargs, own),
                "model_signature": model_signature(model_args),
                "defense_record": record,
            }
            weights = trainable_state_dict(captioner.model)
            write_checkpoint_file(final, {"model_state_dict": weights, "config": config})
        record["checkpoint"] = str(final)
    record["wall_seconds"] = timer.seconds()
    if state.is_main_process:
        write_json(run_dir / DEFENSE_FILE, record)
        mark_finished(run_dir)
    log.info("%s: wrote %s", defense.name, run_dir / DEFENSE_FILE)
    return str(run_dir / DEFENSE_FILE)


if __name__ == "__main__":
    run_main(main)
