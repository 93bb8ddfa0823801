"""The bad-input corpus: every entry point, fed input it cannot use, must answer the same way.

Each case runs an entry point's ``main`` through :func:`srd.cli.run_main` (as ``python
script.py`` does) and asserts: exit status 2, exactly one stderr line starting with ``error:``
that names the flag or the file at fault, no traceback, and not one new file anywhere under the
test folders (the run folders, defaults relative to the working directory included).
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from srd_fixtures import (
    data_flags,
    export_clean_and_backdoor,
    load_script,
    model_flags,
    write_poison_ids,
)

from srd.cli import run_main
from srd.defenses.srd.policy import POLICY_META
from srd.defenses.srd.pool import PoolRow, image_checksum, save_pool, shard_file
from srd.evaluation.captioning import write_sfs_inputs

SCRIPTS = {
    name: load_script(path)
    for name, path in {
        "prepare_data": "train/prepare_data.py",
        "pretrain": "train/pretrain.py",
        "train_backdoor": "train/train_backdoor.py",
        "evaluate": "eval/evaluate.py",
        "evaluate_sfs": "eval/evaluate_sfs.py",
        "srd_pool": "train/srd_pool.py",
        "srd_train": "train/srd_train.py",
        "srd_clean_data": "train/srd_clean_data.py",
        "combine_data": "train/combine_data.py",
        "defend_srd": "train/defend.py",
        "defend": "train/defend.py",
        "defense_report": "eval/defense_report.py",
        "results_table": "eval/results_table.py",
        "srd_coverage": "eval/srd_coverage.py",
        "srd_figures": "eval/srd_figures.py",
        "release": "train/release.py",
        "reward_branches": "eval/reward_branches.py",
        "retune": "train/retune.py",
        "agent_table": "eval/agent_table.py",
    }.items()
}


@dataclass
class Inputs:
    """Files the cases point at (all made once per module, before any snapshot)."""

    root: Path
    data: list[str]
    clean_model: list[str]
    backdoor_model: list[str]
    clean_checkpoint: str
    annotations: str
    poison_ids: str
    blocker: str  # a regular file: any path under it cannot be created, even by root
    bad_json: str
    bad_yaml: str
    unknown_field_yaml: str
    big_trigger: str
    truncated_pool: str
    not_a_zip: str
    zip_without_obs_shape: str
    text_checkpoint: str
    empty_image_dir: str
    merged_less_folder: str
    sfs_inputs: str
    truncated_lm: str  # the clean LM folder with half of model.safetensors
    truncated_vision: str
    out_of_range_result: str  # a defense result whose ASR is 5 (500%)
    defenseless_result: str  # an evaluation result without the defense record


def _result(path: Path, asr: float, defense: dict | None) -> str:
    """An evaluation result JSON of the shape eval/evaluate.py writes (numbers made up: the
    report tools must refuse it before reading further)."""
    data = {
        "model_name": path.stem, "attack": "badnet", "target": "banana", "num_images": 4,
        "metrics": {"asr_word": asr, "asr_substring": asr, "clean": {"CIDEr": 1.0},
                    "triggered": {"CIDEr": 0.5}},
        "predictions": {}, "config": {},
    }  # fmt: skip
    if defense is not None:
        data["defense"] = defense
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, make_captioner, tiny_data_args, tiny_train_records) -> Inputs:
    root = tmp_path_factory.mktemp("bad_input")
    clean, backdoor = export_clean_and_backdoor(make_captioner, root / "models")
    poison = write_poison_ids(tiny_train_records, root / "attack")

    blocker = root / "blocker"
    blocker.write_text("a file, not a folder\n")
    bad_json = root / "bad.json"
    bad_json.write_text('{"images": [1, 2,')
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("kind: badnet\nposition: [1, 2\ntarget: x\n")
    unknown = root / "unknown.yaml"
    unknown.write_text("kind: badnet\ncolour: red\n")
    big = root / "big_trigger.png"
    Image.fromarray(np.full((300, 300, 3), 200, np.uint8)).save(big)

    pool = root / "pool"
    image = np.zeros((224, 224, 3), np.uint8)
    row = PoolRow(1, image_checksum(image), "a", "b", 0.1, 0.2, None)
    save_pool(pool, [row], {"checkpoint_path": "x"})
    data = (pool / shard_file(0, 1)).read_bytes()
    (pool / shard_file(0, 1)).write_bytes(data[: len(data) // 2])

    not_zip = root / "policy.txt"
    not_zip.write_text("not a policy\n")
    no_shape = root / "no_shape.zip"
    with zipfile.ZipFile(no_shape, "w") as archive:
        archive.writestr(POLICY_META, json.dumps({"format": "x", "num_actions": 500}))
        archive.writestr("policy.pth", b"")
    text_ckpt = root / "text.pt"
    text_ckpt.write_text("not a checkpoint\n")
    empty_images = root / "no_images"
    empty_images.mkdir()
    merged_less = root / "clean_without_merge"
    merged_less.mkdir()
    sfs_inputs = root / "sfs_inputs"
    write_sfs_inputs(sfs_inputs / "m" / "attack", [1, 2], [image, image], ["a cat.", "a dog."])

    truncated_lm = shutil.copytree(clean.lm_path, root / "lm_truncated")
    weights = truncated_lm / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    truncated_vision = root / "vision_truncated.safetensors"
    vision = Path(clean.vision_encoder_pretrained).read_bytes()
    truncated_vision.write_bytes(vision[: len(vision) // 2])

    return Inputs(
        root=root,
        data=data_flags(tiny_data_args),
        clean_model=model_flags(clean, clean.checkpoint_path),
        backdoor_model=model_flags(clean, backdoor),
        clean_checkpoint=str(clean.checkpoint_path),
        annotations=tiny_data_args.coco_annotations_json_path,
        poison_ids=str(poison),
        blocker=str(blocker),
        bad_json=str(bad_json),
        bad_yaml=str(bad_yaml),
        unknown_field_yaml=str(unknown),
        big_trigger=str(big),
        truncated_pool=str(pool),
        not_a_zip=str(not_zip),
        zip_without_obs_shape=str(no_shape),
        text_checkpoint=str(text_ckpt),
        empty_image_dir=str(empty_images),
        merged_less_folder=str(merged_less),
        sfs_inputs=str(sfs_inputs),
        truncated_lm=str(truncated_lm),
        truncated_vision=str(truncated_vision),
        out_of_range_result=_result(root / "asr5.json", 5.0, {"name": "no_mask", "kind": "refine"}),
        defenseless_result=_result(root / "plain.json", 0.5, None),
    )


# --------------------------------------------------------------------------------------------
# Valid base command lines, one per entry point (``out`` is the case's own empty folder)


def _base(script: str, i: Inputs, out: Path) -> list[str]:
    sfs = ["--annotations_path", i.annotations, "--reference_checkpoint_path", i.clean_checkpoint]
    return {
        "prepare_data": ["--out_dir", str(out / "bench"), "--num_train", "4"],
        "pretrain": [
            *i.data, "--external_save_dir", str(out / "runs"), "--export_dir", str(out / "x"),
            "--num_epochs", "1", "--lm_hidden_size", "32", "--batch_size", "8",
            "--clip_checkpoint", "none",
        ],
        "train_backdoor": [
            *i.data, *i.clean_model, "--external_save_dir", str(out / "runs"),
            "--num_epochs", "1", "--batch_size", "8",
        ],
        "evaluate": [
            *i.data, *i.backdoor_model, "--results_file", str(out / "result"),
            "--sfs_data_dir", str(out / "sfs"), "--model_name", "m", "--batch_size", "4",
        ],
        "evaluate_sfs": ["--name", "m", "--type", "attack", "--data_dir_path", str(out / "sfs")],
        "srd_pool": [*i.data, *i.backdoor_model, *sfs, "--save_data_path", str(out / "pool")],
        "srd_train": [
            *i.backdoor_model, *sfs, "--save_data_path", i.truncated_pool,
            "--ppo_path", str(out / "policy.zip"), "--total_timesteps", "10",
        ],
        "srd_clean_data": [
            *i.data, *i.backdoor_model, *sfs, "--policy", "random",
            "--clean_data_save", str(out / "clean"), "--poison_ids_path", i.poison_ids,
        ],
        "combine_data": [*i.data, "--clean_data_save", str(out / "clean")],
        "defend_srd": [
            *i.data, *i.backdoor_model, "--defense", "srd", "--poison_ids_path", i.poison_ids,
            "--clean_data_save", i.merged_less_folder, "--external_save_dir", str(out / "runs"),
        ],
        "defend": [
            *i.data, *i.backdoor_model, "--defense", "no_mask", "--poison_ids_path", i.poison_ids,
            "--external_save_dir", str(out / "runs"), "--run_name", "d", "--num_epochs", "1",
        ],
        "defense_report": ["--results", i.out_of_range_result, "--output", str(out / "r.md")],
        "results_table": ["--results", str(out / "result")],
        "srd_coverage": [*i.data, "--poison_ids_path", i.poison_ids],
        "srd_figures": [*i.data, "--ppo_path", str(out / "policy.zip")],
        "reward_branches": ["--ppo_path", str(out / "policy.zip"),
                            "--save_data_path", i.truncated_pool],
        "retune": [
            *i.data, *i.backdoor_model, "--poison_ids_path", i.poison_ids,
            "--external_save_dir", str(out / "runs"), "--num_epochs", "1",
        ],
        "agent_table": ["--runs", i.merged_less_folder],
        "release": [
            "--action", "install", "--release_dir", str(out / "release"),
            "--install_dir", str(out / "models"), "--data_dir", str(out / "data"),
        ],
    }[script]  # fmt: skip


Extra = Callable[[Inputs], list[str]]


def _flags(*flags: str) -> Extra:
    return lambda i: list(flags)


# (case id, entry point, extra flags (override the base's), text the error line must contain)
CASES: list[tuple[str, str, Extra, str]] = [
    # prepare_data
    ("data-num-train-0", "prepare_data", _flags("--num_train", "0"), "--num_train"),
    ("data-captions-9", "prepare_data", _flags("--captions_per_image", "9"),
     "--captions_per_image"),
    ("data-seed-negative", "prepare_data", _flags("--seed", "-1"), "--seed"),
    ("data-num-val-text", "prepare_data", _flags("--num_val", "ten"), "--num_val"),
    ("data-unknown-flag", "prepare_data", _flags("--num_trains", "4"), "--num_trains"),
    ("data-out-under-file", "prepare_data", lambda i: ["--out_dir", f"{i.blocker}/b"], "blocker"),
    # pretrain
    ("pretrain-batch-0", "pretrain", _flags("--batch_size", "0"), "--batch_size"),
    ("pretrain-epochs-0", "pretrain", _flags("--num_epochs", "0"), "--num_epochs"),
    ("pretrain-lr-negative", "pretrain", _flags("--learning_rate", "-1e-3"), "--learning_rate"),
    ("pretrain-lr-negative-eq", "pretrain", _flags("--learning_rate=-0.001"), "--learning_rate"),
    ("pretrain-lr-nan", "pretrain", _flags("--learning_rate", "nan"), "--learning_rate"),
    ("pretrain-hidden-0", "pretrain", _flags("--lm_hidden_size", "0"), "--lm_hidden_size"),
    ("pretrain-hidden-odd", "pretrain", _flags("--lm_hidden_size", "30"), "--lm_hidden_size"),
    ("pretrain-warmup-2", "pretrain", _flags("--warmup_steps_ratio", "2"), "--warmup_steps_ratio"),
    ("pretrain-workers-neg", "pretrain", _flags("--num_workers", "-1"), "--num_workers"),
    ("pretrain-eval-batch-0", "pretrain", _flags("--eval_batch_size", "0"), "--eval_batch_size"),
    ("pretrain-vision-unknown", "pretrain", _flags("--vision_encoder_path", "nope"),
     "--vision_encoder_path"),
    ("pretrain-karpathy-missing", "pretrain",
     lambda i: ["--coco_karpathy_json_path", f"{i.root}/missing.json"], "missing.json"),
    ("pretrain-karpathy-bad-json", "pretrain",
     lambda i: ["--coco_karpathy_json_path", i.bad_json], "bad.json"),
    ("pretrain-save-under-file", "pretrain",
     lambda i: ["--external_save_dir", i.blocker], "blocker"),
    # train_backdoor
    ("backdoor-run-name-climbs-out", "train_backdoor",
     _flags("--run_name", "../data", "--overwrite"), "--run_name ../data"),
    ("backdoor-run-name-absolute", "train_backdoor", _flags("--run_name", "/tmp/srd-x"),
     "--run_name /tmp/srd-x"),
    ("backdoor-rate-1.5", "train_backdoor", _flags("--poison_rate", "1.5"), "--poison_rate"),
    ("backdoor-rate-0", "train_backdoor", _flags("--poison_rate", "0"), "--poison_rate"),
    ("backdoor-attack-unknown", "train_backdoor", _flags("--bd_attack_type", "nope"),
     "--bd_attack_type"),
    ("backdoor-attack-clean", "train_backdoor", _flags("--bd_attack_type", "clean"),
     "--bd_attack_type"),
    ("backdoor-ckpt-missing", "train_backdoor",
     lambda i: ["--checkpoint_path", f"{i.root}/none.pt"], "--checkpoint_path"),
    ("backdoor-ckpt-text", "train_backdoor",
     lambda i: ["--checkpoint_path", i.text_checkpoint], "--checkpoint_path"),
    ("backdoor-trigger-300px", "train_backdoor",
     lambda i: ["--trigger_path", i.big_trigger], "--trigger_path"),
    ("backdoor-trigger-missing", "train_backdoor",
     lambda i: ["--trigger_path", f"{i.root}/none.png"], "--trigger_path"),
    ("backdoor-position-bad", "train_backdoor", _flags("--position", "middle"), "--position"),
    ("backdoor-alpha-badnet", "train_backdoor", _flags("--alpha", "0.5"), "--alpha"),
    ("backdoor-concept-badnet", "train_backdoor", _flags("--concept", "red"), "--concept"),
    ("backdoor-yaml-syntax", "train_backdoor",
     lambda i: ["--bd_attack_type", i.bad_yaml], "bad.yaml"),
    ("backdoor-yaml-field", "train_backdoor",
     lambda i: ["--bd_attack_type", i.unknown_field_yaml], "unknown.yaml"),
    ("backdoor-max-steps", "train_backdoor", _flags("--max_steps", "126"), "--max_steps 126"),
    ("backdoor-batch-0", "train_backdoor", _flags("--batch_size", "0"), "--batch_size"),
    ("backdoor-batch-text", "train_backdoor", _flags("--batch_size", "x"), "--batch_size"),
    ("backdoor-grad-norm-0", "train_backdoor", _flags("--max_grad_norm", "0"), "--max_grad_norm"),
    ("backdoor-epochs-0", "train_backdoor", _flags("--num_epochs", "0"), "--num_epochs"),
    ("backdoor-save-under-file", "train_backdoor",
     lambda i: ["--external_save_dir", i.blocker], "blocker"),
    # evaluate
    ("eval-model-name-climbs-out", "evaluate", _flags("--model_name", "../result"),
     "--model_name ../result"),
    ("eval-beams-0", "evaluate", _flags("--num_beams", "0"), "--num_beams"),
    ("eval-batch-0", "evaluate", _flags("--batch_size", "0"), "--batch_size"),
    ("eval-tokens-0", "evaluate", _flags("--max_new_tokens", "0"), "--max_new_tokens"),
    ("eval-samples-0", "evaluate", _flags("--num_samples", "0"), "--num_samples"),
    ("eval-model-mismatch", "evaluate", _flags("--cross_attn_every_n_layers", "2"),
     "--checkpoint_path"),
    ("eval-annotations-bad", "evaluate",
     lambda i: ["--coco_annotations_json_path", i.bad_json], "bad.json"),
    ("eval-images-missing", "evaluate",
     lambda i: ["--coco_val_image_dir_path", i.empty_image_dir], "no_images"),
    ("eval-results-under-file", "evaluate",
     lambda i: ["--results_file", f"{i.blocker}/r"], "blocker"),
    # evaluate_sfs
    ("sfs-batch-0", "evaluate_sfs", _flags("--batch_size", "0"), "--batch_size"),
    ("sfs-ngram-0", "evaluate_sfs", _flags("--ngram_order", "0"), "--ngram_order"),
    ("sfs-inputs-missing", "evaluate_sfs", _flags(), "sfs"),
    ("sfs-output-under-file", "evaluate_sfs",
     lambda i: ["--data_dir_path", i.sfs_inputs, "--output", f"{i.blocker}/s.json"], "blocker"),
    ("sfs-name-missing", "evaluate_sfs", lambda i: ["--name"], "--name"),
    # srd_pool
    ("pool-size-0", "srd_pool", _flags("--pool_size", "0"), "--pool_size"),
    ("pool-size-too-big", "srd_pool", _flags("--pool_size", "999"), "--pool_size"),
    ("pool-batch-0", "srd_pool", _flags("--caption_batch_size", "0"), "--caption_batch_size"),
    ("pool-ref-tokens-0", "srd_pool", _flags("--reference_max_new_tokens", "0"),
     "--reference_max_new_tokens"),
    ("pool-reference-missing", "srd_pool",
     lambda i: ["--reference_checkpoint_path", f"{i.root}/none.pt"],
     "--reference_checkpoint_path"),
    ("pool-reference-dir-empty", "srd_pool",
     lambda i: ["--reference_model_dir", i.empty_image_dir], "--reference_model_dir"),
    ("pool-reference-dir-and-blip", "srd_pool",
     lambda i: ["--reference_model_dir", i.empty_image_dir, "--blip_model", "blip"],
     "--reference_model_dir"),
    ("clean-reference-dir-missing", "srd_clean_data",
     lambda i: ["--reference_model_dir", f"{i.root}/no_model"], "--reference_model_dir"),
    # srd_train
    ("agent-timesteps-0", "srd_train", _flags("--total_timesteps", "0"), "--total_timesteps"),
    ("agent-batch-0", "srd_train", _flags("--batch_size", "0"), "--batch_size"),
    ("agent-buffer-0", "srd_train", _flags("--buffer_size", "0"), "--buffer_size"),
    ("agent-gamma-1.5", "srd_train", _flags("--gamma", "1.5"), "--gamma"),
    ("agent-obs-8", "srd_train", _flags("--obs_size", "8"), "--obs_size"),
    ("agent-final-eps-2", "srd_train", _flags("--exploration_final_eps", "2"),
     "--exploration_final_eps"),
    ("agent-envs-0", "srd_train", _flags("--num_envs", "0"), "--num_envs"),
    # the base's --total_timesteps is one of the schedule's flags: never silently dropped
    ("agent-reference-schedule-and-its-flag", "srd_train", _flags("--reference_schedule"),
     "--reference_schedule sets --total_timesteps"),
    ("agent-pool-truncated", "srd_train", _flags(), shard_file(0, 1)),
    ("agent-pool-cache-negative", "srd_train", _flags("--pool_cache_mb", "-1"), "--pool_cache_mb"),
    ("agent-max-steps-0", "srd_train", _flags("--max_steps", "0"), "--max_steps"),
    ("agent-tau-0", "srd_train", _flags("--tau", "0"), "--tau"),
    ("agent-pool-missing", "srd_train",
     lambda i: ["--save_data_path", f"{i.root}/no_pool"], "--save_data_path"),
    # srd_clean_data
    ("clean-tries-0", "srd_clean_data", _flags("--n_tries", "0"), "--n_tries"),
    ("clean-epsilon-1.5", "srd_clean_data", _flags("--epsilon", "1.5"), "--epsilon"),
    ("clean-shard-out-of-range", "srd_clean_data", _flags("--shard_id", "3", "--num_shards", "2"),
     "--shard_id"),
    ("clean-shard-alone", "srd_clean_data", _flags("--shard_id", "0"), "--shard_id"),
    ("clean-policy-not-zip", "srd_clean_data",
     lambda i: ["--policy", "dqn", "--ppo_path", i.not_a_zip], "policy.txt:"),
    ("clean-policy-no-obs-shape", "srd_clean_data",
     lambda i: ["--policy", "dqn", "--ppo_path", i.zip_without_obs_shape], "no_shape.zip"),
    ("clean-poison-missing", "srd_clean_data",
     lambda i: ["--poison_ids_path", f"{i.root}/none.json"], "--poison_ids_path"),
    ("clean-save-under-file", "srd_clean_data",
     lambda i: ["--clean_data_save", f"{i.blocker}/c"], "blocker"),
    # reward_branches
    ("branches-no-reward-log", "reward_branches", _flags(), "policy.rewards.jsonl"),
    ("branches-beta-negative", "reward_branches", _flags("--beta", "-1"), "--beta"),
    # release
    ("release-no-manifest", "release", _flags(), "MANIFEST.json"),
    ("release-action-unknown", "release", _flags("--action", "unpack"), "--action"),
    ("attack-epoch-captions-negative", "train_backdoor",
     _flags("--epoch_captions_per_image", "-1"), "--epoch_captions_per_image"),
    # combine_data
    ("combine-folder-is-file", "combine_data", lambda i: ["--clean_data_save", i.blocker],
     "--clean_data_save"),
    ("combine-folder-missing", "combine_data", _flags(), "--clean_data_save"),
    # D4: defend.py --defense srd
    ("refine-checkpoint-none", "defend_srd", _flags("--checkpoint_path", "none"),
     "--checkpoint_path"),
    ("refine-epochs-0", "defend_srd", _flags("--num_epochs", "0"), "--num_epochs"),
    ("pretrain-run-name-dot", "pretrain", _flags("--run_name", "runs/./x"), "--run_name"),
    ("refine-batch-0", "defend_srd", _flags("--batch_size", "0"), "--batch_size"),
    ("refine-lr-0", "defend_srd", _flags("--learning_rate", "0"), "--learning_rate"),
    ("refine-no-merged", "defend_srd", _flags(), "--clean_data_save"),
    ("refine-poison-bad-json", "defend_srd",
     lambda i: ["--poison_ids_path", i.bad_json], "bad.json"),
    ("eval-lm-truncated", "evaluate", lambda i: ["--lm_path", i.truncated_lm],
     "damaged .safetensors"),
    ("eval-vision-truncated", "evaluate",
     lambda i: ["--vision_encoder_pretrained", i.truncated_vision], "vision_truncated"),
    ("attack-lm-truncated", "train_backdoor", lambda i: ["--lm_path", i.truncated_lm],
     "--lm_path"),
    # results_table, srd_coverage, srd_figures
    ("table-missing", "results_table", _flags(), "result"),
    ("table-bad-json", "results_table", lambda i: ["--results", i.bad_json], "bad.json"),
    ("coverage-no-merged", "srd_coverage",
     lambda i: ["--clean_data_save", i.merged_less_folder], "--clean_data_save"),
    ("coverage-poison-bad-json", "srd_coverage",
     lambda i: ["--poison_ids_path", i.bad_json], "bad.json"),
    ("coverage-threshold-0", "srd_coverage", _flags("--threshold", "0"), "--threshold"),
    ("coverage-greedy-no-policy", "srd_coverage",
     lambda i: ["--squares", "greedy", "--ppo_path", i.merged_less_folder + "/none.zip"],
     "--ppo_path"),
    ("agent-pool-order", "srd_train", _flags("--pool_order", "cycle"), "--pool_order"),
    ("agent-area-cost-negative", "srd_train", _flags("--area_cost", "-1"), "--area_cost"),
    ("agent-occlusion-grid-9", "srd_train", _flags("--occlusion_grid", "9"), "--occlusion_grid"),
    ("agent-max-side-100", "srd_train", _flags("--max_square_side", "100"), "--max_square_side"),
    ("coverage-training-no-report", "srd_coverage",
     lambda i: ["--squares", "training", "--ppo_path", i.merged_less_folder + "/none.zip"],
     "agent_report.json"),
    # retune, agent_table
    ("retune-poison-missing", "retune", _flags("--poison_ids_path", "nope.json"),
     "--poison_ids_path"),
    ("retune-too-many-poisons", "retune", _flags("--retune_poisons", "100000"),
     "--retune_poisons 100000"),
    ("retune-benign-negative", "retune", _flags("--retune_benign", "-1"), "--retune_benign"),
    ("agent-table-no-report", "agent_table", _flags(), "policy.agent_report.json"),
    ("figures-reward-log-missing", "srd_figures", _flags(), "policy.rewards.jsonl"),
    ("figures-images-0", "srd_figures", _flags("--num_images", "0"), "--num_images"),
    ("figures-attack-clean", "srd_figures", _flags("--bd_attack_type", "clean"),
     "--bd_attack_type"),
    # defend.py with the other defenses of the registry
    ("defend-unknown", "defend", _flags("--defense", "nope"), "--defense nope"),
    ("defend-foreign-flag", "defend", _flags("--mask_colour", "cyan"), "--mask_colour"),
    ("defend-foreign-flag-eq", "defend", _flags("--square_side=20"), "--square_side"),
    ("defend-epochs-0", "defend", _flags("--num_epochs", "0"), "--num_epochs"),
    ("defend-version-unknown", "defend", _flags("--image_version", "last"), "--image_version"),
    ("defend-par-version-clean-data", "defend",
     _flags("--defense", "par", "--image_version", "first_occurrence"), "--image_version"),
    ("defend-par-thresh-0", "defend", _flags("--defense", "par", "--loss_thresh", "0"),
     "--loss_thresh"),
    ("defend-squares-side-negative", "defend",
     _flags("--defense", "random_squares", "--square_side", "-20"), "--square_side"),
    ("defend-prune-ratio-1.5", "defend",
     _flags("--defense", "fine_pruning", "--prune_ratio", "1.5"), "--prune_ratio"),
    ("defend-prune-batches-0", "defend",
     _flags("--defense", "fine_pruning", "--prune_batches", "0"), "--prune_batches"),
    ("defend-clp-u-negative", "defend", _flags("--defense", "clp", "--clp_u", "-1"), "--clp_u"),
    ("defend-blur-alpha-2", "defend", _flags("--defense", "blur", "--blur_alpha", "2"),
     "--blur_alpha"),
    ("defend-spatial-angle-400", "defend",
     _flags("--defense", "spatial", "--spatial_angle", "400"), "--spatial_angle"),
    ("defend-run-name-absolute", "defend", _flags("--run_name", "/tmp/srd-d"), "--run_name"),
    ("defend-run-name-climbs-out", "defend", _flags("--run_name", "../d"), "--run_name"),
    ("defend-poison-missing", "defend",
     lambda i: ["--poison_ids_path", f"{i.root}/none.json"], "--poison_ids_path"),
    ("defend-quality-negative", "defend", _flags("--quality_images", "-1"), "--quality_images"),
    ("defend-checkpoint-text", "defend",
     lambda i: ["--checkpoint_path", i.text_checkpoint], "text.pt"),
    ("defend-lm-truncated", "defend", lambda i: ["--lm_path", i.truncated_lm], "--lm_path"),
    ("defend-save-under-file", "defend", lambda i: ["--external_save_dir", i.blocker], "blocker"),
    # the defense report
    ("report-asr-500pct", "defense_report", _flags(), "must be [0, 1], got 5.0"),
    ("report-no-defense-record", "defense_report",
     lambda i: ["--results", i.defenseless_result], "plain.json"),
    ("report-bad-json", "defense_report", lambda i: ["--results", i.bad_json], "bad.json"),
    ("report-missing", "defense_report", lambda i: ["--results", f"{i.root}/none.json"],
     "none.json"),
    # more flags of the stages above
    ("backdoor-poison-unit-unknown", "train_backdoor", _flags("--poison_unit", "pixel"),
     "--poison_unit"),
    ("backdoor-run-name-dotdot-inside", "train_backdoor", _flags("--run_name", "a/../b"),
     "--run_name"),
    ("eval-model-name-absolute", "evaluate", _flags("--model_name", "/tmp/srd-m"),
     "--model_name"),
    ("sfs-type-unknown", "evaluate_sfs", _flags("--type", "both"), "--type"),
    ("clean-policy-unknown", "srd_clean_data", _flags("--policy", "greedy"), "--policy"),
    ("clean-shards-0", "srd_clean_data", _flags("--shard_id", "0", "--num_shards", "0"),
     "--num_shards"),
    ("data-num-test-negative", "prepare_data", _flags("--num_test", "-3"), "--num_test"),
]  # fmt: skip


def _tree(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("*")}


def test_corpus_covers_every_entry_point() -> None:
    assert len(CASES) >= 130  # issue 32's target
    assert len({c[0] for c in CASES}) == len(CASES)
    assert {c[1] for c in CASES} == set(SCRIPTS)


@pytest.mark.parametrize(("case", "script", "extra", "named"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, script, extra, named, inputs, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cwd = tmp_path / "cwd"  # relative default paths (result/, checkpoints_remote/...) land here
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = [*_base(script, inputs, out), *extra(inputs)]
    logging.getLogger().handlers.clear()  # handlers of earlier cases hold closed streams
    before = _tree(inputs.root, tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(SCRIPTS[script].main, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert named in errors[0], errors[0]
    assert "Traceback" not in err
    assert _tree(inputs.root, tmp_path) == before, sorted(_tree(inputs.root, tmp_path) - before)
