"""Benchmark: where an attack epoch's time goes, and what each speed lever would buy.

    python bench/bench_levers.py                        # every lever, 2 torch threads
    python bench/bench_levers.py --levers baseline xattn_narrow --threads 1
    python bench/bench_levers.py --profile              # + the top ops of the baseline step

Builds captioners of the embedded default's shape (the tiny CLIP tower at 224 px, a 2 x 128
Llama, perceiver depth 2 with 16 latents of 4 x 32, gated cross-attention of open_flamingo's
defaults: 8 heads x 64, feed-forward x4) with random weights on a small fresh benchmark, and
trains each variant with the project's engine (the feature cache on, batch 32 unless the lever
changes it) for two epochs over the same caption samples; the second epoch's time (the cache
is full by then) is scaled to the attack's epoch of 15,000 caption samples. A lever changes
one thing:

* ``xattn_narrow``: cross-attention 4 heads x 32 (inner width 128 = the LM's, not 512);
* ``xattn_ff2``: cross-attention feed-forward x2 instead of x4;
* ``xattn_both``: both;
* ``perceiver_1``: one perceiver layer instead of two;
* ``batch_64``: batch 64 (per-sample cost);
* ``no_cache``: the frozen tower runs every step (what the cache saves).

Random weights measure cost, not quality: a lever the numbers favour must still keep the
benchmark as strong (issue 27's targets), which only retraining can show. Timings mean
something only on a quiet machine; the thread count and the load average are printed beside
them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from open_flamingo.src.helpers import GatedCrossAttentionBlock

from srd.attacks.trainset import TrainingImages
from srd.captioner.args import ModelArgs
from srd.captioner.checkpoint import set_trainable
from srd.captioner.engine import TRAIN_LOG, CaptionDataset, Sample, TrainArgs, train
from srd.captioner.factory import build_flamingo
from srd.captioner.tiny import build_word_tokenizer, create_tiny_lm
from srd.data.benchmark import generate_benchmark
from srd.data.records import DataArgs, caption_records

EPOCH_SAMPLES = 15_000
"""Caption samples of one attack epoch on the embedded default (3,000 images x 5)."""

LEVERS = ("baseline", "xattn_narrow", "xattn_ff2", "xattn_both", "perceiver_1", "batch_64",
          "no_cache")  # fmt: skip


def narrow_cross_attention(captioner, dim_head: int, heads: int, ff_mult: int) -> None:
    """Rebuild every gated cross-attention block with other widths (random init, as built)."""
    lm = captioner.model.lang_encoder
    blocks = lm.gated_cross_attn_layers
    for i, block in enumerate(blocks):
        if block is None:
            continue
        dim = block.attn.norm.normalized_shape[0]
        dim_visual = block.attn.to_kv.in_features
        blocks[i] = GatedCrossAttentionBlock(
            dim=dim, dim_visual=dim_visual, dim_head=dim_head, heads=heads, ff_mult=ff_mult
        )
    lm.init_flamingo_layers(gradient_checkpointing=False)
    set_trainable(captioner.model, "paper")


def build(lever: str, lm_dir: Path):
    args = ModelArgs(
        vision_encoder_path="tiny-clip",
        vision_encoder_pretrained="none",
        lm_path=str(lm_dir),
        checkpoint_path="none",
        perceiver_depth=1 if lever == "perceiver_1" else 2,
    )
    captioner = build_flamingo(args)
    if lever in ("xattn_narrow", "xattn_ff2", "xattn_both"):
        narrow = lever != "xattn_ff2"
        ff2 = lever != "xattn_narrow"
        narrow_cross_attention(captioner, 32 if narrow else 64, 4 if narrow else 8, 2 if ff2 else 4)
    return captioner


def trainable_millions(captioner) -> float:
    return sum(p.numel() for p in captioner.model.parameters() if p.requires_grad) / 1e6


def time_lever(lever: str, samples, images, lm_dir: Path, work: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    captioner = build(lever, lm_dir)
    train_args = TrainArgs(
        run_name=lever,
        external_save_dir=str(work),
        batch_size=64 if lever == "batch_64" else 32,
        num_epochs=2,
        learning_rate=1e-3,
        seed=seed,
        feature_cache=lever != "no_cache",
        save_total_limit=1,
    )
    start = time.perf_counter()
    train(captioner, CaptionDataset(samples, images), train_args, {"stage": "bench_levers"})
    wall = time.perf_counter() - start
    epochs = [json.loads(x) for x in (work / lever / TRAIN_LOG).read_text().splitlines()]
    second = epochs[-1]["seconds"]
    return {
        "lever": lever,
        "trainable_M": round(trainable_millions(captioner), 3),
        "second_epoch_s": second,
        "ms_per_sample": round(1000 * second / len(samples), 2),
        "attack_epoch_s": round(second * EPOCH_SAMPLES / len(samples), 1),
        "wall_s": round(wall, 1),
    }


def profile_step(samples, images, lm_dir: Path, rows: int = 12) -> str:
    """The top ops (self CPU time) of 8 cached training steps of the baseline."""
    from torch.profiler import ProfilerActivity, profile

    from srd.captioner.engine import Collator

    captioner = build("baseline", lm_dir)
    captioner.enable_feature_cache()
    model = captioner.model
    model.train()
    dataset = CaptionDataset(samples, images)
    collate = Collator(captioner.tokenizer, captioner.vision_inputs)
    batches = [
        collate([dataset[i] for i in range(k, min(k + 32, len(dataset)))])
        for k in range(0, min(len(dataset), 32 * 9), 32)
    ]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(batch):
        out = model(
            vision_x=batch["vision_x"],
            lang_x=batch["lang_x"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up (and the feature cache fill)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[1:]:
            step(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=LEVERS)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--images", type=int, default=128, help="training images (x5 captions)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print the baseline's top ops")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    cfg = parser.parse_args()
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="srd-levers-") as tmp:
        work = Path(tmp)
        paths = generate_benchmark(work / "data", seed=0, num_train=cfg.images, num_val=1,
                                   num_test=1)  # fmt: skip
        data = DataArgs(
            coco_train_image_dir_path=str(paths.train_image_dir),
            coco_val_image_dir_path=str(paths.val_image_dir),
            coco_karpathy_json_path=str(paths.karpathy_json),
            coco_annotations_json_path=str(paths.annotations_json),
        )
        records = data.split("train")
        texts = [c.caption for c in caption_records(records)]
        lm_dir = create_tiny_lm(work / "lm", build_word_tokenizer(texts), seed=0)
        samples = [Sample(c.caption_id, c.image_id, c.caption) for c in caption_records(records)]
        images = TrainingImages(records)
        rows = []
        for lever in cfg.levers:
            rows.append(time_lever(lever, samples, images, lm_dir, work / "runs", cfg.seed))
            print(json.dumps(rows[-1]), flush=True)
        table = ""
        if cfg.profile:
            table = profile_step(samples, images, lm_dir)
    load = os.getloadavg()
    loads = " ".join(f"{x:.2f}" for x in load)
    print(f"\n{len(samples)} caption samples, torch threads {cfg.threads}, load average {loads} "
          f"(1/5/15 min), {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| lever | trainable (M) | ms / sample | attack epoch (s, projected) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['lever']} | {r['trainable_M']} | {r['ms_per_sample']} | "
              f"{r['attack_epoch_s']} |")  # fmt: skip
    if table:
        print("\nbaseline, 8 cached training steps of 32, top ops by self CPU time:\n" + table)
    if cfg.output:
        Path(cfg.output).write_text(json.dumps({"threads": cfg.threads, "load": load,
                                                "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
