"""Two CPU processes under torchrun: DDP training and sharded captioning gathered by id.

``accelerate launch --cpu --num_processes 2`` silently runs one process on this kind of machine;
``torchrun --nproc_per_node 2`` gives two gloo ranks, which accelerate must see as MULTI_CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from srd_fixtures import torchrun_cpu_ranks

from srd.captioner.args import ModelArgs
from srd.captioner.checkpoint import export_captioner
from srd.captioner.engine import TRAIN_LOG
from srd.captioner.factory import load_captioner
from srd.captioner.runfiles import FINAL_WEIGHTS
from srd.data.records import DataArgs
from srd.evaluation.captioning import caption_ids

TIMEOUT_S = 600

SCRIPT = '''
"""Run by torchrun: train the exported captioner 1 epoch, then caption test ids sharded."""
import hashlib, json, sys

import torch

from srd.cli import end_process_group
from srd.data.records import load_image
from srd.captioner.engine import CaptionDataset, Sample, TrainArgs, process_state, train
from srd.evaluation.captioning import caption_ids
from srd.captioner.args import ModelArgs
from srd.captioner.checkpoint import trainable_state_dict
from srd.captioner.factory import load_captioner

cfg = json.loads(open(sys.argv[1]).read())
state = process_state()
images = {int(k): load_image(v) for k, v in cfg["image_paths"].items()}
model_args = ModelArgs(**cfg["model_args"])

captioner = load_captioner(model_args)
samples = [Sample(**s) for s in cfg["samples"]]
dataset = CaptionDataset(samples, lambda s: images[s.image_id])
train(captioner, dataset, TrainArgs(**cfg["train_args"]), {"stage": "two-process smoke"})
weights = trainable_state_dict(captioner.model)
digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights)))

predictions = caption_ids(
    load_captioner(model_args), cfg["caption_ids"], images.__getitem__, **cfg["caption_kw"]
)
report = {
    "process_index": state.process_index,
    "num_processes": state.num_processes,
    "distributed_type": str(state.distributed_type),
    "trained_digest": digest.hexdigest(),
    "captions": {str(k): v for k, v in predictions.items()},
}
with open(f"{cfg['out_dir']}/rank{state.process_index}.json", "w") as f:
    json.dump(report, f)
end_process_group()  # as every entry point does: gloo ranks may abort in teardown otherwise
'''

CAPTION_KW = {"batch_size": 3, "num_beams": 2, "max_new_tokens": 8}


def _digest(weights: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(
        b"".join(weights[k].numpy().tobytes() for k in sorted(weights))
    ).hexdigest()


def _optimizer_steps(checkpoint: Path) -> set[int]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["optimizer_state_dict"]
    return {int(s["step"]) for s in state["state"].values()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, make_captioner) -> ModelArgs:
    """A varied tiny captioner exported like the pretrain stage does (files both ranks load)."""
    return export_captioner(make_captioner(seed=21), tmp_path_factory.mktemp("exported"))


@pytest.fixture(scope="module")
def two_process_run(
    tmp_path_factory, exported, tiny_samples, tiny_train_records, tiny_test_records
):
    root = tmp_path_factory.mktemp("two_process")
    out_dir = root / "out"
    out_dir.mkdir()
    cfg = {
        "model_args": dataclasses.asdict(exported),
        "image_paths": {
            str(r.image_id): str(r.path) for r in tiny_train_records + tiny_test_records
        },
        "samples": [dataclasses.asdict(s) for s in tiny_samples],
        "train_args": {
            "run_name": "smoke",
            "external_save_dir": str(root / "runs"),
            "batch_size": 4,
            "num_epochs": 1,
            "seed": 3,
        },
        "caption_ids": [r.image_id for r in tiny_test_records],
        "caption_kw": CAPTION_KW,
        "out_dir": str(out_dir),
    }
    (root / "config.json").write_text(json.dumps(cfg))
    (root / "script.py").write_text(SCRIPT)
    proc = torchrun_cpu_ranks([str(root / "script.py"), str(root / "config.json")], TIMEOUT_S, root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    return root / "runs" / "smoke", reports


def test_two_process_training(two_process_run, tiny_samples) -> None:
    run_dir, reports = two_process_run
    assert [r["process_index"] for r in reports] == [0, 1]
    assert {r["num_processes"] for r in reports} == {2}
    assert {r["distributed_type"] for r in reports} == {"DistributedType.MULTI_CPU"}
    for name in ("checkpoint_0.pt", FINAL_WEIGHTS, TRAIN_LOG, "config.json", "DONE"):
        assert (run_dir / name).is_file(), name
    # each rank took half of the 16 samples: 2 optimiser steps of 4, not 4 steps as one process
    assert len(tiny_samples) == 16
    assert _optimizer_steps(run_dir / "checkpoint_0.pt") == {2}
    # DDP kept both replicas identical, and rank 0 saved exactly them
    assert reports[0]["trained_digest"] == reports[1]["trained_digest"]
    final = torch.load(run_dir / FINAL_WEIGHTS, map_location="cpu", weights_only=True)
    assert _digest(final["model_state_dict"]) == reports[0]["trained_digest"]


def test_two_process_captions_equal_one_process(
    two_process_run, exported, tiny_images, tiny_test_records
) -> None:
    _, reports = two_process_run
    ids = [r.image_id for r in tiny_test_records]
    alone = caption_ids(load_captioner(exported), ids, tiny_images.__getitem__, **CAPTION_KW)
    assert list(alone) == ids and len(set(alone.values())) > 1
    for report in reports:
        assert report["captions"] == {str(i): c for i, c in alone.items()}


@pytest.mark.slow
def test_pretrain_entry_point_on_two_processes(tmp_path: Path, tiny_data_args: DataArgs) -> None:
    """train/pretrain.py under torchrun: one run, trained on both ranks, exported once."""
    data_flags = [f"--{k}={v}" for k, v in dataclasses.asdict(tiny_data_args).items()]
    script = Path(__file__).parents[1] / "train" / "pretrain.py"
    flags = [
        "--num_epochs=1",
        "--batch_size=4",
        f"--external_save_dir={tmp_path / 'runs'}",
        f"--export_dir={tmp_path / 'export'}",
        "--lm_hidden_size=32",
        "--perceiver_depth=1",
        "--perceiver_num_latents=4",
        "--eval_batch_size=8",
        "--clip_checkpoint=none",
    ]
    proc = torchrun_cpu_ranks([str(script), *data_flags, *flags], TIMEOUT_S, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "runs" / "embedded" / "pretrain"
    for name in ("checkpoint_0.pt", FINAL_WEIGHTS, "DONE", "pretrain_report.json"):
        assert (run_dir / name).is_file(), name
    # 24 images x 5 captions = 120 samples, 60 per rank in batches of 4
    assert _optimizer_steps(run_dir / "checkpoint_0.pt") == {15}
    assert len((run_dir / TRAIN_LOG).read_text().splitlines()) == 1  # one process wrote the log
    for name in ("vision.safetensors", "checkpoint.pt", "lm/config.json"):
        assert (tmp_path / "export" / name).is_file(), name
    report = json.loads((run_dir / "pretrain_report.json").read_text())
    assert report["num_test_images"] == 8
