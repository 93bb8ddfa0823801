"""SRD stage D1: the RL pool (reference SFS_eval.py, --save_data_path).

Stamps a seeded choice of training images with the surrogate trigger (a 20x20 N(128, 20) noise
patch at a random place, seeded per image: the defender does not know the real trigger),
captions them with the backdoored captioner (--checkpoint_path) and with the clean reference
captioner (--reference_checkpoint_path, or BLIP with --blip_model), and stores the baseline
S_sem and S_flu of each image. ``--pool_source data`` takes the defender's own training images
instead (as its data holds them, triggered where a caption is poisoned; no surrogate; needs
--poison_ids_path), see srd.defenses.srd.pool_source. Several processes (torchrun/accelerate) split
the images: each writes its own shard (ids, captions, scores, image checksums; no pixels), then
the main process checks them and writes the manifest (pool.json) and DONE.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from srd.captioner.args import ModelArgs, model_signature
from srd.captioner.engine import process_state
from srd.captioner.factory import load_captioner
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data.records import DataArgs, ImageStore, check_images_exist
from srd.defenses.srd.env import sfs_score_fn
from srd.defenses.srd.inputs import (
    SFSArgs,
    SRDArgs,
    check_reference,
    load_reference_captioner,
    load_scorer,
    record_reference,
    training_versions,
    vlm_caption_fn,
    without_default_batch,
)
from srd.defenses.srd.pool import (
    POOL_JSON,
    build_pool_rows,
    choose_pool_ids,
    finish_pool,
    pool_files,
    write_pool_shard,
)
from srd.defenses.srd.pool_source import POOL_SOURCES, data_pool_rows
from srd.defenses.srd.shards import config_hash, shard_indices
from srd.defenses.stage import defender_plan
from srd.errors import SRDError
from srd.flags import COUNT, SEED, Range
from srd.io import file_digest, is_finished, read_json, require_files, setup_logging
from srd.runs import check_same_config, check_writable, input_digests, remove_paths

log = logging.getLogger("srd_pool")


@dataclass
class PoolArgs:
    """RL pool: which images, surrogate seed, reference decoding."""

    pool_size: int = arg(
        -1,
        help="training images in the pool (-1: all, as the reference)",
        check=Range(low=1, also=(-1,), why="-1: all"),
    )
    seed: int = arg(
        0, help="seed of the image choice and of the per-image surrogate trigger", check=SEED
    )
    reference_max_new_tokens: int = arg(
        100,
        help="longest reference caption (reference D1: BLIP 10 to 100 tokens)",
        check=COUNT,
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
    record = {
        "stage": "srd_pool",
        **to_dict(data, model_args, srd, sfs, cfg),
        "model_signature": model_signature(model_args),
        **input_digests({**data.read_paths(), "checkpoint_path": model_args.checkpoint_path}),
    }
    record_reference(record, sfs)
    if cfg.pool_source == "data":
        require_files(("--poison_ids_path", srd.poison_ids_path))
        record["poison_ids_sha256"] = file_digest(srd.poison_ids_path)
    # The run's identity (hashed into every shard): its resolved config, less what does not
    # choose the pool (where files go, caching); nor is the number of processes. The caption
    # batch size is in it unless default (srd.defenses.srd.inputs.without_default_batch).
    free = ("overwrite", "image_cache_mb", "reference_captioner",
            "save_data_path", "ppo_path", "clean_data_save")  # fmt: skip
    if is_finished(folder) and not cfg.overwrite:
        saved = read_json(folder / POOL_JSON, flag="--save_data_path")
        where = f"--save_data_path {folder}"
        if isinstance(saved, dict) and isinstance(saved.get("meta"), dict):
            check_same_config(saved["meta"], record, where, "the pool", free)
        raise SRDError(f"{where}: pool already finished (pass --overwrite)")
    require_files(("--checkpoint_path", model_args.checkpoint_path))
    check_reference(sfs)
    check_writable(folder, "--save_data_path")
    records = data.split("train")
    ids = choose_pool_ids([r.image_id for r in records], cfg.pool_size, cfg.seed)
    wanted = set(ids)
    chosen = [r for r in records if r.image_id in wanted]
    check_images_exist(chosen)
    version_fn = None
    if cfg.pool_source == "data" or srd.benign_control:  # (the control refuses a backdoored model)
        plan, attack = defender_plan(
            srd.poison_ids_path, model_args.checkpoint_path, srd.benign_control
        )
        if cfg.pool_source == "data":
            version_fn = training_versions(chosen, plan, attack)
    device = state.device
    captioner = load_captioner(model_args, device=device)
    reference_fn, reference = load_reference_captioner(
        sfs, model_args, device, cfg.reference_max_new_tokens, blip_min_length=10
    )
    scorer = load_scorer(sfs, device, model_args.trust_remote_code)
    # Logging (and its file) only once every input loaded: bad input leaves nothing behind.
    # A pool is all or nothing: the files of an older or killed build go first, marker first.
    if state.is_main_process:
        remove_paths(pool_files(folder))
    state.wait_for_everyone()
    setup_logging(folder / "srd_pool.log" if state.is_main_process else None)
    log.info("backdoored captioner %s; reference %s", model_args.checkpoint_path, reference)
    rank, ranks = state.process_index, state.num_processes
    mine = [ids[i] for i in shard_indices(len(ids), rank, ranks)]
    log.info("D1: %d pool images in %d shard(s), %d in this one", len(ids), ranks, len(mine))
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
    digest = config_hash(without_default_batch({k: v for k, v in record.items() if k not in free}))
    write_pool_shard(folder, rank, ranks, rows, digest, cfg.pool_source)
    state.wait_for_everyone()
    if state.is_main_process:
        finish_pool(
            folder,
            ranks,
            digest,
            cfg.pool_source,
            seed=cfg.seed,
            data={k: v for k, v in to_dict(data).items() if k != "image_cache_mb"},
            meta={**record, "reference_captioner": reference},
            expected_ids=ids,
        )
        sem = [r.base_sem for r in rows]
        log.info("pool %s: %d images; mean baseline S_sem %.3f on shard 0", folder, len(ids),
                 sum(sem) / max(len(sem), 1))  # fmt: skip
    state.wait_for_everyone()
    return str(folder)


if __name__ == "__main__":
    run_main(main)
