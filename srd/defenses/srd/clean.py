"""Stage D3: cleaning training images with the agent (reference section 10, B13, B14).

Every image gets exactly one red square. For each image it takes the version the defender's data
holds (triggered when any caption of it is poisoned), captions it with the backdoored captioner and
a
clean reference captioner (the baseline ``S_sem``/``S_flu``), draws up to ``n_tries`` epsilon-greedy
actions from the policy (or one uniformly random action for the ablation), scores every distinct
masked version and keeps the mask chosen by :func:`srd.defenses.srd.policy.select_mask` (stop at +3,
else the best positive, else the last try). All work of a chunk of images is done in ONE captioning
call and ONE scoring call. Results go to a resumable shard
(:class:`srd.defenses.srd.defenses.srd.shards.ShardWriter`) as action + reward per image id: the
masked image is
``apply_action(version, action)``, exact and compact.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from srd.defenses.squares import image_rng
from srd.defenses.srd.dqn import greedy_actions
from srd.defenses.srd.inputs import CaptionFn, ScoreFn
from srd.defenses.srd.policy import draw_try_actions, select_mask
from srd.defenses.srd.reward import RewardConfig, caption_rewards
from srd.defenses.srd.shards import CLEAN_CONFIG, ShardWriter, config_hash
from srd.errors import SRDError
from srd.geometry import apply_action
from srd.io import read_json, write_json
from srd.runs import remove_paths

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------


class TrySource(Protocol):
    """``tries(ids, images) -> actions``: the actions to try on each image, in order."""

    def __call__(self, ids: Sequence[int], images: Sequence[np.ndarray]) -> list[list[int]]: ...


class PolicyTries:
    """Up to ``n_tries`` epsilon-greedy actions of a DQN policy on the unmasked image.

    The observation never changes between tries, so the greedy action is computed once (one
    batched forward pass per chunk) and only the exploration draws differ (reference B13).
    """

    def __init__(
        self,
        policy: Any,
        n_tries: int = 5,
        epsilon: float = 0.05,
        seed: int = 0,
        map_fn: Callable[[Sequence[np.ndarray]], np.ndarray] | None = None,
    ):
        """``map_fn(images) -> (N, grid, grid)``: the occlusion maps of a policy trained with
        them (:mod:`srd.defenses.srd.variants`; :func:`greedy_actions` refuses a mismatch)."""
        if n_tries < 1:
            raise SRDError(f"--n_tries {n_tries}: must be at least 1")
        if not 0.0 <= epsilon <= 1.0:
            raise SRDError(f"--epsilon {epsilon}: must be in [0, 1]")
        self.policy = policy
        self.n_tries = n_tries
        self.epsilon = epsilon
        self.seed = seed
        self.map_fn = map_fn

    def __call__(self, ids: Sequence[int], images: Sequence[np.ndarray]) -> list[list[int]]:
        maps = None if self.map_fn is None else list(self.map_fn(images))
        greedy = greedy_actions(self.policy, list(images), maps)
        return [
            [
                int(a)
                for a in draw_try_actions(
                    greedy[k : k + 1],
                    self.n_tries,
                    self.epsilon,
                    image_rng(self.seed, i),
                    int(self.policy.action_space.n),  # (fewer with --max_square_side)
                )[0]
            ]
            for k, i in enumerate(ids)
        ]


# --------------------------------------------------------------------------------------------
# One chunk
@dataclass
class RewardModels:
    """What scores a masked image: the backdoored captioner, the clean reference captioner,
    the SFS components and the reward table (all batched over images)."""

    caption_fn: CaptionFn
    reference_fn: CaptionFn
    score_fn: ScoreFn
    reward_config: RewardConfig = dataclasses.field(default_factory=RewardConfig)


@dataclass
class CleanedImage:
    """The mask kept for one image and what it was chosen from."""

    image_id: int
    action: int
    reward: int
    tries: list[tuple[int, int]]
    base_sem: float
    base_flu: float
    reference: str
    caption: str
    """The backdoored captioner's caption of the unmasked image."""
    masked_caption: str
    """Its caption of the kept masked image."""

    def extras(self) -> dict[str, Any]:
        """JSON record stored beside the action in the shard."""
        return {
            "tries": [[a, r] for a, r in self.tries],
            "base_sem": _finite(self.base_sem),
            "base_flu": _finite(self.base_flu),
            "reference": self.reference,
            "caption": self.caption,
            "masked_caption": self.masked_caption,
        }


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def clean_chunk(
    ids: Sequence[int],
    images: Sequence[np.ndarray],
    tries_fn: TrySource,
    models: RewardModels,
) -> list[CleanedImage]:
    """Choose one mask for each image (uint8 (224, 224, 3)) of a chunk.

    One reference-caption call, ONE backdoored-caption call (unmasked images and every distinct
    try of every image together) and ONE scoring call (baselines and tries together).
    """
    n = len(ids)
    if len(images) != n:
        raise ValueError(f"{len(images)} images for {n} ids")
    if n == 0:
        return []
    references = list(models.reference_fn(list(images)))
    tries = tries_fn(ids, images)
    if len(tries) != n or any(len(t) == 0 for t in tries):
        raise ValueError("the try source must give at least one action per image")
    distinct = [list(dict.fromkeys(int(a) for a in t)) for t in tries]
    owner = [k for k in range(n) for _ in distinct[k]]
    flat_actions = [a for d in distinct for a in d]
    masked = [apply_action(images[k], a) for k, a in zip(owner, flat_actions, strict=True)]

    captions = list(models.caption_fn(list(images) + masked))
    if len(captions) != n + len(masked):
        raise ValueError(f"caption_fn gave {len(captions)} captions for {n + len(masked)} images")
    base_captions, try_captions = captions[:n], captions[n:]
    sem, flu = models.score_fn(
        base_captions + try_captions, references + [references[k] for k in owner]
    )
    sem = np.asarray(sem, dtype=np.float64)
    flu = np.asarray(flu, dtype=np.float64)
    base_sem, base_flu = sem[:n], flu[:n]
    rewards = caption_rewards(
        try_captions, sem[n:], flu[n:], base_sem[owner], base_flu[owner], models.reward_config
    )

    results = []
    offset = 0
    for k, image_id in enumerate(ids):
        m = len(distinct[k])
        reward_of = {a: int(rewards[offset + j]) for j, a in enumerate(distinct[k])}
        caption_of = {a: try_captions[offset + j] for j, a in enumerate(distinct[k])}
        offset += m
        choice = select_mask(tries[k], reward_of)
        results.append(
            CleanedImage(
                image_id=int(image_id),
                action=choice.action,
                reward=choice.reward,
                tries=choice.tries,
                base_sem=float(base_sem[k]),
                base_flu=float(base_flu[k]),
                reference=references[k],
                caption=base_captions[k],
                masked_caption=caption_of[choice.action],
            )
        )
    return results


