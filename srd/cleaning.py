"""SRD stages D3/D3b/D4 as library functions: cleaning training images with the agent.

Stage D3 (reference §10, B13, B14) gives every training image exactly one red square. For each
image it takes the version the defender's data holds (triggered when any caption of it is
poisoned), captions it with the backdoored captioner and a clean reference captioner (the
baseline ``S_sem``/``S_flu``), draws up to ``n_tries`` epsilon-greedy actions from the policy
(or one uniformly random action for the ablation), scores every distinct masked version and
keeps the mask chosen by :func:`srd.rl.agent.select_mask` (stop at +3, else the best positive,
else the last try). All work of a chunk of images is done in ONE captioning call and ONE scoring
call. Results go to a resumable shard (:class:`srd.shards.ShardWriter`) as action + reward per
image id: the masked image is ``apply_action(version, action)``, exact and compact.

Stage D3b (:func:`combine_clean_data`) merges the shards, checking nothing is missing or
duplicated; stage D4 turns the merged actions back into masked images by image id
(:func:`masked_training_actions`, reference B15: one masked image per image id, captions kept).

The flags shared by the SRD entry points live here too (:class:`SRDArgs`, :class:`SFSArgs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from srd.attacks import CONFIG_DIR, Attack, AttackConfig, build_attack
from srd.config import arg
from srd.data import EMBEDDED_DATA, ImageRecord, load_references
from srd.errors import SRDError
from srd.geometry import (
    GRID,
    IMAGE_SIZE,
    MASK_SIZES,
    NUM_ACTIONS,
    Square,
    apply_action,
    decode_action,
)
from srd.io import read_json, write_json
from srd.model import EMBEDDED_DIR, FLAMINGO_CHECKPOINT, ModelArgs, load_captioner, with_overrides
from srd.rl.agent import draw_try_actions, greedy_actions, select_mask
from srd.rl.env import captioner_caption_fn
from srd.rl.reward import RewardConfig, caption_rewards
from srd.sfs import BlipCaptioner, SFSScorer, build_scorer
from srd.shards import MERGED_FORMAT, ShardWriter, config_hash, merge_shards
from srd.trainset import PoisonPlan, TrainingImages
from srd.triggers import resolve_position

log = logging.getLogger(__name__)

CLEAN_CONFIG = "clean_config.json"
"""Written into the shard folder by D3: the cleaning run's id, config hash and config."""

MERGED_FILE = "merged.json"
"""Written into the shard folder by D3b: one record (action, reward, ...) per image id."""

