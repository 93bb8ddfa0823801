"""What every SRD entry point reads: its flags (:class:`SRDArgs`, :class:`SFSArgs`), the
reference captioner and SFS scorer, and the defender's training data as the attack left it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from srd.attacks.registry import Attack
from srd.attacks.trainset import PoisonPlan, TrainingImages
from srd.captioner.args import (
    EMBEDDED_DIR,
    FLAMINGO_CHECKPOINT,
    LM_FOLDER,
    VISION_WEIGHTS,
    ModelArgs,
    with_overrides,
)
from srd.captioner.factory import load_captioner
from srd.config import arg
from srd.data.records import EMBEDDED_DATA, ImageRecord
from srd.defenses.srd.env import captioner_caption_fn
from srd.errors import SRDError
from srd.evaluation.scorers import BlipCaptioner
from srd.evaluation.sfs import SFSModelArgs, SFSScorer
from srd.evaluation.sfs import load_scorer as sfs_scorer
from srd.flags import COUNT
from srd.io import require_files
from srd.runs import input_digests

log = logging.getLogger(__name__)


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
    benign_control: bool = arg(
        False,
        help="the benign control: the chain on the clean captioner (--checkpoint_path) with the "
        "defender's data as if no caption were poisoned (D4: train/defend.py --benign_control)",
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

    @property
    def reward_branches(self) -> Path:
        """Which reward-table rows D2's transitions fell into (``eval/reward_branches.py``)."""
        return self.policy_file.with_suffix(".reward_branches.json")

    @property
    def greedy_coverage(self) -> Path:
        """Where the policy's greedy squares land against the real trigger
        (``eval/srd_coverage.py --squares greedy``; its heat-map is the same name as .png)."""
        return self.policy_file.with_suffix(".coverage.json")


DEFAULT_CAPTION_BATCH_SIZE = 64
"""``--caption_batch_size``'s default."""


def without_default_batch(config: dict[str, Any]) -> dict[str, Any]:
    """A D1 pool's or D3 cleaning run's identity: ``config`` less ``caption_batch_size`` when
    it is the default. Another batch size is part of it: on 96 training images of the embedded
    chain the beam captions were the same at 64, 16 and 1, but S_sem moved by up to 1.4e-7
    (docs/timings/caption-batch-size.txt), enough to flip a reward sitting on a threshold. The
    default is left out so that the identities of runs made before it counted stay theirs."""
    if config.get("caption_batch_size") == DEFAULT_CAPTION_BATCH_SIZE:
        return {k: v for k, v in config.items() if k != "caption_batch_size"}
    return config


@dataclass
class SFSArgs(SFSModelArgs):
    """SFS reward: reference captioner, text embedder, fluency LM, and captioning settings."""

    reference_checkpoint_path: str = arg(
        str(EMBEDDED_DIR / FLAMINGO_CHECKPOINT),
        help="clean reference captioner: a checkpoint loaded with the model flags (LM and "
        "vision tower of the defended model; the paper uses BLIP-large: see --blip_model)",
    )
    reference_model_dir: str | None = arg(
        None,
        help="an exported captioner folder (vision.safetensors, lm/, checkpoint.pt, as "
        "train/pretrain.py --export_dir writes) as the reference, with its own LM and tower "
        "weights, in place of --reference_checkpoint_path: a reference that is not the "
        "defended model's starting point (ours; the paper's is BLIP)",
    )
    annotations_path: str | None = arg(
        str(EMBEDDED_DATA / "captions_train2014.json"),
        help="COCO caption annotations whose captions fit the n-gram fluency LM "
        "(used when --gpt_model is not given)",
    )
    num_beams: int = arg(
        3, help="beam width of the backdoored captioner (reference: 3)", check=COUNT
    )
    max_new_tokens: int = arg(
        20, help="longest caption of the backdoored captioner (tokens)", check=COUNT
    )
    reference_num_beams: int = arg(
        5, help="beam width of the reference captioner (reference: 5)", check=COUNT
    )
    caption_batch_size: int = arg(
        DEFAULT_CAPTION_BATCH_SIZE,
        help="images per captioning/scoring batch (and D1/D3 chunk); part of a pool's and a "
        "cleaning run's identity, so a resume keeps it",
        check=COUNT,
    )


