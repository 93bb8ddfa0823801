"""The SODA stages' flags: one small dataclass per stage, composed by each entry point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from srd.config import arg
from srd.flags import COUNT, SEED

# --------------------------------------------------------------------------- flags


@dataclass
class ShapesArgs:
    """Data: the single-object shapes classification set."""

    data_dir: str = arg("data/shapes", help="folder of the shapes set (train/soda_data.py)")


@dataclass
class ShapesBuildArgs(ShapesArgs):
    """Data: the single-object shapes classification set."""

    seed: int = arg(
        0, help="benchmark seed (images depend only on seed, split and index)", check=SEED
    )
    per_class_train: int = arg(150, help="training images per class")
    per_class_test: int = arg(200, help="test images per class")
    resolution: int = arg(48, help="classifier input side in px (downscaled from the 224 canvas)")
    benchmark: str = arg(
        "shapes",
        help="'shapes': 18 (colour, shape) classes sharing colours and shapes; 'distinct': 10 "
        "classes, each with a shape and a texture no other class has",
        choices=["shapes", "distinct"],
    )
    overwrite: bool = arg(False, help="rebuild a folder that holds another config")


@dataclass
class ClassifierTrainArgs:
    """Classifier training: attack, run folder, optimiser (SODA's train_sem recipe)."""

    bd_attack_type: str = arg("clean", help="'clean' or a semantic attack name / YAML file")
    concept: str | None = arg(None, help="override the attack's sub-population phrase")
    poison_target: str | None = arg(None, help="override the target class (name or index)")
    poison_rate: float | None = arg(None, help="share of the sub-population relabelled")
    run_name: str = arg("", help="run folder name (default: soda-<attack>-s<seed>)")
    external_save_dir: str = arg("checkpoints_remote/soda", help="folder holding run folders")
    batch_size: int = arg(64, help="batch size (clean + semantic samples)", check=COUNT)
    epoch: int = arg(24, help="epochs over the clean training samples")
    lr: float = arg(0.05, help="peak learning rate (SGD, momentum 0.9, cosine decay)")
    ratio: float = arg(0.3125, help="share of each batch taken from the augmented semantic pool")
    width: int = arg(16, help="channels of the first conv block")
    hidden: int = arg(64, help="units of the last hidden layer")
    seed: int = arg(
        0, help="seed of initialisation, batches, augmentation and the poison draw", check=SEED
    )
    overwrite: bool = arg(False, help="redo a finished run folder")


@dataclass
class SodaArgs:
    """SODA: the analysed model and where its outputs go."""

    in_model: str = arg(help="model run folder (train/soda_train.py)")
    output_dir: str = arg("", help="SODA output folder (default: <in_model>/soda)")
    ana_layer: int = arg(-1, help="analysed layer: block index to cut after (-1: last hidden)")
    batch_size: int = arg(64, help="batch size", check=COUNT)
    seed: int = arg(0, help="seed of sample order and draws", check=SEED)
    overwrite: bool = arg(False, help="redo an output that exists")

    @property
    def out(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(self.in_model) / "soda"


@dataclass
class CausalityArgs:
    """causality_analysis: per-class attribution tables."""

    num_sample: int = arg(256, help="samples per class (whole batches, at least this many)")


@dataclass
class DetectArgs:
    """detect: MAD outlier tests."""

    confidence: float = arg(3.0, help="MAD threshold on the target-class scores")
    confidence2: float = arg(2.0, help="MAD threshold on the source-class scores")
    num_sample: int = arg(256, help="samples per class for the source scores")


@dataclass
class GenTriggerArgs:
    """gen_trigger: reconstruction of infected samples from source images."""

    potential_source: int = arg(-1, help="source class (-1: from detect.json)")
    poison_target: int = arg(-1, help="target class (-1: from detect.json)")
    num_sample: int = arg(100, help="source training images to start from")
    lr: float = arg(0.1, help="SGD learning rate on the image")
    reg: float = arg(0.9, help="weight of mean(x^2)")
    epoch: int = arg(2000, help="maximum steps per image")
    early_stop_th: float = arg(0.99, help="stop when the target probability reaches this")


@dataclass
class DefenderArgs:
    """Defender's data and budget (shared by remove and the baselines)."""

    clean_portion: float = arg(0.05, help="share of the clean training split the defender has")
    epoch: int = arg(6, help="fine-tune epochs")
    lr: float = arg(0.005, help="learning rate (SGD, momentum 0.9, weight decay 5e-4)")


@dataclass
class RemoveArgs:
    """remove: the masked fine-tune."""

    potential_source: int = arg(-1, help="source class (-1: from detect.json)")
    poison_target: int = arg(-1, help="target class (-1: from detect.json)")
    top: float = arg(0.3, help="share of the analysed layer's neurons kept by the mask")
    reg: float = arg(0.01, help="weight of the unlearning term -CE(reconstructed -> target)")


@dataclass
class BaselineArgs:
    """Baselines on the defender's data."""

    method: str = arg("finetune", help="baseline", choices=["finetune", "dfr"])
    dfr_runs: int = arg(10, help="DFR: last-layer fine-tunes averaged")
