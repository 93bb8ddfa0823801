"""CLIP stage 3: clean a poisoned CLIP on the defender's clean pairs with PAR, ``ft`` or CleanCLIP.

    python train/clip_clean.py --method par --poisoned_run checkpoints_remote/par/badnet/poisoned \
        --clean_data data/clean_seed1 --run_name par/badnet/par
    python train/clip_clean.py --method par --clip_model ViT-B-32 --clip_pretrained poisoned.pt \
        --clean_data cc3m_subset.csv --run_name par/vitb32/par       (real mode)

PAR (reference par-soda §1.2): CLIP loss minus the thresholded push away from a frozen copy of
the poisoned model (tau = --loss_thresh); ``ft``: the same run without the push; ``cleanclip``:
CLIP loss + --cleanclip_lambda x unimodal loss on augmented views. Writes config.json,
clip.safetensors, history.json and DONE last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from srd.captioner.clip import CLIP_CONFIG, CLIP_WEIGHTS, load_clip, save_clip
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.errors import SRDError
from srd.flags import SEED
from srd.io import is_finished, mark_finished, prepare_run_dir, setup_logging, write_json
from srd.par.clean import CleanArgs, clean_clip
from srd.par.data import load_pairs
from srd.runs import check_run_name

log = logging.getLogger("clip_clean")


@dataclass
class CleanRunArgs:
    """Run folder, seed and the poisoned CLIP."""

    poisoned_run: str = arg("", help="finished poisoned-CLIP run folder (clip.safetensors)")
    clip_model: str = arg(
        CLIP_CONFIG,
        help="open_clip config of the poisoned CLIP: a name (ViT-B-32, RN50, tiny-clip) or an "
        "open_clip JSON config file",
    )
    clip_pretrained: str | None = arg(
        None, help="poisoned CLIP weights file (safetensors or torch state dict) instead of a run"
    )
    run_name: str = arg("par/badnet/par", help="run folder under --external_save_dir")
    external_save_dir: str = arg("checkpoints_remote", help="folder holding run folders")
    seed: int = arg(0, help="seed of batches, captions and augmentations", check=SEED)
    overwrite: bool = arg(False, help="redo a finished run")


def main(argv: Sequence[str] | None = None) -> dict:
    args, run = parse(argv, CleanArgs, CleanRunArgs, description=__doc__)
    args.validate()
    if run.clip_pretrained is not None:
        if run.poisoned_run:
            raise SRDError("--poisoned_run: give either a poisoned run or --clip_pretrained")
        model, tokenizer = load_clip(run.clip_model, run.clip_pretrained, "--clip_pretrained")
    else:
        poisoned = Path(run.poisoned_run)
        if not run.poisoned_run or not is_finished(poisoned):
            raise SRDError(
                f"--poisoned_run {run.poisoned_run}: not a finished run (no DONE); "
                "or give the weights with --clip_pretrained"
            )
        model, tokenizer = load_clip(run.clip_model, poisoned / CLIP_WEIGHTS, "--poisoned_run")
    images, captions = load_pairs(args.clean_data)
    run_dir = prepare_run_dir(
        f"{run.external_save_dir}/{check_run_name(run.run_name, '--run_name')}",
        run.overwrite,
        "--run_name",
    )
    setup_logging(run_dir / "train.log")
    start = time.time()
    write_json(run_dir / "config.json", to_dict(args, run))
    history = clean_clip(model, tokenizer, images, captions, args, seed=run.seed)
    save_clip(model, run.clip_model, run_dir)
    report = {
        "method": args.method,
        "num_pairs": len(images),
        "history": history,
        "wall_seconds": round(time.time() - start, 1),
    }
    write_json(run_dir / "history.json", report)
    mark_finished(run_dir)
    return report


if __name__ == "__main__":
    run_main(main)
