"""Does the caption batch size change what D1 and D3 compute? Captions and SFS scores of the same
images at several ``--caption_batch_size`` values (half of the images with one red square each,
as D3's tries), compared with the first batch size's. Prints figures and writes them as JSON
with ``--output``; not a test. Why it matters: a D1 pool's and a D3 cleaning run's identity
holds the batch size unless it is the default (``srd.defenses.srd.inputs.without_default_batch``).

Example, in a run folder of the embedded default (run/common.sh's flags)::

    python bench/caption_batch.py $DATA_FLAGS $MODEL_FLAGS \\
      --checkpoint_path checkpoints_remote/backdoor-badnet/final_weights.pt \\
      --reference_checkpoint_path checkpoints_remote/embedded/clean/checkpoint.pt \\
      --annotations_path data/synthetic/captions_train2014.json --images 96
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from srd.captioner.args import ModelArgs
from srd.captioner.factory import load_captioner
from srd.cli import run_main
from srd.config import arg, parse
from srd.data.records import DataArgs, load_image
from srd.defenses.srd.inputs import SFSArgs, load_scorer, vlm_caption_fn
from srd.errors import SRDError
from srd.flags import COUNT, SEED
from srd.geometry import NUM_ACTIONS, apply_action
from srd.io import write_json


@dataclasses.dataclass
class BatchArgs:
    """Caption batch-size check."""

    images: int = arg(96, help="training images (the first ones of the split)", check=COUNT)
    batch_sizes: tuple[int, ...] = arg(
        (64, 16, 1), help="caption batch sizes; the first is compared"
    )
    threads: int = arg(1, help="torch CPU threads", check=COUNT)
    seed: int = arg(0, help="seed of the red squares' draw", check=SEED)
    output: str | None = arg(None, help="write the figures to this JSON file")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    data, model_args, sfs, cfg = parse(argv, DataArgs, ModelArgs, SFSArgs, BatchArgs)
    if len(cfg.batch_sizes) < 2 or min(cfg.batch_sizes) < 1:
        raise SRDError(f"--batch_sizes {cfg.batch_sizes}: give at least two sizes >= 1")
    torch.set_num_threads(cfg.threads)
    records = data.split("train")[: cfg.images]
    rng = np.random.default_rng(cfg.seed)
    images = [load_image(r.path) for r in records]
    images = [apply_action(im, int(rng.integers(NUM_ACTIONS))) if i % 2 else im
              for i, im in enumerate(images)]  # fmt: skip
    references = [r.captions[0].caption for r in records]
    captioner = load_captioner(model_args)
    runs = {}
    for size in cfg.batch_sizes:
        sized = dataclasses.replace(sfs, caption_batch_size=size)
        t0 = time.time()
        captions = vlm_caption_fn(captioner, sized)(images)
        scores = load_scorer(sized, "cpu", model_args.trust_remote_code).score(captions, references)
        runs[size] = {"captions": captions, "sem": scores.sem, "flu": scores.flu,
                      "wall_s": round(time.time() - t0, 1)}  # fmt: skip
    first = cfg.batch_sizes[0]
    figures: dict[str, Any] = {
        "images": len(images),
        "masked": len(images) // 2,
        "threads": cfg.threads,
        "compared_with": first,
        "sizes": {},
    }
    for size, run in runs.items():
        pairs = zip(runs[first]["captions"], run["captions"], strict=True)
        differ = [i for i, (a, b) in enumerate(pairs) if a != b]
        figures["sizes"][size] = {
            "captions_differing": len(differ),
            "max_abs_sem_diff": float(np.nanmax(np.abs(run["sem"] - runs[first]["sem"]))),
            "max_abs_flu_diff": float(np.nanmax(np.abs(run["flu"] - runs[first]["flu"]))),
            "wall_s": run["wall_s"],
        }
        print(f"batch {size}: {len(differ)} of {len(images)} captions differ from batch {first}; "
              f"max |dS_sem| {figures['sizes'][size]['max_abs_sem_diff']:.2e}, "
              f"max |dS_flu| {figures['sizes'][size]['max_abs_flu_diff']:.2e}; "
              f"{run['wall_s']} s")  # fmt: skip
    if cfg.output:
        write_json(cfg.output, figures)
    return figures


if __name__ == "__main__":
    run_main(main)