# --------------------------------------------------------------------------------------------
# A shard
def resolve_shard(
    shard_id: int | None, num_shards: int | None, process_index: int, num_processes: int
) -> tuple[int, int]:
    """(shard id, shard count): the process rank/world, or the flags for manual sharding."""
    if shard_id is None and num_shards is None:
        return process_index, num_processes
    if shard_id is None or num_shards is None:
        raise SRDError("--shard_id and --num_shards must be given together")
    if num_processes > 1:
        raise SRDError(
            "--shard_id/--num_shards: not with several processes (each process is a shard)"
        )
    return shard_id, num_shards


def cleaned_nothing(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds no cleaned image: no shard manifest records a chunk (what a
    cleaning run that failed or was killed before its first chunk left: its config and empty
    manifests)."""
    for path in Path(folder).glob("shard-*-of-*.json"):
        manifest = read_json(path, flag="--clean_data_save")
        if not isinstance(manifest, dict) or manifest.get("chunks") != []:
            return False
    return True


def check_clean_folder(folder: str | os.PathLike, config: Mapping[str, Any]) -> str:
    """The config hash of a cleaning run; SRDError when ``folder`` already holds another run
    (different config) with cleaned images, so shards of different runs never mix (another
    run's leftovers without any are replaced by :func:`prepare_clean_folder`). Reads only."""
    folder = Path(folder)
    digest = config_hash(config)
    path = folder / CLEAN_CONFIG
    if path.is_file():
        old = read_json(path, flag="--clean_data_save")
        if not isinstance(old, dict) or old.get("config_hash") != digest:
            if isinstance(old, dict) and cleaned_nothing(folder):
                return digest
            before = old.get("config", {}) if isinstance(old, dict) else {}
            changed = sorted(k for k in set(config) | set(before) if before.get(k) != config.get(k))
            raise SRDError(
                f"--clean_data_save {folder}: holds another cleaning run "
                f"({', '.join(changed[:6]) or 'config'} differ); use another folder"
            )
    return digest


def prepare_clean_folder(folder: str | os.PathLike, run_id: str, config: Mapping[str, Any]) -> str:
    """Record the cleaning run in ``folder/clean_config.json`` (checked by
    :func:`check_clean_folder`: the same run, a resume or another shard, passes; another run's
    leftovers without a cleaned image, its config and empty manifests, are replaced); returns
    its config hash."""
    digest = check_clean_folder(folder, config)
    path = Path(folder) / CLEAN_CONFIG
    if path.is_file() and read_json(path).get("config_hash") != digest:
        stale = sorted(Path(folder).glob("shard-*-of-*.json"))
        log.info("--clean_data_save %s: replacing another run's leftovers (%s, %d empty "
                 "manifests): no image was cleaned", folder, CLEAN_CONFIG, len(stale))  # fmt: skip
        remove_paths([path, *stale])
    if not path.is_file():
        write_json(path, {"run_id": run_id, "config_hash": digest, "config": dict(config)})
    return digest


def clean_shard(
    writer: ShardWriter,
    load_fn: Callable[[int], np.ndarray],
    tries_fn: TrySource,
    models: RewardModels,
    chunk_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Clean the shard's pending ids chunk by chunk (each chunk written before the next starts);
    a killed run re-opened with the same writer settings continues where it stopped."""
    if chunk_size < 1:
        raise SRDError(f"--caption_batch_size {chunk_size}: must be at least 1")
    pending = writer.pending_ids
    if len(pending) < len(writer.manifest["assigned_ids"]):
        log.info(
            "%s: %d ids already cleaned, %d to go", writer.name, len(writer.done_ids), len(pending)
        )
    bar = tqdm(total=len(pending), desc=f"D3 {writer.name}", unit="img", disable=not progress)
    for start in range(0, len(pending), chunk_size):
        chunk = pending[start : start + chunk_size]
        ids = [int(i) for i in chunk]
        results = clean_chunk(ids, [load_fn(i) for i in ids], tries_fn, models)
        writer.write_chunk(
            chunk,
            [r.action for r in results],
            [r.reward for r in results],
            extras=[r.extras() for r in results],
        )
        bar.update(len(chunk))
    bar.close()
    return writer.finish()
