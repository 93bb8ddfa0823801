"""Pretrain stage (embedded default only): train the tiny captioner on the clean training split.

Builds a word-level tokenizer from the benchmark captions, a tiny Llama and the tiny open_clip
vision tower, trains every parameter, exports the result as pretrained parts + an OpenFlamingo
checkpoint (checkpoints_remote/embedded/clean/ by default) and reports test-split CIDEr,
attribute accuracy and a blind baseline.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from srd.attacks.text import caption_vocabulary
from srd.captioner.args import (
    EMBEDDED_DIR,
    FLAMINGO_CHECKPOINT,
    LM_FOLDER,
    VISION_WEIGHTS,
    ModelArgs,
    model_signature,
)
from srd.captioner.checkpoint import export_captioner
from srd.captioner.engine import CaptionDataset, Sample, TrainArgs, process_state, train
from srd.captioner.factory import build_flamingo
from srd.captioner.runfiles import holds_training
from srd.captioner.tiny import build_word_tokenizer, create_tiny_lm
from srd.captions import DEFAULT_TARGET
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data.attributes import attribute_accuracy, attribute_breakdown, blind_caption, scene_index
from srd.data.records import (
    DataArgs,
    ImageStore,
    caption_records,
    check_images_exist,
    load_references,
)
from srd.errors import SRDError
from srd.evaluation.captioning import caption_ids
from srd.evaluation.metrics import caption_scores
from srd.flags import COUNT, SHARE, Range, positive
from srd.io import is_finished, mark_finished, read_json, require_files, setup_logging, write_json
from srd.runs import (
    check_run_config,
    check_same_config,
    check_writable,
    clear_folder,
    input_digests,
    remove_paths,
)

log = logging.getLogger("pretrain")

LM_INIT_RECORD = "srd_lm_init.json"
"""Inside lm_init/: what the initial LM was made from (checked before it is reused)."""


@dataclass
class PretrainArgs(TrainArgs):
    """Training: run folder, optimiser, schedule, checkpoints."""

    run_name: str = arg("embedded/pretrain", help="run folder name under --external_save_dir")
    num_epochs: int = arg(8, help="training epochs over all training captions", check=COUNT)
    learning_rate: float = arg(1e-3, help="peak learning rate (AdamW)", check=positive())
    warmup_steps_ratio: float = arg(0.05, help="share of all steps spent warming up", check=SHARE)
    trainable: str = arg(
        "lm",
        help="what trains: lm = everything but the frozen tiny-CLIP vision tower (as "
        "OpenFlamingo freezes its CLIP); all = the tower too",
        choices=["paper", "lm", "all"],
    )


@dataclass
class TinyArgs:
    """Tiny captioner: sizes, export folder, evaluation."""

    lm_hidden_size: int = arg(
        128,
        help="tiny Llama hidden size",
        check=Range(low=4, multiple_of=4, why="the tiny Llama has 4 heads"),
    )
    lm_layers: int = arg(2, help="tiny Llama layers", check=COUNT)
    export_dir: str = arg(str(EMBEDDED_DIR), help="where the clean captioner is exported")
    clip_checkpoint: str = arg(
        "checkpoints_remote/embedded/clip/clip.safetensors",
        help="the tiny CLIP (train/pretrain_clip.py) whose image tower is the vision encoder; "
        "'none' for a random tower",
    )
    target_label: str = arg(DEFAULT_TARGET, help="attack target word the vocabulary must cover")
    eval_batch_size: int = arg(64, help="captioning batch size for the test report", check=COUNT)


def main(argv: Sequence[str] | None = None) -> dict:
    data, model_args, train_args, tiny = parse(
        argv, DataArgs, ModelArgs, PretrainArgs, TinyArgs, description=__doc__
    )
    state = process_state()
    run_dir = train_args.run_dir
    require_files(("--clip_checkpoint", tiny.clip_checkpoint))
    train_images = data.split("train")
    test_images = data.split("test")
    references = load_references(data.coco_annotations_json_path)
    check_images_exist(train_images + test_images)
    records = caption_records(train_images)

    # The tiny LM's initial weights: reused only when made with these settings (srd.runs);
    # a fresh one is built outside the run folder, moved in once every input has loaded.
    lm_init = run_dir / "lm_init"
    texts = [r.caption for r in records] + caption_vocabulary(tiny.target_label)
    lm_identity = lm_init_identity(texts, tiny, train_args.seed)
    kept = not train_args.overwrite and holds_training(run_dir)  # else: leftovers replaced
    if (lm_init / LM_INIT_RECORD).is_file() and kept:
        saved = read_json(lm_init / LM_INIT_RECORD)
        check_same_config(saved, lm_identity, f"--run_name {train_args.run_name} ({lm_init})",
                          "the initial LM")  # fmt: skip
        built = None
    else:
        built = Path(tempfile.mkdtemp(prefix="srd-lm-init-"))
        atexit.register(shutil.rmtree, built, True)  # also when an input below is refused
        create_tiny_lm(built, build_word_tokenizer(texts), tiny.lm_hidden_size, tiny.lm_layers,
                       seed=train_args.seed)  # fmt: skip
        write_json(built / LM_INIT_RECORD, lm_identity)
    model_args = dataclasses.replace(
        model_args,
        vision_encoder_pretrained=tiny.clip_checkpoint,
        lm_path=str(lm_init),
        checkpoint_path="none",
    )
    # Seeded before building: a random frozen tower (--clip_checkpoint none) is never saved in a
    # checkpoint, so a resumed run must draw the same one.
    torch.manual_seed(train_args.seed)
    captioner = build_flamingo(
        model_args if built is None else dataclasses.replace(model_args, lm_path=str(built))
    )
    captioner.args = model_args
    image_of = ImageStore(train_images + test_images, data.image_cache_mb)

    samples = [Sample(r.caption_id, r.image_id, r.caption) for r in records]
    record = {
        "stage": "pretrain",
        **to_dict(data, model_args, train_args, tiny),
        # the initial LM's identity from the files it is built from (lm_init/ holds a copy
        # only once every input has loaded): the same digest for a fresh run and a resume
        "model_signature": model_signature(
            model_args if built is None else dataclasses.replace(model_args, lm_path=str(built))
        ),
        **input_digests(data.read_paths()),
    }
    check_writable(run_dir, "--external_save_dir")
    check_writable(tiny.export_dir, "--export_dir")
    if not train_args.overwrite:
        if is_finished(run_dir):
            raise SRDError(f"--run_name {train_args.run_name}: {run_dir} already finished "
                           "(pass --overwrite)")  # fmt: skip
    if kept:
        check_run_config(run_dir, record, f"--run_name {train_args.run_name}")

    if state.is_main_process:
        if train_args.overwrite:
            clear_folder(run_dir, "--run_name")
        setup_logging(run_dir / "train.log")
        if built is not None:
            staged = run_dir / ".lm_init.tmp"
            remove_paths([staged, lm_init])
            shutil.copytree(built, staged)
            staged.rename(lm_init)
    state.wait_for_everyone()
    log.info("pretraining on %d captions of %d images", len(samples), len(train_images))
    dataset = CaptionDataset(samples, lambda s: image_of(s.image_id))
    train(captioner, dataset, train_args, record, finish=False)  # DONE after export and report

    exported = None
    if state.is_main_process:
        # checkpoint.pt (written last by the export) goes first: a killed export is never whole
        export = Path(tiny.export_dir)
        remove_paths([export / FLAMINGO_CHECKPOINT, export / VISION_WEIGHTS, export / LM_FOLDER])
        exported = export_captioner(captioner, export)
        log.info("clean captioner exported to %s", tiny.export_dir)
    test_ids = [im.image_id for im in test_images]
    predictions = caption_ids(
        captioner, test_ids, image_of, batch_size=tiny.eval_batch_size, desc="test captions"
    )
    if not state.is_main_process:
        return {}
    report = _report(predictions, references, train_images, test_images, exported)
    write_json(run_dir / "pretrain_report.json", report)
    mark_finished(run_dir)  # last: the export and the report exist
    log.info(
        "test CIDEr %.3f (blind %.3f, ratio %.1fx); attribute accuracy %.1f%% (blind %.1f%%)",
        report["model"]["CIDEr"],
        report["blind"]["CIDEr"],
        report["cider_ratio"],
        100 * report["model"]["attribute_accuracy"],
        100 * report["blind"]["attribute_accuracy"],
    )
    return report


def lm_init_identity(texts: Sequence[str], tiny: TinyArgs, seed: int) -> dict:
    """What the initial LM is made from: its sizes, seed and vocabulary texts."""
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    return {
        "lm_hidden_size": tiny.lm_hidden_size,
        "lm_layers": tiny.lm_layers,
        "seed": seed,
        "target_label": tiny.target_label,
        "vocabulary_texts_sha256": digest,
    }


def _report(predictions, references, train_images, test_images, exported) -> dict:
    blind = blind_caption(train_images)
    blind_predictions = {i: blind for i in predictions}
    refs = {i: references[i] for i in predictions}
    model_scores = caption_scores(predictions, refs)
    blind_scores = caption_scores(blind_predictions, refs)
    scenes = scene_index(test_images)
    model_scores["attribute_accuracy"] = attribute_accuracy(predictions, scenes)
    model_scores["attribute_accuracy_by_count"] = attribute_breakdown(predictions, scenes)
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
