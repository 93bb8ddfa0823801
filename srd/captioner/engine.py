"""Training engine shared by the clean pretrain, the backdoor attack and the SRD refine-tune.

AdamW (weight decay only on gated cross-attention weights, as the reference), a warm-up + cosine
(or linear/constant) schedule stepped per batch, gradient clipping, loss on caption tokens only, a
checkpoint per epoch (trainable weights + optimizer + scheduler + epoch + config) and resume.
Runs under plain ``python`` and under ``accelerate launch``/``torchrun`` with several processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType, PartialState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from srd import captions
from srd.captioner.checkpoint import set_trainable, trainable_state_dict
from srd.captioner.flamingo import Captioner, check_mixed_precision
from srd.captioner.runfiles import (
    CHECKPOINT_PREFIX,
    FINAL_WEIGHTS,
    checkpoint_paths,
    holds_training,
    prune_checkpoints,
)
from srd.captioner.sampling import EPOCH_SAMPLINGS, epoch_sampler
from srd.captioner.weights import write_checkpoint_file
from srd.config import arg
from srd.errors import SRDError
from srd.flags import COUNT, SEED, SHARE, at_least, positive
from srd.io import ensure_dir, is_finished, mark_finished, write_json, write_text, writer_lock
from srd.runs import check_run_config, check_run_name

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
STEP_LOG = "step_log.jsonl"

EPOCH_CAPTIONS_HELP = (
    "caption samples an epoch draws per image, redrawn every epoch (0: all of them; "
    "srd/budgets.py sets the benchmark's)"
)

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
"""``loss_fn(model, batch) -> (loss, parts)``: a training loss in place of the caption loss."""


def process_state() -> PartialState:
    """accelerate's process state, created so that torchrun's CPU ranks form one group.

    accelerate only treats ``torchrun --nproc_per_node K`` on a CPU-only machine as MULTI_CPU
    (gloo) when the state is created with ``cpu=True``; otherwise each rank silently runs the
    whole job alone, all writing the same files. Entry points call this before anything else
    creates the state (accelerate keeps the first one). More processes on a machine than it has
    GPUs is refused: each process takes the GPU of its local rank.
    """
    local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if torch.cuda.is_available() and local >= gpus:  # (accelerate: "invalid device ordinal")
        raise SRDError(
            f"process {local} of this machine has no GPU of its own ({gpus} visible): launch one "
            "process per GPU, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run CPU processes"
        )
    state = PartialState(cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate sees {state.num_processes}: "
            "call srd.captioner.engine.process_state() before creating PartialState/Accelerator"
        )
    return state


@dataclass
class TrainArgs:
    """Training: run folder, optimiser, schedule, checkpoints."""

    run_name: str = arg("run", help="run folder name under --external_save_dir")
    external_save_dir: str = arg("checkpoints_remote", help="folder holding run folders")
    batch_size: int = arg(32, help="per-process batch size", check=COUNT)
    num_epochs: int = arg(5, help="training epochs", check=COUNT)
    learning_rate: float = arg(1e-4, help="peak learning rate (AdamW)", check=positive())
    lr_scheduler: str = arg(
        "cosine", help="schedule after warm-up", choices=["constant", "linear", "cosine"]
    )
    warmup_steps_ratio: float = arg(0.01, help="share of all steps spent warming up", check=SHARE)
    weight_decay: float = arg(
        0.1, help="AdamW weight decay on gated cross-attention weights", check=at_least(0)
    )
    max_grad_norm: float = arg(1.0, help="gradient clipping norm", check=positive())
    trainable: str = arg(
        "paper",
        help="paper: perceiver + cross-attention + embeddings; lm: all but the vision tower; "
        "all: everything",
        choices=["paper", "lm", "all"],
    )
    seed: int = arg(
        42, help="seed for initialisation, shuffling and per-sample randomness", check=SEED
    )
    resume_from_checkpoint: bool = arg(False, help="continue the run from its last checkpoint")
    save_total_limit: int = arg(
        0,
        help="keep only the newest N epoch checkpoints (0: keep all); final weights stay",
        check=at_least(0),
    )
    overwrite: bool = arg(False, help="redo a run folder that already finished")
    num_workers: int = arg(0, help="data loader worker processes", check=at_least(0))
    epoch_captions_per_image: int = arg(0, help=EPOCH_CAPTIONS_HELP, check=at_least(0))
    max_steps: int = arg(
        0,
        help="stop after this many optimizer steps, the schedule laid over them (0: every step "
        "of --num_epochs; a light budget, e.g. the published clean fine-tune's ~126)",
        check=at_least(0),
    )
    epoch_sampling: str = arg(
        "shuffle",
        help="shuffle (ours): every sample once per epoch, reshuffled each epoch; "
        "fixed_replacement (the reference's, its B14/B21): one seeded draw of as many samples "
        "with replacement (~37%% never drawn), replayed every epoch",
        choices=list(EPOCH_SAMPLINGS),
    )
    feature_cache: bool = arg(
        True,
        help="compute the frozen vision tower's tokens once per image version and reuse them "
        "(ignored when the tower trains)",
    )
    feature_cache_mb: float = arg(
        4096,
        help="most MiB of cached tower features kept (beyond it features are recomputed)",
        check=at_least(0),
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.external_save_dir) / check_run_name(self.run_name, "--run_name")


@dataclass(frozen=True)
class Sample:
    """One training pair: the caption (already transformed by any attack) and its ids."""

    caption_id: int
    image_id: int
    caption: str


class CaptionDataset(Dataset):
    """Samples paired with an image provider ``image_fn(sample) -> uint8 (224, 224, 3)``.

    The provider is where attacks stamp triggers and SRD swaps in masked images, by id.
    """

    def __init__(self, samples: Sequence[Sample], image_fn: Callable[[Sample], np.ndarray]):
        if not samples:
            raise SRDError("no training samples (empty dataset)")
        self.samples = list(samples)
        self.image_fn = image_fn

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        sample = self.samples[index]
        return self.image_fn(sample), captions.training_text(sample.caption)


class Collator:
    """Images -> vision_x; texts -> right-padded ids with BOS/EOS and caption-only labels.

    ``vision_fn`` turns uint8 images into the model's vision input (``Captioner.vision_inputs``:
    pixels, or cached tower tokens). Without one the batch keeps the uint8 images as
    ``"images"`` (a list): :func:`train` turns them into ``vision_x`` in the main process, so
    that DataLoader workers only read files and the tower (and its feature cache) never runs
    in a worker.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vision_fn: Callable[[Sequence[np.ndarray]], torch.Tensor] | None,
        max_length: int = 128,
    ):
        self.tokenizer = tokenizer
        self.vision_fn = vision_fn
        self.max_length = max_length

    def __call__(self, batch: Sequence[tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
        images, texts = zip(*batch, strict=True)
        tok = self.tokenizer
        tok.padding_side = "right"
        wrapped = [tok.bos_token + t + tok.eos_token for t in texts]
        enc = tok(
            wrapped,
            return_tensors="pt",
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=False,
        )
        vision = (
            {"images": list(images)}
            if self.vision_fn is None
            else {"vision_x": self.vision_fn(images)}
        )
        return {
            **vision,
            "lang_x": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": caption_labels(enc["input_ids"], tok),
        }


def trained_steps(run_dir: str | Path) -> int | None:
    """Optimizer steps a run trained, as its last train-log entry records (None: no entry)."""
    path = Path(run_dir) / TRAIN_LOG
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    lines = [line for line in lines if line.strip()]
    return int(json.loads(lines[-1])["step"]) if lines else None


def caption_labels(input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Labels for the LM loss: -100 everywhere except the caption, ``<|endofchunk|>`` and EOS.

    Masked: padding, position 0, everything up to and including the first ``<answer>``, and
    every ``<image>``/``<answer>`` token (reference §4.3).
    """
    labels = input_ids.clone()
    answer_id = tokenizer.convert_tokens_to_ids(captions.ANSWER_TOKEN)
    image_id = tokenizer.convert_tokens_to_ids(captions.IMAGE_TOKEN)
    labels[input_ids == tokenizer.pad_token_id] = -100
    labels[:, 0] = -100
    for row in range(input_ids.shape[0]):
        hits = (input_ids[row] == answer_id).nonzero()
        if len(hits):
            labels[row, : int(hits[0]) + 1] = -100
    labels[(input_ids == answer_id) | (input_ids == image_id)] = -100
    return labels


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; decay only on gated cross-attention weights (not gates, norms or biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = "gated_cross_attn_layer" in name and not any(
            s in name for s in ("ff_gate", "attn_gate", "norm", "bias")
        )
        (decay if wd else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    """The training Accelerator: devices from the launcher, autocast ``mixed_precision`` with
    fp32 master weights (the optimizer steps fp32 parameters), seedable sampling.

    A launcher that asks for mixed precision (``accelerate launch --mixed_precision X`` or an
    accelerate config file, e.g. the DeepSpeed one in ``run/accelerate/``) must agree with
    ``--mixed_precision``.
    """
    state = process_state()
    check_mixed_precision(mixed_precision, state.device)
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher not in (None, "no", mixed_precision):
        raise SRDError(
            f"--mixed_precision {mixed_precision}: the launcher asks for {launcher} "
            "(accelerate launch/config); pass the same value"
        )
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def load_trainable_strictly(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path
) -> None:
    """Resume: the checkpoint must hold exactly the trainable tensors, each of the right shape."""
    want = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise SRDError(
            f"{path}: does not match the trainable parameters ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, e.g. {what}); pass --overwrite to start again"
        )
    wrong = [n for n in want if tuple(want[n].shape) != tuple(state[n].shape)]
    if wrong:
        raise SRDError(f"{path}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}")
    with torch.no_grad():
        for name, param in want.items():
            param.copy_(state[name])


def train(
    captioner: Captioner,
    dataset: CaptionDataset,
    args: TrainArgs,
    record: dict[str, Any],
    accelerator: Accelerator | None = None,
    finish: bool = True,
    loss_fn: LossFn | None = None,
) -> Path:
    """Train ``captioner.model`` in place; returns the path of ``final_weights.pt``.

    ``record`` is the run's resolved configuration; it is stored in every checkpoint (it must
    hold only JSON types) and in ``config.json``; a run folder whose ``config.json`` records
    another config is refused (srd.runs). ``finish=False`` leaves the DONE marker to a caller
    that writes more outputs after training. ``loss_fn`` (e.g. a defense's loss) replaces the
    caption loss; it gets the model as accelerate prepared it and the batch, and its ``parts``
    are logged per step in ``step_log.jsonl`` and averaged per epoch in ``train_log.jsonl``.
    """
    run_dir = args.run_dir
    if args.save_total_limit < 0:
        raise SRDError(f"--save_total_limit {args.save_total_limit}: expected 0 (all) or more")
    accelerator = accelerator or make_accelerator(captioner.args.mixed_precision)
    main = accelerator.is_main_process
    # --overwrite wins over --resume_from_checkpoint (run_train.sh always passes the latter)
    existing = checkpoint_paths(run_dir) if run_dir.exists() and not args.overwrite else []
    if is_finished(run_dir) and not args.overwrite:
        raise SRDError(f"--run_name {args.run_name}: {run_dir} already finished (pass --overwrite)")
    if not args.overwrite and holds_training(run_dir):  # on every rank, before any write
        check_run_config(run_dir, record, f"--run_name {args.run_name}")
    if existing and not (args.resume_from_checkpoint or args.overwrite):
        raise SRDError(
            f"--run_name {args.run_name}: {run_dir} holds checkpoints of an unfinished run; "
            "pass --resume_from_checkpoint to continue it or --overwrite to start again"
        )
    sampler = epoch_sampler(dataset.samples, args)  # (None: the loader's shuffle)
    sampled = len(sampler or dataset)
    steps = math.ceil(math.ceil(sampled / args.batch_size) / accelerator.num_processes)
    if args.max_steps > steps * args.num_epochs:  # never fewer steps than asked, without a word
        raise SRDError(
            f"--max_steps {args.max_steps}: more than the {steps * args.num_epochs} steps of "
            f"--num_epochs {args.num_epochs}; raise --num_epochs"
        )
    if main:
        ensure_dir(run_dir, "--external_save_dir")
    with writer_lock(run_dir, "--run_name") if main else nullcontext():  # one writer per run
        return _train_checked(captioner, dataset, args, record, accelerator, existing, finish,
                              loss_fn, sampler, steps)  # fmt: skip


def _train_checked(
    captioner: Captioner,
    dataset: CaptionDataset,
    args: TrainArgs,
    record: dict[str, Any],
    accelerator: Accelerator,
    existing: list[Path],
    finish: bool,
    loss_fn: LossFn | None,
    sampler: Sampler[int] | None,
    steps_per_epoch: int,
) -> Path:
    """:func:`train` once its checks passed (under the run's writer lock on the main process)."""
    run_dir = args.run_dir
    main = accelerator.is_main_process
    if main:
        if args.overwrite:
            stale = [run_dir / "DONE", *checkpoint_paths(run_dir), run_dir / FINAL_WEIGHTS]
            for p in [*stale, run_dir / TRAIN_LOG, run_dir / STEP_LOG]:
                p.unlink(missing_ok=True)
        write_json(run_dir / "config.json", record)
    accelerator.wait_for_everyone()

    set_seed(args.seed)
    model = captioner.model
    set_trainable(model, args.trainable)
    model.train()
    tower_frozen = not any(p.requires_grad for p in model.vision_encoder.parameters())
    if args.feature_cache and tower_frozen:
        captioner.enable_feature_cache(args.feature_cache_mb)
    else:
        captioner.feature_cache = None
    optimizer = make_optimizer(model, args.learning_rate, args.weight_decay)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        collate_fn=Collator(captioner.tokenizer, None),  # vision_x made below, in this process
        num_workers=args.num_workers,
        drop_last=False,
    )
    limit = args.max_steps or steps_per_epoch * args.num_epochs  # (train() checked it)
    total_steps = limit * accelerator.num_processes
    scheduler = get_scheduler(
        args.lr_scheduler if args.lr_scheduler != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=int(total_steps * args.warmup_steps_ratio),
        num_training_steps=total_steps,
    )

    start_epoch = 0
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if existing and args.resume_from_checkpoint:
        last = existing[-1]
        state = torch.load(last, map_location="cpu", weights_only=True)
        before = state.get("num_epochs")
        if before is not None and before != args.num_epochs:
            # the schedule is laid out over num_epochs: a different value would not resume it
            raise SRDError(
                f"--num_epochs {args.num_epochs}: {last} belongs to a {before}-epoch run; "
                "resume with the same value or pass --overwrite"
            )
        if deepspeed or state.get("optimizer_state_dict") is None:
            # ZeRO shards the AdamW state over the ranks; the main process alone cannot save it
            raise SRDError(
                f"--resume_from_checkpoint: {last} cannot be resumed (runs under DeepSpeed keep "
                "no optimizer state in epoch checkpoints); pass --overwrite to start again"
            )
        load_trainable_strictly(model, state["model_state_dict"], last)
        optimizer.load_state_dict(state["optimizer_state_dict"])
        scheduler.load_state_dict(state["lr_scheduler_state_dict"])
        start_epoch = int(state["epoch"]) + 1
        log.info("resuming %s from %s (next epoch %d)", run_dir, last.name, start_epoch)

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    log_path, step_path = run_dir / TRAIN_LOG, run_dir / STEP_LOG
    for path in (log_path, step_path):  # drop entries of epochs a killed run never saved
        if main and path.is_file():
            kept = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            kept = [ln for ln in kept if json.loads(ln).get("epoch", start_epoch) < start_epoch]
            write_text(path, "".join(ln + "\n" for ln in kept))
    step = start_epoch * steps_per_epoch
    last_epoch = start_epoch - 1
    for epoch in range(start_epoch, args.num_epochs):
        if step >= limit:  # --max_steps reached (a resumed run that had finished training)
            break
        last_epoch = epoch
        loader.set_epoch(epoch)
        if captioner.feature_cache is not None:
            captioner.feature_cache.check()
        epoch_start = time.perf_counter()
        losses, step_parts = [], []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.num_epochs}", disable=not main)
        for batch in bar:
            # the tower (or its cache) runs here, never in a DataLoader worker: one cache per
            # run, filled once, and no CUDA call in a forked worker
            images = batch.pop("images")
            batch["vision_x"] = captioner.vision_inputs(images).to(accelerator.device)
            if loss_fn is None:
                loss_t = model(
                    vision_x=batch["vision_x"],
                    lang_x=batch["lang_x"],
                    attention_mask=batch["attention_mask"],
                    labels=batch["labels"],
                ).loss
                parts: dict[str, float] = {}
            else:
                loss_t, parts = loss_fn(model, batch)
            accelerator.backward(loss_t)
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = float(accelerator.reduce(loss_t.detach(), reduction="mean"))
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}")
            if parts and main:  # the main process's own parts (not reduced over ranks)
                step_parts.append(parts)
                with open(step_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"epoch": epoch, "step": step, **parts}) + "\n")
            if step >= limit:
                break
        if main:
            entry = {
                "epoch": epoch,
                "step": step,
                "loss": float(np.mean(losses)) if losses else None,
                "lr": scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - epoch_start, 2),
                "feature_cache": captioner.feature_cache is not None,
                # CPU results differ with the thread count (reduction order), and the
                # difference grows: an attack's ASR moved by 18 points (docs/pipeline.md)
                "torch_threads": torch.get_num_threads(),
                "processes": accelerator.num_processes,
            }
            for key in step_parts[0] if step_parts else ():
                entry[f"mean_{key}"] = float(np.mean([p[key] for p in step_parts]))
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            log.info("epoch %d: mean loss %.4f", epoch, entry["loss"] or float("nan"))
            weights = trainable_state_dict(accelerator.unwrap_model(model))
            write_checkpoint_file(
                run_dir / f"{CHECKPOINT_PREFIX}{epoch}.pt",
                {
                    "model_state_dict": weights,
                    "optimizer_state_dict": None
                    if deepspeed
                    else optimizer.optimizer.state_dict()
                    if hasattr(optimizer, "optimizer")
                    else optimizer.state_dict(),
                    "lr_scheduler_state_dict": scheduler.scheduler.state_dict()
                    if hasattr(scheduler, "scheduler")
                    else scheduler.state_dict(),
                    "epoch": epoch,
                    "num_epochs": args.num_epochs,
                    "config": record,
                },
            )
            prune_checkpoints(run_dir, args.save_total_limit)
        accelerator.wait_for_everyone()

    final = run_dir / FINAL_WEIGHTS
    if main:
        weights = trainable_state_dict(accelerator.unwrap_model(model))
        write_checkpoint_file(
            final, {"model_state_dict": weights, "epoch": last_epoch, "config": record}
        )
        if finish:
            mark_finished(run_dir)
    accelerator.wait_for_everyone()
    captioner.model = accelerator.unwrap_model(model)
    return final