CaptionFn = Callable[[list[np.ndarray]], list[str]]
ScoreFn = Callable[[list[str], list[str]], tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------------------------
# Flags shared by the SRD entry points


@dataclass
class SRDArgs:
    """SRD files: the RL pool, the policy, the cleaned-data shards, the poisoned training data."""

    save_data_path: str = arg(
        "checkpoints_remote/srd-badnet/pool",
        help="RL pool folder (one shard per D1 process + pool.json): written by D1, read by D2",
    )
    ppo_path: str = arg(
        "checkpoints_remote/srd-badnet/policy.zip",
        help="DQN policy zip: written by D2, read by D3 (reward log and curve beside it)",
    )
    clean_data_save: str = arg(
        "checkpoints_remote/srd-badnet/clean_data",
        help="cleaned-data shard folder: written by D3, merged by D3b (merged.json), read by D4",
    )
    poison_ids_path: str = arg(
        "checkpoints_remote/backdoor-badnet/poison_ids.json",
        help="the attack run's poison_ids.json, i.e. the defender's poisoned training data "
        "(which captions are poisoned, their text, the trigger): read by D3 and D4",
    )

    @property
    def policy_file(self) -> Path:
        """The policy zip (stable-baselines3 appends .zip to --ppo_path; so do we)."""
        path = Path(self.ppo_path)
        if path.suffix == ".zip" or path.is_file():  # a file named as given is read as given
            return path
        return path.with_name(path.name + ".zip")

    @property
    def reward_log(self) -> Path:
        """D2's reward log (JSON lines), beside the policy."""
        return self.policy_file.with_suffix(".rewards.jsonl")

    @property
    def reward_curve(self) -> Path:
        """D2's reward-curve PNG, beside the policy."""
        return self.policy_file.with_suffix(".rewards.png")

    @property
    def random_reward_log(self) -> Path:
        """D2's reward log of the random policy in the same environment, beside the policy."""
        return self.policy_file.with_suffix(".random_rewards.jsonl")

    @property
    def agent_report(self) -> Path:
        """D2's result: trained greedy policy vs random policy on the pool, beside the policy."""
        return self.policy_file.with_suffix(".agent_report.json")


@dataclass
class SFSArgs:
    """SFS reward: reference captioner, text embedder, fluency LM, and captioning settings."""

    reference_checkpoint_path: str = arg(
        str(EMBEDDED_DIR / FLAMINGO_CHECKPOINT),
        help="clean reference captioner: a checkpoint loaded with the model flags "
        "(the paper uses BLIP-large: see --blip_model)",
    )
    blip_model: str | None = arg(
        None, help="BLIP captioning folder or hub id used as reference captioner instead"
    )
    text_model: str | None = arg(
        None, help="sentence-transformers folder or hub id (default: offline all-MiniLM-L6-v2)"
    )
    gpt_model: str | None = arg(
        None, help="causal LM folder for the fluency perplexity (default: n-gram LM)"
    )
    annotations_path: str = arg(
        str(EMBEDDED_DATA / "captions_train2014.json"),
        help="COCO caption annotations whose captions fit the n-gram fluency LM "
        "(used when --gpt_model is not given)",
    )
    ngram_order: int = arg(3, help="order of the n-gram fluency LM")
    num_beams: int = arg(3, help="beam width of the backdoored captioner (reference: 3)")
    max_new_tokens: int = arg(20, help="longest caption of the backdoored captioner (tokens)")
    reference_num_beams: int = arg(5, help="beam width of the reference captioner (reference: 5)")
    caption_batch_size: int = arg(64, help="images per captioning/scoring batch (and D1/D3 chunk)")


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (streamed), to pin the exact inputs of a run."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_files(*flag_paths: tuple[str, str | os.PathLike | None]) -> None:
    """SRDError naming the flag of the first (flag, path) whose file is missing; paths that are
    None or 'none' are skipped. Run before loading models, so bad input fails in a second."""
    for flag, path in flag_paths:
        if path is None or str(path).lower() in ("", "none"):
            continue
        if not Path(path).is_file():
            raise SRDError(f"{flag} {path}: file not found")


def vlm_caption_fn(captioner: Any, sfs: SFSArgs) -> CaptionFn:
    """Captions of the backdoored captioner with the SFS flags' decoding."""
    return captioner_caption_fn(
        captioner,
        num_beams=sfs.num_beams,
        max_new_tokens=sfs.max_new_tokens,
        batch_size=sfs.caption_batch_size,
    )


def load_reference_captioner(
    sfs: SFSArgs,
    model_args: ModelArgs,
    device: Any,
    max_new_tokens: int,
    blip_min_length: int = 0,
) -> tuple[CaptionFn, str]:
    """(reference captioner, description): BLIP with ``--blip_model``, else the clean captioner.

    Greedy beam search with ``--reference_num_beams`` beams (reference §7.2: D1 BLIP 10-100
    tokens, D3 BLIP up to 20); ``blip_min_length`` only applies to BLIP.
    """
    if sfs.blip_model:
        blip = BlipCaptioner.from_pretrained(
            sfs.blip_model,
            device,
            sfs.caption_batch_size,
            generate_kwargs={
                "num_beams": sfs.reference_num_beams,
                "do_sample": False,
                "max_length": max_new_tokens,
                "min_length": blip_min_length,
            },
        )
        return blip, f"blip:{sfs.blip_model}"
    args = with_overrides(model_args, checkpoint_path=sfs.reference_checkpoint_path)
    try:
        captioner = load_captioner(args, device=device)
    except SRDError as exc:  # the model code names --checkpoint_path; this is another flag
        raise SRDError(
            str(exc).replace("--checkpoint_path", "--reference_checkpoint_path", 1)
        ) from None

    def caption(images: list[np.ndarray]) -> list[str]:
        return captioner.caption(
            images,
            batch_size=sfs.caption_batch_size,
            num_beams=sfs.reference_num_beams,
            max_new_tokens=max_new_tokens,
        )

    return caption, f"captioner:{sfs.reference_checkpoint_path}"


def load_scorer(sfs: SFSArgs, device: Any, trust_remote_code: bool = False) -> SFSScorer:
    """The SFS scorer of the flags (MiniLM + fluency LM; n-gram LM on --annotations_path)."""
    ngram_captions = None
    if not sfs.gpt_model:
        references = load_references(sfs.annotations_path, flag="--annotations_path")
        ngram_captions = [c for caps in references.values() for c in caps]
    return build_scorer(
        text_model=sfs.text_model,
        gpt_model=sfs.gpt_model,
        reference_captions_for_ngram=ngram_captions,
        device=device,
        batch_size=sfs.caption_batch_size,
        trust_remote_code=trust_remote_code,
        ngram_order=sfs.ngram_order,
    )


# --------------------------------------------------------------------------------------------
# The defender's training data


def plan_attack(plan: PoisonPlan, path: str | os.PathLike) -> Attack:
    """Rebuild the attack recorded in a poison plan, checking it is exactly the recorded one.

    The defender's data is "the poisoned training set": in this simulation the triggered images
    are materialised from the attack config the attack stage recorded in ``poison_ids.json``.
    The rebuilt config and trigger fingerprint must equal the recorded ones.
    """
    recorded = plan.meta.get("attack")
    if not isinstance(recorded, dict) or "kind" not in recorded:
        raise SRDError(f"--poison_ids_path {path}: no attack config recorded in the file")
    fields = {f.name for f in dataclasses.fields(AttackConfig)}
    config = {k: v for k, v in recorded.items() if k in fields}
    shipped = CONFIG_DIR / f"{config['kind']}.yaml"
    if not shipped.is_file():
        raise SRDError(f"--poison_ids_path {path}: unknown attack kind {config['kind']!r}")
    attack = build_attack(shipped, **config)
    rebuilt = attack.to_dict()
    differs = sorted(k for k in recorded if rebuilt.get(k) != recorded[k])
    if differs:
        raise SRDError(
            f"--poison_ids_path {path}: the recorded attack cannot be rebuilt exactly "
            f"({', '.join(differs)} differ)"
        )
    return attack


def training_versions(
    records: Sequence[ImageRecord], plan: PoisonPlan, attack: Attack
) -> Callable[[int], np.ndarray]:
    """``version(image_id)``: the image as the defender's data holds it (triggered if any of
    its captions is poisoned), uint8 (224, 224, 3)."""
    return TrainingImages(records, attack, plan.ids).as_in_training_set


# --------------------------------------------------------------------------------------------
# Tries


def image_rng(seed: int, image_id: int) -> np.random.Generator:
    """A generator per (seed, image): results do not depend on chunking, sharding or order."""
    return np.random.default_rng([int(seed), int(image_id), 3])


class TrySource(Protocol):
    """``tries(ids, images) -> actions``: the actions to try on each image, in order."""

    def __call__(self, ids: Sequence[int], images: Sequence[np.ndarray]) -> list[list[int]]: ...


class PolicyTries:
    """Up to ``n_tries`` epsilon-greedy actions of a DQN policy on the unmasked image.

    The observation never changes between tries, so the greedy action is computed once (one
    batched forward pass per chunk) and only the exploration draws differ (reference B13).
    """

    def __init__(self, policy: Any, n_tries: int = 5, epsilon: float = 0.05, seed: int = 0):
        if n_tries < 1:
            raise SRDError(f"--n_tries {n_tries}: must be at least 1")
        if not 0.0 <= epsilon <= 1.0:
            raise SRDError(f"--epsilon {epsilon}: must be in [0, 1]")
        self.policy = policy
        self.n_tries = n_tries
        self.epsilon = epsilon
        self.seed = seed

    def __call__(self, ids: Sequence[int], images: Sequence[np.ndarray]) -> list[list[int]]:
        greedy = greedy_actions(self.policy, list(images))
        return [
            [
                int(a)
                for a in draw_try_actions(
                    greedy[k : k + 1], self.n_tries, self.epsilon, image_rng(self.seed, i)
                )[0]
            ]
            for k, i in enumerate(ids)
        ]


class RandomTries:
    """The ablation: one uniformly random action per image, seeded per image."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, ids: Sequence[int], images: Sequence[np.ndarray]) -> list[list[int]]:
        return [[int(image_rng(self.seed, i).integers(NUM_ACTIONS))] for i in ids]


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


def prepare_clean_folder(folder: str | os.PathLike, run_id: str, config: Mapping[str, Any]) -> str:
    """Record the cleaning run in ``folder/clean_config.json``; returns its config hash.

    A folder already holding another cleaning run (different config) is refused, so shards of
    different runs never mix; the same run (a resume, or another shard) passes.
    """
    folder = Path(folder)
    digest = config_hash(config)
    path = folder / CLEAN_CONFIG
    record = {"run_id": run_id, "config_hash": digest, "config": dict(config)}
    if path.is_file():
        old = read_json(path, flag="--clean_data_save")
        if not isinstance(old, dict) or old.get("config_hash") != digest:
            before = old.get("config", {}) if isinstance(old, dict) else {}
            changed = sorted(k for k in set(config) | set(before) if before.get(k) != config.get(k))
            raise SRDError(
                f"--clean_data_save {folder}: holds another cleaning run "
                f"({', '.join(changed[:6]) or 'config'} differ); use another folder"
            )
    else:
        write_json(path, record)
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


# --------------------------------------------------------------------------------------------
# Merging (D3b) and use (D4)


def combine_clean_data(folder: str | os.PathLike, expected_ids: Sequence[int]) -> dict[str, Any]:
    """Merge the shards of ``folder`` into ``folder/merged.json`` (every expected id once).

    The merged record carries the cleaning run's config (``clean_config.json``), so D4 can check
    it refines on the same poisoned data.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SRDError(f"--clean_data_save {folder}: shard folder not found (run stage D3 first)")
    merged = merge_shards(folder, [str(i) for i in expected_ids])
    config_path = folder / CLEAN_CONFIG
    run = read_json(config_path, flag="--clean_data_save")
    if not isinstance(run, dict) or run.get("config_hash") != merged["config_hash"]:
        raise SRDError(f"--clean_data_save {config_path}: does not describe the shards' run")
    merged["clean_config"] = run
    rewards = np.array([r["reward"] for r in merged["records"]], dtype=np.float64)
    merged["reward_counts"] = {
        str(int(v)): int((rewards == v).sum()) for v in sorted(set(rewards.tolist()))
    }
    write_json(folder / MERGED_FILE, merged)
    log.info("merged %d images into %s", len(merged["records"]), folder / MERGED_FILE)
    return merged


def read_merged(folder: str | os.PathLike) -> dict[str, Any]:
    """``merged.json`` of a shard folder; SRDError naming the file when absent or malformed."""
    path = Path(folder) / MERGED_FILE
    if not path.is_file():
        raise SRDError(
            f"--clean_data_save {path}: file not found (run train/combine_data.py after D3)"
        )
    merged = read_json(path, flag="--clean_data_save")
    if not isinstance(merged, dict) or merged.get("format") != MERGED_FORMAT:
        raise SRDError(f"--clean_data_save {path}: not a merged cleaning manifest")
    return merged


def masked_training_actions(
    records: Sequence[ImageRecord], merged: Mapping[str, Any], source: str = "merged manifest"
) -> dict[int, int]:
    """{image id: kept red-mask action} for every training image, checked to cover them all."""
    actions = {int(r["id"]): int(r["action"]) for r in merged["records"]}
    wanted = {r.image_id for r in records}
    if set(actions) != wanted:
        missing = sorted(wanted - set(actions))
        extra = sorted(set(actions) - wanted)
        raise SRDError(
            f"{source}: does not cover the training images ({len(missing)} missing, "
            f"{len(extra)} unknown, e.g. {(missing or extra)[:3]})"
        )
    return actions


def masked_training_images(
    records: Sequence[ImageRecord],
    attack: Attack,
    plan: PoisonPlan,
    merged: Mapping[str, Any],
    source: str = "merged manifest",
) -> dict[int, np.ndarray]:
    """{image id: SRD-processed image (224, 224, 3) uint8} for every training image.

    The processed image is the kept red square on the version the defender's data holds
    (triggered if any caption of the image is poisoned); one per image id (reference B15).
    Materialises every image: D4 itself paints them on the fly
    (:class:`srd.trainset.TrainingImages` with ``mask_actions``); this serves inspection.
    """
    actions = masked_training_actions(records, merged, source)
    version = training_versions(records, plan, attack)
    return {
        i: apply_action(version(i), actions[i])
        for i in tqdm(sorted(actions), desc="D4 masked images", unit="img", leave=False)
    }


# --------------------------------------------------------------------------------------------
# Diagnosis: does the chosen square cover the real trigger?


def trigger_box(attack: Attack) -> Square | None:
    """The rows/cols the attack's patch trigger occupies on the canvas (None: no patch)."""
    if attack.trigger is None or attack.trigger.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
        return None  # no trigger (Shadowcast) or a whole-image pattern (Blended)
    h, w = attack.trigger.shape[:2]
    row, col = resolve_position(attack.config.position, (h, w), (IMAGE_SIZE, IMAGE_SIZE))
    return Square(top=row, bottom=row + h, left=col, right=col + w)


def covered_share(square: Square, box: Square) -> float:
    """Share of ``box``'s pixels inside ``square``."""
    rows = max(0, min(square.bottom, box.bottom) - max(square.top, box.top))
    cols = max(0, min(square.right, box.right) - max(square.left, box.left))
    return rows * cols / ((box.bottom - box.top) * (box.right - box.left))


def trigger_coverage(
    merged: dict[str, Any], attack: Attack, triggered_ids: set[int], threshold: float = 0.5
) -> dict[str, Any]:
    """How often the cleaning stage's square covers the real trigger on triggered images.

    See :func:`action_coverage`; the squares are the merged cleaning records' actions.
    """
    actions = {int(r["id"]): int(r["action"]) for r in merged["records"]}
    return action_coverage(actions, attack, triggered_ids, threshold)


def action_coverage(
    actions: Mapping[int, int], attack: Attack, triggered_ids: set[int], threshold: float = 0.5
) -> dict[str, Any]:
    """How often the square of ``actions`` (image id -> action) covers the real trigger.

    Returns the share of triggered images (those of ``triggered_ids`` with an action) whose
    square covers at least ``threshold`` of the patch, the mean covered share, and the nominal
    square sides chosen (all images). ``None`` shares for attacks without a patch trigger.
    """
    box = trigger_box(attack)
    shares = []
    sizes: dict[str, int] = {}
    for image_id, action in actions.items():
        square = decode_action(int(action))
        side = str(MASK_SIZES[int(action) // (GRID * GRID)])  # nominal side, before clipping
        sizes[side] = sizes.get(side, 0) + 1
        if box is not None and int(image_id) in triggered_ids:
            shares.append(covered_share(square, box))
    return {
        "attack": attack.name,
        "trigger_box": list(box) if box else None,
        "num_triggered_images": len(triggered_ids),
        "num_triggered_with_square": len(shares),
        "covered": float(np.mean(np.array(shares) >= threshold)) if shares else None,
        "mean_covered_share": float(np.mean(shares)) if shares else None,
        "threshold": threshold,
        "square_sides": dict(sorted(sizes.items(), key=lambda kv: int(kv[0]))),
    }
