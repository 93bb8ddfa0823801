"""Real-size OpenFlamingo: training steps, beam-search captions/s and peak memory (random weights).

Builds OpenFlamingo-3B's architecture through our factory with random weights (no download):
ViT-L-14 (pre-ln_post tokens), the OpenFlamingo perceiver (depth 6, 64 latents), an MPT-1B-sized
LM (width 2048, 24 blocks, vocabulary 50,432, GPT-NeoX-sized tokenizer) with gated
cross-attention before every block. Then it times a few training steps of the paper-trainable
parts (AdamW, fp32 master weights, ``--mixed_precision`` autocast, through accelerate as the
training engine does) and beam-search captioning at each ``--caption_batches`` size with a fixed
caption length (``--max_new_tokens`` generated for every image, the worst case). Prints and writes
a JSON record. ``--structure`` also runs the official-layout check of
:func:`srd.captioner.official.official_layout_report` (CPU, bf16) first.

GPU: ``python bench/bench_realsize.py --mixed_precision bf16 --caption_batches 1 64``
CPU (small): ``python bench/bench_realsize.py --lm_layers 2 --vision_encoder_path tiny-vit
--train_batch 2 --caption_batches 1 2 --max_new_tokens 4``
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import platform
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srd import captions
from srd.captioner.args import ModelArgs
from srd.captioner.checkpoint import set_trainable
from srd.captioner.engine import Collator, make_accelerator, make_optimizer
from srd.captioner.factory import build_flamingo
from srd.captioner.official import (
    OPENFLAMINGO_PERCEIVER,
    LMSize,
    official_layout_report,
    save_random_lm,
)
from srd.cli import run_main
from srd.config import arg, parse
from srd.flags import COUNT, SEED

log = logging.getLogger("bench_realsize")


@dataclasses.dataclass
class RealSizeArgs:
    """Real-size benchmark (random weights)."""

    vision_encoder_path: str = arg("ViT-L-14", help="open_clip vision config")
    lm_layers: int = arg(
        0, help="LM blocks (0: MPT-1B's 24); fewer for a small CPU run", check=COUNT
    )
    lm_width: int = arg(0, help="LM width (0: MPT-1B's 2048)")
    mixed_precision: str = arg("no", help="autocast dtype", choices=["no", "bf16", "fp16"])
    train_steps: int = arg(3, help="timed training steps (after one warm-up step; 0: skip)")
    train_batch: int = arg(8, help="training batch size")
    caption_batches: list[int] = arg([1, 64], help="captioning batch sizes to time")
    caption_rounds: int = arg(1, help="timed generate calls per batch size (after a warm-up)")
    num_beams: int = arg(3, help="beam width (reference: 3)", check=COUNT)
    max_new_tokens: int = arg(
        20, help="tokens generated per caption (reference: at most 20)", check=COUNT
    )
    structure: bool = arg(False, help="first run the official-layout structure check")
    work_dir: str = arg("", help="scratch folder for the random LM (default: a temp folder)")
    out: str = arg("", help="write the JSON record here too")
    seed: int = arg(0, help="seed of the random weights and images", check=SEED)


def _peak() -> dict[str, float]:
    peak = {"cpu_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        peak["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak["gpu_max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return peak


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _images(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


def train_steps(cap: Any, cfg: RealSizeArgs, rng: np.random.Generator) -> dict[str, Any]:
    """Time ``cfg.train_steps`` optimizer steps (after one warm-up) as the engine runs them."""
    accelerator = make_accelerator(cfg.mixed_precision)
    set_trainable(cap.model, "paper")
    cap.model.train()
    optimizer = make_optimizer(cap.model, 1e-4, 0.1)
    model, optimizer = accelerator.prepare(cap.model, optimizer)
    collate = Collator(cap.tokenizer, cap.image_transform)
    text = captions.training_text("A banana on a table next to a cup of coffee and a red apple.")
    batch = collate([(im, text) for im in _images(cfg.train_batch, rng)])
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    _reset_peak()
    times, losses = [], []
    for step in range(cfg.train_steps + 1):
        _sync()
        start = time.perf_counter()
        out = model(**batch)
        accelerator.backward(out.loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        if step:  # step 0 is the warm-up
            times.append(time.perf_counter() - start)
        losses.append(float(out.loss.detach()))
    cap.model = accelerator.unwrap_model(model)
    result = {
        "batch": cfg.train_batch,
        "tokens_per_sample": int(batch["lang_x"].shape[1]),
        "steps": cfg.train_steps,
        "s_per_step": float(np.mean(times)),
        "samples_per_s": cfg.train_batch / float(np.mean(times)),
        "losses": losses,
        "peak": _peak(),
    }
    del optimizer, model, accelerator
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


@torch.no_grad()
def caption_rate(cap: Any, batch: int, cfg: RealSizeArgs, rng: np.random.Generator) -> dict:
    """Beam-search captions per second at ``batch`` (every caption ``max_new_tokens`` long)."""
    cap.model.eval()
    images = _images(batch, rng)
    _reset_peak()
    times = []
    for round_ in range(cfg.caption_rounds + 1):
        _sync()
        start = time.perf_counter()
        out = cap.caption(
            images,
            batch_size=batch,
            num_beams=cfg.num_beams,
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.max_new_tokens,
        )
        _sync()
        if round_:
            times.append(time.perf_counter() - start)
    assert len(out) == batch
    seconds = float(np.mean(times))
    return {
        "batch": batch,
        "num_beams": cfg.num_beams,
        "new_tokens": cfg.max_new_tokens,
        "s_per_batch": seconds,
        "captions_per_s": batch / seconds,
        "peak": _peak(),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    (cfg,) = parse(argv, RealSizeArgs, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": dataclasses.asdict(cfg),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(cfg.work_dir or tmp)
        if cfg.structure:
            start = time.perf_counter()
            report = official_layout_report(
                work / "structure", "ViT-L-14", LMSize.mpt_1b(), torch.bfloat16
            )
            report["seconds"] = time.perf_counter() - start
            record["structure"] = report
            log.info("structure: %s", json.dumps(report))
            gc.collect()
        base = LMSize.mpt_1b()
        size = dataclasses.replace(
            base, n_layers=cfg.lm_layers or base.n_layers, d_model=cfg.lm_width or base.d_model
        )
        lm_dir = save_random_lm(work / "lm", size, torch.bfloat16, cfg.seed)
        args = ModelArgs(
            vision_encoder_path=cfg.vision_encoder_path,
            vision_encoder_pretrained="none",
            lm_path=str(lm_dir),
            checkpoint_path="none",
            mixed_precision=cfg.mixed_precision,
            **OPENFLAMINGO_PERCEIVER,
        )
        start = time.perf_counter()
        cap = build_flamingo(args)  # fp32 master weights
        cap.model.to(device)
        record["build_seconds"] = time.perf_counter() - start
        record["lm"] = dataclasses.asdict(size)
        record["parameters"] = sum(p.numel() for p in cap.model.parameters())
        record["trainable_parameters"] = sum(
            p.numel() for p in cap.model.parameters() if p.requires_grad
        )
        if cfg.train_steps > 0:
            record["train"] = train_steps(cap, cfg, rng)
            log.info("train: %s", record["train"])
        with torch.no_grad():  # random gates are 0: open them so the image reaches the text
            for name, p in cap.model.named_parameters():
                if name.endswith(("attn_gate", "ff_gate")):
                    p.fill_(0.5)
        record["caption"] = [caption_rate(cap, b, cfg, rng) for b in cfg.caption_batches]
        for row in record["caption"]:
            log.info("caption: %s", row)
    record["peak"] = _peak()
    text = json.dumps(record, indent=1)
    print(text)
    if cfg.out:
        Path(cfg.out).write_text(text + "\n", encoding="utf-8")
    return record


if __name__ == "__main__":
    run_main(main)