def vlm_caption_fn(captioner: Any, sfs: SFSArgs) -> CaptionFn:
    """Captions of the backdoored captioner with the SFS flags' decoding."""
    return captioner_caption_fn(
        captioner,
        num_beams=sfs.num_beams,
        max_new_tokens=sfs.max_new_tokens,
        batch_size=sfs.caption_batch_size,
    )


def reference_source(sfs: SFSArgs) -> tuple[str, str | None]:
    """(flag, path) of the reference captioner the flags choose: ``--blip_model`` (path None:
    a hub id or folder BLIP loads itself), ``--reference_model_dir`` (a folder) or
    ``--reference_checkpoint_path`` (a file); SRDError when both of the first two are given."""
    if sfs.blip_model and sfs.reference_model_dir:
        raise SRDError("--reference_model_dir: give it or --blip_model, not both")
    if sfs.blip_model:
        return "--blip_model", None
    if sfs.reference_model_dir:
        return "--reference_model_dir", sfs.reference_model_dir
    return "--reference_checkpoint_path", sfs.reference_checkpoint_path


def check_reference(sfs: SFSArgs) -> None:
    """SRDError naming the flag when the chosen reference's files are missing (before any
    model is loaded)."""
    flag, path = reference_source(sfs)
    if path is None:
        return
    if flag == "--reference_checkpoint_path":
        require_files((flag, path))
        return
    for item in (FLAMINGO_CHECKPOINT, VISION_WEIGHTS, LM_FOLDER):
        if not (Path(path) / item).exists():
            raise SRDError(f"{flag} {path}: {item} not found (an exported captioner folder)")


def record_reference(record: dict[str, Any], sfs: SFSArgs) -> None:
    """Put the reference captioner's identity in a stage's config ``record`` (made with
    :func:`srd.config.to_dict`): ``--reference_model_dir`` with the digest of its files, or
    nothing when it is unset (so runs made before the flag keep their identity)."""
    if sfs.reference_model_dir is None:
        record.pop("reference_model_dir", None)
    else:
        record.update(input_digests({"reference_model_dir": sfs.reference_model_dir}))


def load_reference_captioner(
    sfs: SFSArgs,
    model_args: ModelArgs,
    device: Any,
    max_new_tokens: int,
    blip_min_length: int = 0,
) -> tuple[CaptionFn, str]:
    """(reference captioner, description): BLIP with ``--blip_model``, else a clean captioner
    (``--reference_model_dir``'s, or ``--reference_checkpoint_path`` with the model flags).

    Greedy beam search with ``--reference_num_beams`` beams (reference §7.2: D1 BLIP 10-100
    tokens, D3 BLIP up to 20); ``blip_min_length`` only applies to BLIP.
    """
    flag, path = reference_source(sfs)
    if flag == "--blip_model":
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
    overrides: dict[str, Any] = {"checkpoint_path": sfs.reference_checkpoint_path}
    if flag == "--reference_model_dir":
        folder = Path(path)
        overrides = {
            "checkpoint_path": str(folder / FLAMINGO_CHECKPOINT),
            "lm_path": str(folder / LM_FOLDER),
            "lm_tokenizer_path": None,
            "vision_encoder_pretrained": str(folder / VISION_WEIGHTS),
        }
    try:
        captioner = load_captioner(with_overrides(model_args, **overrides), device=device)
    except SRDError as exc:  # the model code names its own flags; this is another one
        message = str(exc)
        for own in ("--checkpoint_path", "--lm_path", "--vision_encoder_pretrained"):
            message = message.replace(own, flag, 1)
        raise SRDError(message) from None

    def caption(images: list[np.ndarray]) -> list[str]:
        return captioner.caption(
            images,
            batch_size=sfs.caption_batch_size,
            num_beams=sfs.reference_num_beams,
            max_new_tokens=max_new_tokens,
        )

    return caption, f"captioner:{path}"


def load_scorer(sfs: SFSArgs, device: Any, trust_remote_code: bool = False) -> SFSScorer:
    """The SFS scorer of the flags (:func:`srd.evaluation.sfs.load_scorer`, batched like the
    captions)."""
    return sfs_scorer(sfs, device, sfs.caption_batch_size, trust_remote_code)


# --------------------------------------------------------------------------------------------


def training_versions(
    records: Sequence[ImageRecord], plan: PoisonPlan, attack: Attack
) -> Callable[[int], np.ndarray]:
    """``version(image_id)``: the image as the defender's data holds it (triggered if any of
    its captions is poisoned), uint8 (224, 224, 3)."""
    return TrainingImages(records, attack, plan.ids).as_in_training_set
