"""Stage B: evaluation (run/run_eval.sh).

Captions the test split once clean and once with the attack's trigger, scores both with
pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr), measures the attack success rate and the
false-trigger rate, and writes ``<results_file>/<model_name>.json`` plus the inputs of the SFS
stage (``<sfs_data_dir>/<model_name>/{clean,attack}/``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from srd.attacks.registry import AttackArgs
from srd.captioner.args import ModelArgs
from srd.captioner.engine import process_state
from srd.captioner.factory import load_captioner
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data.records import DataArgs, ImageStore, check_images_exist, load_references
from srd.defenses import DefenseName, build_defense, chosen_defense
from srd.defenses.registry import CHECKPOINT_KINDS
from srd.defenses.stage import evaluation_defense_record, transform_quality
from srd.errors import SRDError
from srd.evaluation.captioning import SFS_KINDS, evaluate_captioner, write_sfs_inputs
from srd.flags import COUNT, SEED, Range, at_least
from srd.io import ensure_dir, read_json, setup_logging, write_json, writer_lock
from srd.runs import check_run_name, check_same_config, check_writable, clear_folder, remove_paths

log = logging.getLogger("evaluate")


@dataclass
class EvalArgs:
    """Evaluation: output names, batching, decoding."""

    results_file: str = arg("result", help="folder of result JSONs")
    model_name: str = arg("test", help="result file name: <results_file>/<model_name>.json")
    sfs_data_dir: str = arg("result/sfs_inputs", help="where the SFS stage's inputs go")
    batch_size: int = arg(32, help="captioning batch size per process", check=COUNT)
    num_beams: int = arg(3, help="beam search width", check=COUNT)
    max_new_tokens: int = arg(20, help="longest caption in tokens", check=COUNT)
    num_samples: int = arg(
        -1,
        help="evaluate a seeded random subset of the test split (-1: all)",
        check=Range(low=1, also=(-1,), why="-1: all"),
    )
    seed: int = arg(42, help="seed of the subset draw and of the sampled captions", check=SEED)
    implant_diagnostics: bool = arg(
        True,
        help="also report the teacher-forced target probability and the ASR under sampling "
        "(tells 'implanted but hidden by beam search' from 'not implanted')",
    )
    defense_run: str = arg(
        "",
        help="the train/defend.py run folder whose defense.json describes this evaluation "
        "(needed for a defense run on the clean captioner; default: found from "
        "--checkpoint_path's folder)",
    )
    feature_cache: bool = arg(
        True,
        help="compute the frozen tower's tokens of each test image version once for the beam, "
        "teacher-forced and sampled passes (the same numbers; --feature_cache_mb bounds it)",
    )
    feature_cache_mb: float = arg(
        4096, help="most MiB of cached tower features kept", check=at_least(0)
    )
    overwrite: bool = arg(False, help="replace an existing result file")


def main(argv: Sequence[str] | None = None) -> dict:
    cls = chosen_defense(argv)  # a test-time defense's own flags join the evaluation's
    data, model_args, attack_args, ev, defense_args, own = parse(
        argv, DataArgs, ModelArgs, AttackArgs, EvalArgs, DefenseName, cls.Args, description=__doc__
    )
    defense = build_defense(cls.name, own)
    if defense.kind in CHECKPOINT_KINDS:
        raise SRDError(
            f"--defense {defense.name}: a defense that writes a checkpoint ({defense.kind}); run "
            "train/defend.py and evaluate the checkpoint it writes (its record is read from "
            "the checkpoint's folder)"
        )
    state = process_state()
    out_path = Path(ev.results_file) / f"{check_run_name(ev.model_name, '--model_name')}.json"
    sfs_folder = Path(ev.sfs_data_dir) / ev.model_name
    attack = attack_args.build()
    config = {**to_dict(data, model_args, attack_args, ev, defense_args, own)}
    config["attack"] = attack.to_dict() if attack else None
    if out_path.exists() and not ev.overwrite:
        saved = read_json(out_path, flag="--model_name")
        where = f"--model_name {ev.model_name} ({out_path})"
        if isinstance(saved, dict) and isinstance(saved.get("config"), dict):
            check_same_config(saved["config"], config, where, "the result", ["overwrite"])
        raise SRDError(f"{where}: exists with these settings (pass --overwrite to redo it)")
    records = data.split("test")
    if ev.num_samples > 0 and ev.num_samples < len(records):
        pick = np.random.default_rng(ev.seed).choice(len(records), ev.num_samples, replace=False)
        records = [records[i] for i in sorted(pick)]
    check_images_exist(records)
    references = load_references(data.coco_annotations_json_path)
    missing = [r.image_id for r in records if r.image_id not in references]
    if missing:
        raise SRDError(
            f"--coco_annotations_json_path {data.coco_annotations_json_path}: "
            f"no captions for test image {missing[0]}"
        )
    check_writable(ev.results_file, "--results_file")
    check_writable(sfs_folder, "--sfs_data_dir")
    check_sfs_owner(sfs_folder, out_path, ev.overwrite)
    defense_record = evaluation_defense_record(model_args.checkpoint_path, defense, ev.defense_run)
    captioner = load_captioner(model_args, device=state.device)
    defense.patch_model(captioner)  # a test-time defense acting inside the model (token_prune)
    if ev.feature_cache:  # nothing trains here: the tower is frozen for the cache's check
        captioner.model.vision_encoder.requires_grad_(False)
        captioner.enable_feature_cache(ev.feature_cache_mb)
    # One writer per result: a second evaluation under this name waits for nothing, it stops.
    with writer_lock(out_path, "--model_name") if state.is_main_process else nullcontext():
        if state.is_main_process and out_path.exists() and not ev.overwrite:
            raise SRDError(f"--model_name {ev.model_name}: {out_path} was written meanwhile "
                           "by another evaluation (pass --overwrite to replace it)")  # fmt: skip
        # Every input is loaded: now the outputs. The result JSON is the "finished" signal, so it
        # goes first and comes back last; the SFS inputs of an unfinished run are never kept.
        if state.is_main_process:
            ensure_dir(ev.results_file, "--results_file")
            remove_paths([out_path])
            clear_folder(sfs_folder, "--sfs_data_dir")
            setup_logging(Path(ev.results_file) / f"{ev.model_name}.log")
        images = ImageStore(records, data.image_cache_mb)
        result = evaluate_captioner(
            captioner,
            images,
            references,
            attack,
            batch_size=ev.batch_size,
            num_beams=ev.num_beams,
            max_new_tokens=ev.max_new_tokens,
            target=attack_args.target_label,
            implant_diagnostics=ev.implant_diagnostics,
            seed=ev.seed,
            transform=defense.transform(),
        )
        if not state.is_main_process:
            return {}
        if defense_record is not None and defense.kind == "test_time":
            defense_record = {**defense_record, **defense.test_time_report()}
        if defense_record is not None and defense.transform() is not None:
            # what the transform does to the images it sees (test images; training ones untouched)
            quality = transform_quality(images.ids(), images, defense.transform(), seed=ev.seed)
            defense_record = {**defense_record, "image_quality": {**quality, "images": "test"}}
        result = {"model_name": ev.model_name, **result, "defense": defense_record}
        result["config"] = config
        _write_sfs(sfs_folder, images, result)
        write_json(sfs_folder / SFS_OWNER, {"result": str(out_path.resolve())})
        write_json(out_path, result)  # last: the stage's "finished" signal (run_*.sh skip on it)
    m = result["metrics"]
    log.info(
        "%s: clean CIDEr %.3f | triggered CIDEr %s | ASR %s | false-trigger %.1f%%",
        ev.model_name,
        m["clean"]["CIDEr"],
        f"{m['triggered']['CIDEr']:.3f}" if m["triggered"] else "-",
        f"{100 * m['asr_substring']:.1f}%" if m["asr_substring"] is not None else "-",
        100 * m["false_trigger_substring"],
    )
    if result.get("implant"):
        im = result["implant"]
        log.info(
            "implant: target prob %.3f triggered vs %.3f clean (top-1 at a boundary: %.1f%% vs "
            "%.1f%%); sampled ASR %.1f%% vs false-trigger %.1f%%",
            im["triggered"]["target_prob_mean"],
            im["clean"]["target_prob_mean"],
            100 * im["triggered"]["target_top1_share"],
            100 * im["clean"]["target_top1_share"],
            100 * im["triggered"]["sampled_asr_substring"],
            100 * im["clean"]["sampled_asr_substring"],
        )
    log.info("wrote %s", out_path)
    return result


SFS_OWNER = "owner.json"
"""In an SFS inputs folder: the result JSON whose captions it holds."""


def check_sfs_owner(folder: Path, result: Path, overwrite: bool) -> None:
    """SRDError when ``folder`` holds the SFS inputs of another result that still exists (the
    same --model_name with another --results_file would otherwise clear them, and the SFS stage
    would score this result's captions under that name), unless ``overwrite``."""
    owner = folder / SFS_OWNER
    if overwrite or not owner.is_file():
        return
    claimed = Path(str(read_json(owner, flag="--sfs_data_dir").get("result", "")))
    if claimed != result.resolve() and claimed.is_file():
        raise SRDError(
            f"--sfs_data_dir {folder.parent}: {folder} holds the SFS inputs of {claimed}; "
            "choose another --model_name or --sfs_data_dir (or --overwrite to replace them)"
        )


def _write_sfs(folder: Path, images: ImageStore, result: dict) -> None:
    """SFS inputs: clean images with the captions made on clean ('clean') and triggered
    ('attack') images."""
    for kind, key in SFS_KINDS.items():
        preds = result["predictions"][key]
        if not preds:
            continue
        ids = [int(i) for i in preds]
        write_sfs_inputs(folder / kind, ids, [images(i) for i in ids], list(preds.values()))


if __name__ == "__main__":
    run_main(main)
