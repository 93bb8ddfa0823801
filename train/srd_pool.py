"""SRD stage D1: the RL pool (reference SFS_eval.py, --save_data_path).

Stamps a seeded choice of training images with the surrogate trigger (a 20x20 N(128, 20) noise
patch at a random place, seeded per image: the defender does not know the real trigger),
captions them with the backdoored captioner (--checkpoint_path) and with the clean reference
captioner (--reference_checkpoint_path, or BLIP with --blip_model), and stores the baseline
S_sem and S_flu of each image. ``--pool_source data`` takes the defender's own training images
instead (as its data holds them, triggered where a caption is poisoned; no surrogate; needs
--poison_ids_path), see srd.defenses.srd_pool. Several processes (torchrun/accelerate) split
the images and the main process writes the pool folder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import gather_object

from srd.cleaning import (
    SFSArgs,
    SRDArgs,
    load_reference_captioner,
    load_scorer,
    plan_attack,
    require_files,
    training_versions,
    vlm_caption_fn,
)
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data import DataArgs, ImageStore, check_images_exist
from srd.defenses.srd_pool import POOL_SOURCES, data_pool_rows
from srd.engine import process_state
from srd.errors import SRDError
from srd.io import DONE_MARKER, is_finished, setup_logging
from srd.model import ModelArgs, load_captioner, model_signature
from srd.pool import POOL_IMAGES, POOL_JSON, build_pool_rows, choose_pool_ids, save_pool
from srd.rl.env import sfs_score_fn
from srd.runs import check_writable, remove_paths
from srd.trainset import PoisonPlan

log = logging.getLogger("srd_pool")


@dataclass
class PoolArgs:
    """RL pool: which images, surrogate seed, reference decoding."""

    pool_size: int = arg(-1, help="training images in the pool (-1: all, as the reference)")
    seed: int = arg(0, help="seed of the image choice and of the per-image surrogate trigger")
    reference_max_new_tokens: int = arg(
        100, help="longest reference caption (reference D1: BLIP 10 to 100 tokens)"
    )
    overwrite: bool = arg(False, help="rebuild a finished pool")
    pool_source: str = arg(
        "surrogate",
        help="surrogate: clean images with the noise surrogate trigger (the reference); data: "
        "the defender's own training images as its data holds them",
        choices=list(POOL_SOURCES),
    )


def main(argv: Sequence[str] | None = None) -> str:
    data, model_args, srd, sfs, cfg = parse(
        argv, DataArgs, ModelArgs, SRDArgs, SFSArgs, PoolArgs, description=__doc__
    )
    state = process_state()
    folder = Path(srd.save_data_path)
    if is_finished(folder) and not cfg.overwrite:
        raise SRDError(f"--save_data_path {folder}: pool already finished (pass --overwrite)")
    require_files(
        ("--checkpoint_path", model_args.checkpoint_path),
        ("--reference_checkpoint_path", None if sfs.blip_model else sfs.reference_checkpoint_path),
    )
    check_writable(folder, "--save_data_path")
    records = data.split("train")
    ids = choose_pool_ids([r.image_id for r in records], cfg.pool_size, cfg.seed)
    wanted = set(ids)
    chosen = [r for r in records if r.image_id in wanted]
    check_images_exist(chosen)
    version_fn = None
    if cfg.pool_source == "data":
        require_files(("--poison_ids_path", srd.poison_ids_path))
        plan = PoisonPlan.load(srd.poison_ids_path)
        version_fn = training_versions(chosen, plan, plan_attack(plan, srd.poison_ids_path))
    device = state.device
    captioner = load_captioner(model_args, device=device)
    reference_fn, reference = load_reference_captioner(
        sfs, model_args, device, cfg.reference_max_new_tokens, blip_min_length=10
    )
    scorer = load_scorer(sfs, device, model_args.trust_remote_code)
    # Logging (and its file) only once every input loaded: bad input leaves nothing behind.
    # A pool is all or nothing: the files of an older or killed build go first, marker first.
    if state.is_main_process:
        remove_paths([folder / DONE_MARKER, folder / POOL_JSON, folder / POOL_IMAGES])
    state.wait_for_everyone()
    setup_logging(folder / "srd_pool.log" if state.is_main_process else None)
    log.info("backdoored captioner %s; reference %s", model_args.checkpoint_path, reference)
    mine = ids[state.process_index :: state.num_processes]
    log.info("D1: %d pool images, %d on this process", len(ids), len(mine))
    if version_fn is None:
        rows = build_pool_rows(
            mine,
            ImageStore(chosen, data.image_cache_mb),
            vlm_caption_fn(captioner, sfs),
            reference_fn,
            sfs_score_fn(scorer),
            seed=cfg.seed,
            chunk_size=sfs.caption_batch_size,
            progress=state.is_main_process,
        )
    else:
        rows = data_pool_rows(
            mine,
            version_fn,
            vlm_caption_fn(captioner, sfs),
            reference_fn,
            sfs_score_fn(scorer),
            chunk_size=sfs.caption_batch_size,
            progress=state.is_main_process,
        )
    if state.num_processes > 1:
        rows = [row for part in gather_object([rows]) for row in part]
    if state.is_main_process:
        meta = {
            "stage": "srd_pool",
            **to_dict(data, model_args, srd, sfs, cfg),
            "reference_captioner": reference,
            "pool_source": cfg.pool_source,
            "model_signature": model_signature(model_args),
        }
        save_pool(folder, rows, meta)
        sem = [r.base_sem for r in rows]
        log.info(
            "pool %s: %d images, mean baseline S_sem %.3f", folder, len(rows), sum(sem) / len(sem)
        )
    state.wait_for_everyone()
    return str(folder)


if __name__ == "__main__":
    run_main(main)
