"""Throughput of the red-mask environment: env steps per second with 1 and 16 environments.

Each batched step captions N masked images in ONE captioner call and scores them in ONE scorer
call, so steps/s should grow with N. The pool is synthetic benchmark scenes with the SRD
surrogate trigger; baselines come from the same captioner and scorer on the unmasked images.
Prints figures; not a test.

Captioner (``--captioner``): ``model`` loads the captioner from the ModelArgs flags (the embedded
clean captioner by default, or the paper's with ``--lm_path`` etc.); ``random-tiny`` builds the
tiny architecture with random weights (same compute, junk captions); ``auto`` = ``model`` when
its checkpoint exists, else ``random-tiny``; ``cheap`` is a NumPy stand-in (no model at all).
Scorer: the real SFS scorer (MiniLM + n-gram fluency LM fitted on benchmark captions) unless
``--captioner cheap``. To plug in other callables, replace :func:`build_callables`.

Example: ``python bench/bench_env.py --num_envs 1 16 --transitions 64``
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from srd.attacks.triggers import stamp_random_noise
from srd.captioner.args import ModelArgs
from srd.captioner.factory import build_flamingo, load_captioner
from srd.captioner.tiny import build_word_tokenizer, create_tiny_lm
from srd.cli import run_main
from srd.config import arg, parse
from srd.data.scenes import render_scene, sample_scene, scene_captions
from srd.defenses.srd.env import (
    DEFAULT_OBS_SIZE,
    CaptionFn,
    MaskPool,
    ScoreFn,
    captioner_caption_fn,
    sfs_score_fn,
)
from srd.defenses.srd.vecenv import BatchedRedMaskVecEnv
from srd.errors import SRDError
from srd.evaluation.sfs import build_scorer
from srd.flags import COUNT, SEED, Range, between
from srd.geometry import NUM_ACTIONS
from srd.io import setup_logging

log = logging.getLogger("bench_env")


@dataclasses.dataclass
class BenchArgs:
    """Red-mask environment throughput benchmark."""

    num_envs: list[int] = arg(
        [1, 16], help="environment counts to measure, in one run", check=COUNT
    )
    transitions: int = arg(64, help="transitions timed per setting (after one warm-up step)")
    pool_size: int = arg(
        32,
        help="surrogate-triggered benchmark scenes in the pool",
        check=Range(low=1, also=(-1,), why="-1: all"),
    )
    obs_size: int = arg(
        DEFAULT_OBS_SIZE,
        help="policy observation side (224 = paper)",
        check=between(36, 224, why="NatureCNN needs at least 36 px; the canvas is 224"),
    )
    captioner: str = arg(
        "auto",
        help="model | random-tiny | auto (model if its checkpoint exists) | cheap (no model)",
        choices=["auto", "model", "random-tiny", "cheap"],
    )
    num_beams: int = arg(3, help="beam size of the captioner (reference: 3)", check=COUNT)
    max_new_tokens: int = arg(20, help="caption length limit (reference: 20)", check=COUNT)
    device: str = arg("cpu", help="torch device of the captioner and scorer")
    threads: int | None = arg(None, help="torch CPU threads (default: torch's choice)")
    seed: int = arg(0, help="seed of the pool, the environments and the actions", check=SEED)


def _random_tiny_captioner(fit_captions: Sequence[str], folder: Path, device: str):
    """The embedded architecture (tiny ViT + tiny Llama) with random weights."""
    lm_dir = create_tiny_lm(folder / "lm", build_word_tokenizer(fit_captions))
    args = ModelArgs(vision_encoder_pretrained="none", lm_path=str(lm_dir), checkpoint_path="none")
    cap = build_flamingo(args)
    cap.model.to(device).eval()
    return cap


def _cheap_callables() -> tuple[CaptionFn, ScoreFn]:
    """NumPy stand-ins: a caption from the mean colour, a word-overlap score."""

    def caption(images: list[np.ndarray]) -> list[str]:
        return [f"a {'red' if im[..., 0].mean() > 128 else 'plain'} scene." for im in images]

    def score(captions: list[str], refs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        sem = [
            len(set(c.split()) & set(r.split())) / max(len(set(r.split())), 1)
            for c, r in zip(captions, refs, strict=True)
        ]
        return np.array(sem), np.ones(len(captions))

    return caption, score


def build_callables(
    cfg: BenchArgs, model_args: ModelArgs, fit_captions: Sequence[str], workdir: Path
) -> tuple[CaptionFn, ScoreFn, str]:
    """(caption_fn, score_fn, description): replace this to benchmark other callables."""
    if cfg.captioner == "cheap":
        return (*_cheap_callables(), "cheap NumPy stand-ins")
    kind = cfg.captioner
    if kind == "auto":
        ckpt = model_args.checkpoint_path
        kind = (
            "model" if ckpt and ckpt.lower() != "none" and Path(ckpt).is_file() else "random-tiny"
        )
    if kind == "model":
        captioner = load_captioner(model_args, device=cfg.device)
        what = f"captioner from --lm_path {model_args.lm_path}"
    else:
        captioner = _random_tiny_captioner(fit_captions, workdir, cfg.device)
        what = "tiny captioner, random weights (no embedded checkpoint found)"
    scorer = build_scorer(reference_captions_for_ngram=fit_captions, device=cfg.device)

    caption = captioner_caption_fn(captioner, cfg.num_beams, cfg.max_new_tokens)
    return caption, sfs_score_fn(scorer), f"{what}; SFS scorer (MiniLM + n-gram fluency)"


def build_pool(
    cfg: BenchArgs, caption_fn: CaptionFn, score_fn: ScoreFn
) -> tuple[MaskPool, list[str]]:
    """Surrogate-triggered scenes with their baselines; also returns captions to fit LMs on."""
    rng = np.random.default_rng(cfg.seed)
    scenes = [sample_scene(rng) for _ in range(cfg.pool_size)]
    images = np.stack(
        [stamp_random_noise(np.asarray(render_scene(s)), rng) for s in scenes]
    ).astype(np.uint8)
    references = [scene_captions(s, rng, 1)[0] for s in scenes]
    sem, flu = score_fn(caption_fn(list(images)), references)
    ids = [f"scene{i:05d}" for i in range(cfg.pool_size)]
    return MaskPool(images, sem, flu, references, ids, source="benchmark pool"), references


def measure(
    pool: MaskPool, caption_fn: CaptionFn, score_fn: ScoreFn, cfg: BenchArgs, n: int
) -> float:
    """Env transitions per second with ``n`` environments stepped together."""
    env = BatchedRedMaskVecEnv(
        pool, caption_fn, score_fn, num_envs=n, obs_size=cfg.obs_size, seed=cfg.seed
    )
    rng = np.random.default_rng(cfg.seed)
    env.reset()
    env.step(rng.integers(0, NUM_ACTIONS, size=n))  # warm-up
    steps = max(1, -(-cfg.transitions // n))
    start = time.perf_counter()
    for _ in range(steps):
        env.step(rng.integers(0, NUM_ACTIONS, size=n))
    return steps * n / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> dict[int, float]:
    cfg, model_args = parse(argv, BenchArgs, ModelArgs, description=__doc__.splitlines()[0])
    if cfg.transitions < 1 or cfg.pool_size < 1 or any(n < 1 for n in cfg.num_envs):
        raise SRDError("--transitions, --pool_size and --num_envs must be >= 1")
    setup_logging(level=logging.WARNING)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    fit_captions = [scene_captions(sample_scene(rng), rng, 1)[0] for _ in range(2000)]
    with tempfile.TemporaryDirectory(prefix="bench_env_") as tmp:
        caption_fn, score_fn, what = build_callables(cfg, model_args, fit_captions, Path(tmp))
        pool, _ = build_pool(cfg, caption_fn, score_fn)
        print(f"callables  : {what}")
        print(f"device     : {cfg.device}, torch threads {torch.get_num_threads()}")
        print(f"pool       : {len(pool)} scenes, obs {cfg.obs_size}x{cfg.obs_size}")
        figures = {}
        for n in cfg.num_envs:
            figures[n] = measure(pool, caption_fn, score_fn, cfg, n)
            print(f"num_envs {n:3d}: {figures[n]:8.1f} env steps/s")
    return figures


if __name__ == "__main__":
    run_main(main)
