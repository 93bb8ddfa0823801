"""Pretrain stage (embedded default only): train the tiny captioner on the clean training split.

Builds a word-level tokenizer from the benchmark captions, a tiny Llama and the tiny open_clip
vision tower, trains every parameter, exports the result as pretrained parts + an OpenFlamingo
checkpoint (checkpoints_remote/embedded/clean/ by default) and reports test-split CIDEr,
attribute accuracy and a blind baseline.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from srd import attacks
from srd.benchmark import attribute_accuracy, blind_caption, scene_index
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data import DataArgs, ImageStore, caption_records, check_images_exist, load_references
from srd.engine import CaptionDataset, Sample, TrainArgs, process_state, train
from srd.evaluation import caption_ids
from srd.io import setup_logging, write_json
from srd.metrics import caption_scores
from srd.model import EMBEDDED_DIR, ModelArgs, build_flamingo, export_captioner, model_signature
from srd.tiny import build_word_tokenizer, create_tiny_lm

log = logging.getLogger("pretrain")


@dataclass
class PretrainArgs(TrainArgs):
    """Training: run folder, optimiser, schedule, checkpoints."""

    run_name: str = arg("embedded/pretrain", help="run folder name under --external_save_dir")
    num_epochs: int = arg(4, help="training epochs over all training captions")
    learning_rate: float = arg(1e-3, help="peak learning rate (AdamW)")
    warmup_steps_ratio: float = arg(0.05, help="share of all steps spent warming up")
    trainable: str = arg(
        "lm",
        help="what trains: lm = everything but the frozen tiny-CLIP vision tower (as "
        "OpenFlamingo freezes its CLIP); all = the tower too",
        choices=["paper", "lm", "all"],
    )


@dataclass
class TinyArgs:
    """Tiny captioner: sizes, export folder, evaluation."""

    lm_hidden_size: int = arg(128, help="tiny Llama hidden size")
    lm_layers: int = arg(2, help="tiny Llama layers")
    export_dir: str = arg(str(EMBEDDED_DIR), help="where the clean captioner is exported")
    clip_checkpoint: str = arg(
        "checkpoints_remote/embedded/clip/clip.safetensors",
        help="the tiny CLIP (train/pretrain_clip.py) whose image tower is the vision encoder; "
        "'none' for a random tower",
    )
    target_label: str = arg(
        attacks.DEFAULT_TARGET, help="attack target word the vocabulary must cover"
    )
    eval_batch_size: int = arg(64, help="captioning batch size for the test report")


def main(argv: Sequence[str] | None = None) -> dict:
    data, model_args, train_args, tiny = parse(
        argv, DataArgs, ModelArgs, PretrainArgs, TinyArgs, description=__doc__
    )
    state = process_state()
    run_dir = train_args.run_dir
    setup_logging(run_dir / "train.log" if state.is_main_process else None)
    train_images = data.split("train")
    test_images = data.split("test")
    references = load_references(data.coco_annotations_json_path)
    check_images_exist(train_images + test_images)
    records = caption_records(train_images)

    lm_init = run_dir / "lm_init"
    if state.is_main_process and not (lm_init / "config.json").is_file():
        texts = [r.caption for r in records] + attacks.caption_vocabulary(tiny.target_label)
        tok = build_word_tokenizer(texts)
        create_tiny_lm(lm_init, tok, tiny.lm_hidden_size, tiny.lm_layers, seed=train_args.seed)
    state.wait_for_everyone()
    model_args = dataclasses.replace(
        model_args,
        vision_encoder_pretrained=tiny.clip_checkpoint,
        lm_path=str(lm_init),
        checkpoint_path="none",
    )
    captioner = build_flamingo(model_args)
    image_of = ImageStore(train_images + test_images, data.image_cache_mb)

    samples = [Sample(r.caption_id, r.image_id, r.caption) for r in records]
    record = {
        "stage": "pretrain",
        **to_dict(data, model_args, train_args, tiny),
        "model_signature": model_signature(model_args),
    }
    log.info("pretraining on %d captions of %d images", len(samples), len(train_images))
    train(captioner, CaptionDataset(samples, lambda s: image_of(s.image_id)), train_args, record)

    exported = None
    if state.is_main_process:
        exported = export_captioner(captioner, tiny.export_dir)
        log.info("clean captioner exported to %s", tiny.export_dir)
    test_ids = [im.image_id for im in test_images]
    predictions = caption_ids(
        captioner, test_ids, image_of, batch_size=tiny.eval_batch_size, desc="test captions"
    )
    if not state.is_main_process:
        return {}
    report = _report(predictions, references, train_images, test_images, exported)
    write_json(run_dir / "pretrain_report.json", report)
    log.info(
        "test CIDEr %.3f (blind %.3f, ratio %.1fx); attribute accuracy %.1f%% (blind %.1f%%)",
        report["model"]["CIDEr"],
        report["blind"]["CIDEr"],
        report["cider_ratio"],
        100 * report["model"]["attribute_accuracy"],
        100 * report["blind"]["attribute_accuracy"],
    )
    return report


def _report(predictions, references, train_images, test_images, exported) -> dict:
    blind = blind_caption(train_images)
    blind_predictions = {i: blind for i in predictions}
    refs = {i: references[i] for i in predictions}
    model_scores = caption_scores(predictions, refs)
    blind_scores = caption_scores(blind_predictions, refs)
    scenes = scene_index(test_images)
    model_scores["attribute_accuracy"] = attribute_accuracy(predictions, scenes)
    blind_scores["attribute_accuracy"] = attribute_accuracy(blind_predictions, scenes)
    examples = [
        {"image_id": i, "caption": predictions[i], "references": refs[i][:2]}
        for i in list(predictions)[:5]
    ]
    return {
        "model": model_scores,
        "blind": {"caption": blind, **blind_scores},
        "cider_ratio": model_scores["CIDEr"] / max(blind_scores["CIDEr"], 1e-9),
        "examples": examples,
        "exported_model_args": dataclasses.asdict(exported) if exported else None,
        "num_test_images": len(predictions),
        "predictions": {str(k): v for k, v in predictions.items()},
    }


if __name__ == "__main__":
    run_main(main)
