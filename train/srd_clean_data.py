"""SRD stage D3: give every training image one red square (reference SRD_clean_data.py).

Each training image, as the defender's poisoned data holds it (triggered when a caption of it
is poisoned, per --poison_ids_path), is captioned by the backdoored captioner and the clean
reference captioner (baseline S_sem, S_flu); then up to --n_tries epsilon-greedy actions of the
policy (--policy dqn, --ppo_path) or one seeded random action (--policy random, the ablation)
are scored, and the mask is kept by the reference rule (stop at +3, else the best positive
reward, else the last try). Every image is processed exactly once (reference B14 deviation).

Processes split the images into shards (torchrun/accelerate ranks, or --shard_id/--num_shards),
each written on its own in resumable chunks under --clean_data_save; a re-run after an
interruption continues. Merge the shards with train/combine_data.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from srd.captioner.args import ModelArgs
from srd.captioner.engine import process_state
from srd.captioner.factory import load_captioner
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data.records import DataArgs, check_images_exist
from srd.defenses.squares import RandomTries
from srd.defenses.srd.clean import (
    PolicyTries,
    RewardModels,
    check_clean_folder,
    clean_shard,
    prepare_clean_folder,
    resolve_shard,
)
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
from srd.defenses.srd.policy import load_policy
from srd.defenses.srd.reward import RewardConfig
from srd.defenses.srd.shards import ShardWriter, shard_indices, shard_sets
from srd.defenses.srd.variants import occlusion_maps
from srd.defenses.stage import defender_plan
from srd.errors import SRDError
from srd.flags import COUNT, SEED, SHARE, at_least
from srd.io import ensure_dir, file_digest, require_files, setup_logging
from srd.runs import check_writable, input_digests

log = logging.getLogger("srd_clean_data")


@dataclass
class CleanArgs:
    """Cleaning: policy, tries, sharding."""

    policy: str = arg(
        "dqn",
        help="dqn: the trained agent (--ppo_path); random: one seeded random square per image",
        choices=["dqn", "random"],
    )
    n_tries: int = arg(5, help="policy queries per image (reference: 5)", check=COUNT)
    epsilon: float = arg(0.05, help="exploration rate of each query (reference: 0.05)", check=SHARE)
    seed: int = arg(
        0, help="seed of the exploration draws / random squares (per image)", check=SEED
    )
    reference_max_new_tokens: int = arg(
        20,
        help="longest reference caption (reference D3: BLIP up to 20 tokens)",
        check=COUNT,
    )
    shard_id: int | None = arg(
        None, help="this shard (default: the process rank)", check=at_least(0)
    )
    num_shards: int | None = arg(
        None, help="shard count (default: the number of processes)", check=COUNT
    )


def main(argv: Sequence[str] | None = None) -> str:
    data, model_args, srd, sfs, reward_cfg, cfg = parse(
        argv, DataArgs, ModelArgs, SRDArgs, SFSArgs, RewardConfig, CleanArgs, description=__doc__
    )
    state = process_state()
    shard_id, num_shards = resolve_shard(
        cfg.shard_id, cfg.num_shards, state.process_index, state.num_processes
    )
    # Cheap checks first: nothing is written before every input has been read.
    policy, tries = None, RandomTries(cfg.seed)
    if cfg.policy == "dqn":
        policy = load_policy(srd.policy_file, device=str(state.device))
        tries = PolicyTries(policy, cfg.n_tries, cfg.epsilon, cfg.seed)
    require_files(
        ("--checkpoint_path", model_args.checkpoint_path),
        ("--poison_ids_path", srd.poison_ids_path),
    )
    check_reference(sfs)
    check_writable(srd.clean_data_save, "--clean_data_save")
    plan, attack = defender_plan(
        srd.poison_ids_path, model_args.checkpoint_path, srd.benign_control
    )
    records = data.split("train")
    check_images_exist(records)
    ids = [r.image_id for r in records]
    mine = [str(ids[i]) for i in shard_indices(len(ids), shard_id, num_shards)]

    folder = Path(srd.clean_data_save)
    run_config = {
        **to_dict(data, model_args, sfs, reward_cfg, cfg),
        "poison_ids_path": srd.poison_ids_path,
        "poison_ids_sha256": file_digest(srd.poison_ids_path),
        "policy_sha256": file_digest(srd.policy_file) if policy is not None else None,
        "ppo_path": str(srd.policy_file) if policy is not None else None,
        "checkpoint_sha256": _digest_or_none(model_args.checkpoint_path),
        "reference_sha256": _digest_or_none(sfs.reference_checkpoint_path),
        "attack": attack.to_dict(),
        **({"benign_control": True} if srd.benign_control else {}),  # (older hashes unchanged)
        **({"agent_variant": policy.variant} if policy is not None and policy.variant else {}),
        **({"agent_schedule": policy.schedule} if policy is not None and policy.schedule else {}),
        **input_digests(data.read_paths()),
    }
    record_reference(run_config, sfs)
    # Shards of one run share one config hash (the caption batch size is in it unless default).
    for key in ("shard_id", "num_shards"):
        run_config.pop(key)
    run_config = without_default_batch(run_config)
    run_id = f"{cfg.policy}:{srd.policy_file.name if policy is not None else cfg.seed}"
    check_clean_folder(folder, run_config)
    if _cleaned_in_other_shards(folder, num_shards):  # before any model is loaded
        state.wait_for_everyone()
        return str(folder)

    device = state.device
    captioner = load_captioner(model_args, device=device)
    reference_fn, _ = load_reference_captioner(
        sfs, model_args, device, cfg.reference_max_new_tokens
    )
    scorer = load_scorer(sfs, device, model_args.trust_remote_code)
    models = RewardModels(
        caption_fn=vlm_caption_fn(captioner, sfs),
        reference_fn=reference_fn,
        score_fn=sfs_score_fn(scorer),
        reward_config=reward_cfg,
    )
    if isinstance(tries, PolicyTries) and policy.occlusion_grid:  # our occlusion-map variant
        tries.map_fn = partial(
            occlusion_maps, caption_fn=models.caption_fn, grid=policy.occlusion_grid
        )

    ensure_dir(folder, "--clean_data_save")
    digest = prepare_clean_folder(folder, run_id, run_config)
    writer = ShardWriter(folder, run_id, digest, shard_id, num_shards, mine)
    setup_logging(folder / f"{writer.name}.log")
    log.info(
        "D3 %s: %d of %d training images (%s policy)", writer.name, len(mine), len(ids), cfg.policy
    )
    manifest = clean_shard(
        writer,
        training_versions(records, plan, attack),
        tries,
        models,
        chunk_size=sfs.caption_batch_size,
        progress=state.is_main_process or cfg.shard_id is not None,
    )
    rewards = [r for chunk in manifest["chunks"] for r in chunk["rewards"]]
    positive = sum(r > 0 for r in rewards)
    log.info("%s done: %d images, %d with a positive reward", writer.path, len(rewards), positive)
    state.wait_for_everyone()
    return str(writer.path)


def _cleaned_in_other_shards(folder: Path, num_shards: int) -> bool:
    """True when this run (same config: checked by prepare_clean_folder) already finished in
    another shard count, so there is nothing to do; SRDError when it stopped unfinished in
    another count (its shards would not merge with this count's)."""
    for count, finished in sorted(shard_sets(folder).items()):
        if count == num_shards:
            continue
        if not finished:
            raise SRDError(
                f"--clean_data_save {folder}: holds this run's unfinished shards of {count}; "
                f"resume them with {count} processes (or --num_shards {count})"
            )
        log.info("D3: %s already cleaned by this run in %d shards; nothing to do", folder, count)
        return True
    return False


def _digest_or_none(path: str | None) -> str | None:
    if path is None or path.lower() in ("", "none") or not Path(path).is_file():
        return None
    return file_digest(path)


if __name__ == "__main__":
    run_main(main)
