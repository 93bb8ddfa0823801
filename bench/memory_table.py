"""Memory per stage and per rank at COCO-5k and full COCO, computed from shapes (no weights).

The model is built through our factory, the LM and cross-attention on PyTorch's ``meta`` device
(shapes only, no memory; the vision tower in bf16 because open_clip moves it to a device):
ViT-L-14 + OpenFlamingo perceiver + an MPT-1B-sized LM with cross-attention before every block,
GPT-NeoX vocabulary + Flamingo tokens (OpenFlamingo-3B). Parameter counts per part come from
those shapes; bytes follow from the dtypes each stage uses; data sizes from the dataset counts
and the decoded image size (224 x 224 x 3 uint8); RL-pool entries from their fixed-size fields
(caption text not counted). Activations are not included (they depend on
batch and sequence length; the real-size benchmark measures peaks). Prints a Markdown table.

``python bench/memory_table.py [--ranks 8] [--epochs 20] [--save_total_limit 2]``
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Sequence

import numpy as np
import torch

from srd.captioner.args import ModelArgs
from srd.captioner.factory import assemble_flamingo
from srd.captioner.lm import load_tokenizer
from srd.captioner.official import (
    OPENFLAMINGO_PERCEIVER,
    LMSize,
    build_sized_tokenizer,
    default_dtype,
    part_counts,
)
from srd.captioner.vision import build_vision_encoder
from srd.cli import run_main
from srd.config import arg, parse
from srd.data.records import DEFAULT_CACHE_MB, IMAGE_BYTES
from srd.flags import at_least

GIB = 2**30
POOL_ENTRY_BYTES = sum(np.dtype(t).itemsize for t in (np.int64, np.float64, np.float64, np.uint32))
"""One RL-pool entry's fixed-size fields (id, base S_sem, base S_flu, image CRC-32); its two
captions' text is not counted."""
DATASETS = {
    # Karpathy split: train+restval images/captions; the reference's COCO-5k training subset
    "COCO-5k": {"train_images": 5_000, "train_captions": 25_015, "test_images": 5_000},
    "full COCO": {"train_images": 113_287, "train_captions": 566_747, "test_images": 5_000},
}


@dataclasses.dataclass
class TableArgs:
    """Memory table (per stage, per rank) from model shapes and dataset counts."""

    ranks: int = arg(8, help="processes (GPUs) in the multi-GPU rows")
    epochs: int = arg(20, help="training epochs (reference: 20)")
    save_total_limit: int = arg(2, help="epoch checkpoints kept with pruning", check=at_least(0))
    workers: int = arg(4, help="data-loader workers per rank")


def model_parts() -> dict[str, int]:
    """Parameter counts per part of OpenFlamingo-3B's architecture, from shapes alone."""
    size = LMSize.mpt_1b()
    args = ModelArgs(
        vision_encoder_path="ViT-L-14",
        vision_encoder_pretrained="none",
        checkpoint_path="none",
        **OPENFLAMINGO_PERCEIVER,
    )
    with tempfile.TemporaryDirectory() as tmp:
        build_sized_tokenizer(size.tokenizer_tokens).save_pretrained(tmp)
        tok = load_tokenizer(tmp)
    with default_dtype(torch.bfloat16):  # open_clip moves its model to a device: not meta
        vision = build_vision_encoder(args.vision_encoder_path, None, args.vision_tokens)
    with torch.device("meta"):  # shapes only, no memory
        cap = assemble_flamingo(args, vision, tok, size.build())
    return part_counts(cap.model)


def rows(parts: dict[str, int], cfg: TableArgs) -> list[tuple[str, str, dict[str, float]]]:
    """(stage, what, {dataset: GiB per rank}) rows."""
    total, trainable, k = parts["total"], parts["trainable_paper"], cfg.ranks
    weights32, grads, adam = total * 4, trainable * 4, trainable * 8
    ckpt = grads + adam  # an epoch checkpoint: trainable fp32 weights + AdamW moments
    cache_cap = DEFAULT_CACHE_MB * 2**20
    w = max(cfg.workers, 1)  # workers=0: the main process holds the one cache

    def same(value: float) -> dict[str, float]:
        return {name: value / GIB for name in DATASETS}

    def pool(shards: int, cache: float = 0.0) -> dict[str, float]:
        """A pool of every training image (--pool_size -1): the entries one process holds."""
        return {
            name: (math.ceil(d["train_images"] / shards) * POOL_ENTRY_BYTES + cache) / GIB
            for name, d in DATASETS.items()
        }

    def per(key: str, copies: int = 1, cap: float | None = None) -> dict[str, float]:
        out = {}
        for name, d in DATASETS.items():
            size = d[key] * IMAGE_BYTES
            out[name] = copies * (size if cap is None else min(size, cap)) / GIB
        return out

    return [
        ("A/D4 train, DDP", "fp32 weights + grads + AdamW", same(weights32 + grads + adam)),
        (f"A/D4 train, ZeRO-2 x{k}", "grads + AdamW sharded", same(weights32 + (grads + adam) / k)),
        ("A/D4 data, before", f"unbounded image cache x {w} workers", per("train_images", w)),
        ("A/D4 data, now", f"{DEFAULT_CACHE_MB} MiB cache x {w} workers",
         per("train_images", w, cache_cap)),
        ("D4 masked images, before", "materialised on every rank", per("train_images")),
        ("D4 masked images, now", "painted on the fly from the stored actions (A/D4 data cache)",
         same(0)),
        ("B, D1-D3 captioner", "fp32 weights (bf16 autocast)", same(weights32)),
        ("B, D1-D3 captioner", "bf16 weights", same(total * 2)),
        ("D1 pool, before", "every pool image all-gathered to every rank", per("train_images")),
        ("D1 pool, now", f"this rank's shard: 1/{k} of the entries, no pixels", pool(k)),
        ("D2 pool, now", f"every entry + {DEFAULT_CACHE_MB} MiB image cache",
         pool(1, cache_cap)),
        ("A/D4 disk", "one epoch checkpoint", same(ckpt)),
        ("A/D4 disk", f"{cfg.epochs} epochs, no pruning", same(ckpt * cfg.epochs)),
        ("A/D4 disk", f"--save_total_limit {cfg.save_total_limit}",
         same(ckpt * min(cfg.save_total_limit, cfg.epochs))),
    ]  # fmt: skip


def markdown(parts: dict[str, int], cfg: TableArgs) -> str:
    names = list(DATASETS)
    lines = [
        f"Parameters (OpenFlamingo-3B shapes): total {parts['total'] / 1e9:.3f} B, paper-trainable "
        f"{parts['trainable_paper'] / 1e9:.3f} B (vision {parts['vision_encoder'] / 1e6:.0f} M, "
        f"perceiver {parts['perceiver'] / 1e6:.0f} M, cross-attention "
        f"{parts['gated_cross_attn'] / 1e6:.0f} M, LM blocks {parts['lm_blocks'] / 1e6:.0f} M, "
        f"token embedding {parts['token_embedding'] / 1e6:.0f} M).",
        "",
        "| stage | what | " + " | ".join(f"{n} (GiB/rank)" for n in names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    for stage, what, values in rows(parts, cfg):
        cells = " | ".join(f"{values[n]:.1f}" for n in names)
        lines.append(f"| {stage} | {what} | {cells} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    (cfg,) = parse(argv, TableArgs, description=__doc__)
    text = markdown(model_parts(), cfg)
    print(text)
    return text


if __name__ == "__main__":
    run_main(main)
