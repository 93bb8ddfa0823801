"""Stage "data" (embedded default only): write the synthetic captioned-shapes benchmark.

    python train/prepare_data.py --out_dir data/synthetic --seed 0

The folder then stands in for COCO: pass its dataset_coco.json, captions_val2014.json,
train2014/ and val2014/ to the --coco_* flags of the later stages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from srd.cli import run_main
from srd.config import arg, parse
from srd.data.benchmark import BenchmarkConfig, generate_benchmark
from srd.flags import COUNT, SEED, between
from srd.io import setup_logging

log = logging.getLogger("prepare_data")


@dataclass
class DataConfig:
    """Synthetic benchmark: where to write it and how big it is."""

    out_dir: str = arg("data/synthetic", help="folder to write the benchmark into")
    seed: int = arg(0, help="seed: the same seed gives byte-identical files", check=SEED)
    num_train: int = arg(
        3000, help="images in the Karpathy 'train' split (train2014/)", check=COUNT
    )
    num_val: int = arg(100, help="images in the 'val' split (val2014/)", check=COUNT)
    num_test: int = arg(300, help="images in the 'test' split (val2014/)", check=COUNT)
    captions_per_image: int = arg(
        5, help="reference captions per image (3 to 7)", check=between(3, 7)
    )
    overwrite: bool = arg(False, help="replace a finished benchmark made with another config")


def main(argv: Sequence[str] | None = None) -> None:
    (cfg,) = parse(argv, DataConfig, description=__doc__.splitlines()[0])
    # Check the flags before anything is written, so a bad value leaves no output behind.
    BenchmarkConfig(
        cfg.seed, cfg.num_train, cfg.num_val, cfg.num_test, cfg.captions_per_image
    ).validate()
    setup_logging(Path(cfg.out_dir) / "prepare_data.log")
    paths = generate_benchmark(
        cfg.out_dir,
        seed=cfg.seed,
        num_train=cfg.num_train,
        num_val=cfg.num_val,
        num_test=cfg.num_test,
        captions_per_image=cfg.captions_per_image,
        overwrite=cfg.overwrite,
    )
    log.info("--coco_karpathy_json_path %s", paths.karpathy_json)
    log.info("--coco_annotations_json_path %s", paths.annotations_json)
    log.info("--coco_train_image_dir_path %s", paths.train_image_dir)
    log.info("--coco_val_image_dir_path %s", paths.val_image_dir)


if __name__ == "__main__":
    run_main(main)
