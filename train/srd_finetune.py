"""SRD stage D4: refine-tune the backdoored captioner on the SRD-processed training images.

Continues training the backdoored weights named by --checkpoint_path (checked against the model
flags) on the defender's training data, with every image replaced by its masked version from
the merged cleaning manifest (--clean_data_save/merged.json, one image per image id). Captions
are unchanged: the poisoned captions of --poison_ids_path stay, since the defender does not know
which samples are poisoned (reference §11, B15). Trains what the paper trains (perceiver +
gated cross-attention + token embeddings) with a fresh optimiser (reference: 20 epochs, lr 1e-4).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from srd.attacks.trainset import TrainingImages, build_samples
from srd.captioner.args import ModelArgs, model_signature
from srd.captioner.engine import CaptionDataset, process_state, train
from srd.captioner.factory import load_captioner
from srd.cli import run_main
from srd.config import parse, to_dict
from srd.data.records import DataArgs, check_images_exist
from srd.defenses.srd.inputs import SRDArgs
from srd.defenses.srd.merge import (
    MERGED_FILE,
    check_cleaning_run,
    masked_training_actions,
    read_merged,
)
from srd.defenses.stage import (
    RefineTrainArgs,
    defender_plan,
    named_run,
    require_backdoored_inputs,
)
from srd.io import ensure_dir, setup_logging
from srd.runs import check_run_config, check_writable, clear_folder

log = logging.getLogger("srd_finetune")


def main(argv: Sequence[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    data, model_args, srd, train_args = parse(
        argv, DataArgs, ModelArgs, SRDArgs, RefineTrainArgs, description=__doc__
    )
    require_backdoored_inputs(argv, model_args.checkpoint_path, srd.poison_ids_path)
    state = process_state()
    checkpoint = model_args.checkpoint_path
    plan, attack = defender_plan(srd.poison_ids_path, checkpoint, srd.benign_control)
    train_args = named_run(train_args, f"srd-{attack.name}")
    run_dir = train_args.run_dir
    check_writable(run_dir, "--external_save_dir")
    merged = read_merged(srd.clean_data_save)
    source = f"--clean_data_save {srd.clean_data_save}/{MERGED_FILE}"
    check_cleaning_run(merged, checkpoint, srd.poison_ids_path, srd.benign_control, source)
    records = data.split("train")
    check_images_exist(records)
    captioner = load_captioner(model_args)
    mask_actions = masked_training_actions(records, merged, source=source)
    record = {
        "stage": "srd_finetune",
        **to_dict(data, model_args, srd, train_args),
        "attack": attack.to_dict(),
        "num_poisoned": len(plan.ids),
        "clean_run_id": merged["run_id"],
        "clean_config_hash": merged["config_hash"],
        "model_signature": model_signature(model_args),
        "loaded_checkpoint": captioner.checkpoint_notes,
    }
    if not train_args.overwrite:
        check_run_config(run_dir, record, f"--run_name {train_args.run_name}")
    # The run folder and its log only once every input loaded: bad input leaves nothing behind.
    if state.is_main_process:
        if train_args.overwrite:
            clear_folder(run_dir, "--run_name")
        ensure_dir(run_dir, "--external_save_dir")
    state.wait_for_everyone()
    setup_logging(run_dir / "train.log" if state.is_main_process else None)
    samples = build_samples(records, plan)
    images = TrainingImages(records, attack, plan.ids, mask_actions, data.image_cache_mb)
    log.info("D4: refine-tuning %s on %d captions of %d SRD-processed images",
             model_args.checkpoint_path, len(samples), len(mask_actions))  # fmt: skip
    final = train(captioner, CaptionDataset(samples, images), train_args, record)
    log.info("refined checkpoint: %s", final)
    return str(final)


if __name__ == "__main__":
    run_main(main)
