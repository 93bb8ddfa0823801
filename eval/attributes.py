"""Attribute accuracy of any captions of the synthetic benchmark's test images, by object count.

    python eval/attributes.py --output result/diagnostics/attributes_clean.json \\
        --predictions checkpoints_remote/embedded/pretrain/pretrain_report.json

Reads the ``predictions`` of a pretrain report ({image id: caption}) or of an evaluation result
(its ``clean`` captions), scores them against the benchmark's scenes (``srd.data.benchmark``) and
writes the overall attribute accuracy and, per number of objects in the image, the accuracy and
the share of captions cut off before their full stop, per colour the share of the images
showing it whose caption names it, and what goes wrong with the shown objects (named, wrong
shape, wrong colour, missing, extra).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data.attributes import (
    attribute_accuracy,
    attribute_breakdown,
    colour_recall,
    object_errors,
    scene_index,
)
from srd.data.records import DataArgs
from srd.errors import SRDError
from srd.evaluation.captioning import result_captions
from srd.io import ensure_dir, read_json, require_files, setup_logging, write_json

log = logging.getLogger("attributes")


@dataclass
class AttributeArgs:
    """The captions to score and where the result goes."""

    predictions: str = arg(help="a pretrain_report.json or an eval/evaluate.py result JSON")
    output: str = arg("result/diagnostics/attributes.json", help="JSON result file")


def load_predictions(path: str) -> dict[int, str]:
    """{image id: caption} from a pretrain report or the clean captions of an evaluation."""
    predictions = result_captions(read_json(path))
    if predictions is None:
        raise SRDError(f"--predictions {path}: no 'predictions' of image id -> caption")
    return predictions


def main(argv: Sequence[str] | None = None) -> dict:
    data, args = parse(argv, DataArgs, AttributeArgs, description=__doc__)
    require_files(("--predictions", args.predictions))
    # Not beside the result JSONs: eval/results_table.py reads every result/*.json as one.
    ensure_dir(Path(args.output).parent, "--output")
    setup_logging(None)
    predictions = load_predictions(args.predictions)
    scenes = scene_index(data.split("test") + data.split("val"))
    if any(not scenes.get(i) for i in predictions):
        raise SRDError(
            f"--predictions {args.predictions}: captions of images without a benchmark scene "
            f"(not the test images of --coco_karpathy_json_path {data.coco_karpathy_json_path})"
        )
    result = {
        "config": to_dict(data, args),
        "num_images": len(predictions),
        "attribute_accuracy": attribute_accuracy(predictions, scenes),
        "by_object_count": attribute_breakdown(predictions, scenes),
        "colour_recall": colour_recall(predictions, scenes),
        "object_errors": object_errors(predictions, scenes),
    }
    write_json(args.output, result)
    log.info("attribute accuracy %.1f%% on %d images; by object count: %s",
             100 * result["attribute_accuracy"], len(predictions), {
                 k: round(100 * v["attribute_accuracy"], 1)
                 for k, v in result["by_object_count"].items()})  # fmt: skip
    return result


if __name__ == "__main__":
    run_main(main)
