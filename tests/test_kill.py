"""Kill tests: every stage that writes files survives ``kill -9`` at a random moment.

For each stage the entry point runs once uninterrupted (folder ``a``), then once more in folder
``b`` as a subprocess that gets SIGKILL after a seeded random share of the first run's wall
time; the same command is run again (``--resume_from_checkpoint`` for the training stages,
as run/run_train.sh does) and its outputs must equal the uninterrupted run's, bit for bit
where the stage is deterministic (weights, poison ids, captions, pool images, chosen squares).
Slow: each stage starts three Python processes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from srd_fixtures import (
    REPO,
    data_flags,
    export_clean_and_backdoor,
    load_script,
    model_flags,
    write_poison_ids,
)

from srd.defenses.srd.merge import MERGED_FILE
from srd.io import DONE_MARKER

pytestmark = pytest.mark.slow

KILL_SEED = int(os.environ.get("SRD_KILL_SEED", "12"))
"""Seed of the kill moments (set SRD_KILL_SEED to try other moments)."""


@dataclass
class Setup:
    root: Path
    data: list[str]
    clean: list[str]
    backdoor: list[str]
    sfs: list[str]
    poison_ids: Path
    merged_clean: Path
    clean_args: Any  # the clean captioner's ModelArgs (model_flags gives its flags)
    clean_checkpoint: Path
    backdoor_checkpoint: Path
    pool: Path  # a finished D1 pool of the backdoored model (D2's input)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_captioner, tiny_data_args, tiny_train_records, tiny_benchmark):
    root = tmp_path_factory.mktemp("kill")
    clean, backdoor = export_clean_and_backdoor(make_captioner, root / "models")
    poison_ids = write_poison_ids(tiny_train_records, root / "attack")
    sfs = ["--reference_checkpoint_path", clean.checkpoint_path,
           "--annotations_path", str(tiny_benchmark.train_annotations_json),
           "--num_beams", "2", "--max_new_tokens", "6", "--reference_num_beams", "2",
           "--caption_batch_size", "4"]  # fmt: skip
    s = Setup(
        root=root,
        data=data_flags(tiny_data_args),
        clean=model_flags(clean, clean.checkpoint_path),
        backdoor=model_flags(clean, backdoor),
        sfs=sfs,
        poison_ids=poison_ids,
        merged_clean=root / "clean_for_refine",
        clean_args=clean,
        clean_checkpoint=Path(clean.checkpoint_path),
        backdoor_checkpoint=Path(backdoor),
        pool=root / "pool",
    )
    # D4 needs a merged cleaning manifest: one random-policy cleaning run, merged.
    torch.set_num_threads(1)
    srd = ["--clean_data_save", str(s.merged_clean), "--poison_ids_path", str(poison_ids)]
    load_script("train/srd_clean_data.py").main(
        [*s.data, *s.backdoor, *sfs, "--policy", "random", *srd]
    )
    load_script("train/combine_data.py").main([*s.data, *srd])
    assert (s.merged_clean / MERGED_FILE).is_file()
    load_script("train/srd_pool.py").main(
        [*s.data, *s.backdoor, *sfs, "--save_data_path", str(s.pool), "--pool_size", "8"]
    )
    return s


def _run(
    script: str,
    argv: list[str],
    cwd: Path,
    watch: Path | Callable[[], bool] | None = None,
    kill_share: float | None = None,
    work_seconds: float | None = None,
    expect: int = 0,
) -> dict:
    """Run an entry point as ``python script ...``.

    ``watch`` is the first output the stage writes once its inputs are checked (or a test of
    the run's files); the time from its appearance to the end is the stage's work time. With
    ``kill_share``, the process gets SIGKILL ``kill_share * work_seconds`` after ``watch``
    appears. A run that is not killed must exit with ``expect``.
    """
    ready = watch if callable(watch) else (lambda: watch is not None and watch.exists())
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    cwd.mkdir(parents=True, exist_ok=True)
    # stderr to a file, not a pipe: a pipe nobody reads until the end fills up with progress
    # bars and blocks the child
    err_path = cwd.parent / f"{cwd.name}.stderr"
    start = time.monotonic()
    with open(err_path, "a", encoding="utf-8") as err_file:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / script), *argv],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
    seen = kill_at = None
    killed = False
    while proc.poll() is None:
        now = time.monotonic()
        if seen is None and ready():
            seen = now
            if kill_share is not None:
                kill_at = now + kill_share * work_seconds
        if kill_at is not None and now >= kill_at:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait(timeout=900)
    end = time.monotonic()
    err = err_path.read_text(encoding="utf-8", errors="replace")
    if not killed:
        assert proc.returncode == expect, f"{script} exit {proc.returncode}:\n{err[-3000:]}"
    return {
        "seconds": end - start,
        "work": None if seen is None else end - seen,
        "killed": killed,
        "stderr": err,
    }


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _kill_and_resume(
    stage: str,
    script: str,
    argv: Callable[[Path], list[str]],
    compare: Callable[[Path, Path], None],
    resume: list[str],
    watch: str,
    done: Callable[[Path], bool],
    tmp_path: Path,
) -> None:
    """Uninterrupted run in a/, killed + re-run in b/, then ``compare(a, b)``.

    The kill comes a seeded random share of the first run's work time after ``watch`` (a path
    relative to the run's folder) appears; a run that still ends first, or whose kill lands
    after its "finished" signal (``done``), is tried again with half the share, in a fresh
    folder.
    """
    first = _run(script, argv(tmp_path / "a"), tmp_path / "a", tmp_path / "a" / watch)
    assert first["work"] is not None, f"{stage} never wrote {watch}"
    share = random.Random(f"{KILL_SEED}:{stage}").uniform(0.1, 0.8)
    for attempt in range(4):
        b = tmp_path / f"b{attempt}"
        killed = _run(script, argv(b), b, b / watch, share, first["work"])
        if killed["killed"] and not done(b):
            break
        share /= 2
    left = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    print(f"\nKILL {stage}: work {first['work']:.1f} s of {first['seconds']:.1f} s, killed at "
          f"{share:.2f} of the work (attempt {attempt + 1}); files left: {left}")  # fmt: skip
    assert killed["killed"] and not done(b), f"{stage} always finished before the kill"
    _run(script, [*argv(b), *resume], b)
    compare(tmp_path / "a", b)


def _exists(relative: str) -> Callable[[Path], bool]:
    return lambda out: (out / relative).exists()


def test_kill_pretrain(setup: Setup, tmp_path: Path) -> None:
    # 12 short epochs (15 steps each), so training, not the report's scoring, is most of the work
    def argv(out: Path) -> list[str]:
        return [*setup.data, "--external_save_dir", str(out / "runs"), "--run_name", "pre",
                "--export_dir", str(out / "export"), "--num_epochs", "12", "--batch_size", "8",
                "--lm_hidden_size", "32", "--eval_batch_size", "8",
                "--clip_checkpoint", "none"]  # fmt: skip

    def compare(a: Path, b: Path) -> None:
        for out in (a, b):
            assert (out / "runs/pre" / DONE_MARKER).is_file()
        _same_weights(a / "runs/pre/final_weights.pt", b / "runs/pre/final_weights.pt")
        _same_weights(a / "export/checkpoint.pt", b / "export/checkpoint.pt")
        reports = [json.loads((o / "runs/pre/pretrain_report.json").read_text()) for o in (a, b)]
        assert reports[0]["predictions"] == reports[1]["predictions"]

    _kill_and_resume("pretrain", "train/pretrain.py", argv, compare,
                     ["--resume_from_checkpoint"], "runs/pre/lm_init",
                     _exists("runs/pre/DONE"), tmp_path)  # fmt: skip


def test_kill_train_backdoor(setup: Setup, tmp_path: Path) -> None:
    def argv(out: Path) -> list[str]:
        return [*setup.data, *setup.clean, "--external_save_dir", str(out / "runs"),
                "--run_name", "bd", "--num_epochs", "3", "--batch_size", "8"]  # fmt: skip

    def compare(a: Path, b: Path) -> None:
        assert (b / "runs/bd" / DONE_MARKER).is_file()
        _same_weights(a / "runs/bd/final_weights.pt", b / "runs/bd/final_weights.pt")
        plan = [(o / "runs/bd/poison_ids.json").read_bytes() for o in (a, b)]
        assert plan[0] == plan[1]
        logs = [(o / "runs/bd/train_log.jsonl").read_text().splitlines() for o in (a, b)]
        assert [json.loads(x)["epoch"] for x in logs[1]] == [0, 1, 2]
        assert [json.loads(x)["loss"] for x in logs[0]] == [json.loads(x)["loss"] for x in logs[1]]

    _kill_and_resume("train_backdoor", "train/train_backdoor.py", argv, compare,
                     ["--resume_from_checkpoint"], "runs/bd/poison_ids.json",
                     _exists("runs/bd/DONE"), tmp_path)  # fmt: skip


def test_kill_evaluate(setup: Setup, tmp_path: Path) -> None:
    def argv(out: Path) -> list[str]:
        return [*setup.data, *setup.backdoor, "--results_file", str(out / "result"),
                "--sfs_data_dir", str(out / "sfs"), "--model_name", "m", "--batch_size", "4",
                "--num_beams", "2", "--max_new_tokens", "6"]  # fmt: skip

    def compare(a: Path, b: Path) -> None:
        results = [json.loads((o / "result/m.json").read_text()) for o in (a, b)]
        assert results[0]["predictions"] == results[1]["predictions"]
        assert results[0]["metrics"] == results[1]["metrics"]
        for kind in ("clean", "attack"):
            for name in ("img_id.json", "sent.json"):
                files = [(o / "sfs/m" / kind / name).read_bytes() for o in (a, b)]
                assert files[0] == files[1], (kind, name)
            arrays = [np.load(o / "sfs/m" / kind / "images.npz")["images"] for o in (a, b)]
            assert np.array_equal(*arrays)

    _kill_and_resume("evaluate", "eval/evaluate.py", argv, compare, [], "result/m.log",
                     _exists("result/m.json"), tmp_path)  # fmt: skip


def test_kill_srd_pool(setup: Setup, tmp_path: Path) -> None:
    def argv(out: Path) -> list[str]:
        return [*setup.data, *setup.backdoor, *setup.sfs,
                "--save_data_path", str(out / "pool")]  # fmt: skip

    def compare(a: Path, b: Path) -> None:
        assert (b / "pool" / DONE_MARKER).is_file()
        pools = [json.loads((o / "pool/pool.json").read_text()) for o in (a, b)]
        assert pools[0]["surrogate"] == pools[1]["surrogate"]
        shards = [json.loads((o / "pool/pool-00000-of-00001.json").read_text()) for o in (a, b)]
        for key in ("ids", "base_sem", "base_flu", "references", "vlm_captions", "checksums",
                    "surrogate_boxes"):  # fmt: skip
            assert shards[0][key] == shards[1][key], key

    _kill_and_resume("srd_pool", "train/srd_pool.py", argv, compare, [], "pool/srd_pool.log",
                     _exists("pool/DONE"), tmp_path)  # fmt: skip


def _chosen(folder: Path) -> dict[str, tuple[int, int]]:
    shard = json.loads(next(folder.glob("shard-*.json")).read_text())
    assert shard["complete"]
    out = {}
    for chunk in shard["chunks"]:
        for i, action, reward in zip(chunk["ids"], chunk["actions"], chunk["rewards"], strict=True):
            assert i not in out, f"id {i} cleaned twice"
            out[i] = (action, reward)
    assert sorted(out) == sorted(shard["assigned_ids"])
    return out


def _shard_complete(out: Path) -> bool:
    manifests = list((out / "clean").glob("shard-*.json"))
    return bool(manifests) and json.loads(manifests[0].read_text())["complete"]


def test_kill_srd_clean_data(setup: Setup, tmp_path: Path) -> None:
    def argv(out: Path) -> list[str]:
        return [*setup.data, *setup.backdoor, *setup.sfs, "--policy", "random", "--seed", "3",
                "--clean_data_save", str(out / "clean"),
                "--poison_ids_path", str(setup.poison_ids)]  # fmt: skip

    def compare(a: Path, b: Path) -> None:
        assert _chosen(a / "clean") == _chosen(b / "clean")

    _kill_and_resume(
        "srd_clean_data",
        "train/srd_clean_data.py",
        argv,
        compare,
        [],
        "clean/clean_config.json",
        _shard_complete,
        tmp_path,
    )


def test_kill_srd_refine_tune(setup: Setup, tmp_path: Path) -> None:
    def argv(out: Path) -> list[str]:
        return [*setup.data, *setup.backdoor, "--defense", "srd",
                "--poison_ids_path", str(setup.poison_ids),
                "--clean_data_save", str(setup.merged_clean),
                "--external_save_dir", str(out / "runs"), "--run_name", "refine",
                "--num_epochs", "3", "--batch_size", "8"]  # fmt: skip

    def compare(a: Path, b: Path) -> None:
        assert (b / "runs/refine" / DONE_MARKER).is_file()
        _same_weights(a / "runs/refine/final_weights.pt", b / "runs/refine/final_weights.pt")

    _kill_and_resume("defend_srd", "train/defend.py", argv, compare,
                     ["--resume_from_checkpoint"], "runs/refine/defend.log",
                     _exists("runs/refine/DONE"), tmp_path)  # fmt: skip


def test_kill_defend_fine_pruning(setup: Setup, tmp_path: Path) -> None:
    """A defense that changes the model before its refine-tune (pruning): the resume must
    continue the pruned model's training, not prune the checkpoint again."""

    def argv(out: Path) -> list[str]:
        return [*setup.data, *setup.backdoor, "--defense", "fine_pruning",
                "--poison_ids_path", str(setup.poison_ids), "--prune_batches", "2",
                "--external_save_dir", str(out / "runs"), "--run_name", "fp",
                "--num_epochs", "3", "--batch_size", "8"]  # fmt: skip

    def compare(a: Path, b: Path) -> None:
        assert (b / "runs/fp" / DONE_MARKER).is_file()
        _same_weights(a / "runs/fp/final_weights.pt", b / "runs/fp/final_weights.pt")
        records = [json.loads((o / "runs/fp/defense.json").read_text()) for o in (a, b)]
        assert records[0]["prepare"] == records[1]["prepare"]

    _kill_and_resume("defend_fine_pruning", "train/defend.py", argv, compare,
                     ["--resume_from_checkpoint"], "runs/fp/defend.log",
                     _exists("runs/fp/DONE"), tmp_path)  # fmt: skip


def test_kill_srd_agent(setup: Setup, tmp_path: Path) -> None:
    """D2 does not resume: a killed run is redone from the start by the same command, and the
    policy (reproducible bytes, srd.defenses.srd.dqn) and its reward log equal the
    uninterrupted run's."""

    def argv(out: Path) -> list[str]:
        return [*setup.backdoor, *setup.sfs, "--save_data_path", str(setup.pool),
                "--ppo_path", str(out / "policy.zip"), "--total_timesteps", "60",
                "--learning_starts", "20", "--buffer_size", "64", "--obs_size", "36"]  # fmt: skip

    def compare(a: Path, b: Path) -> None:
        assert (a / "policy.zip").read_bytes() == (b / "policy.zip").read_bytes()
        logs = [(o / "policy.rewards.jsonl").read_text() for o in (a, b)]
        assert logs[0] == logs[1]

    _kill_and_resume("srd_train", "train/srd_train.py", argv, compare, [], "policy.log",
                     _exists("policy.zip"), tmp_path)  # fmt: skip


def test_kill_par_clip(tiny_data_args, tiny_benchmark, tmp_path: Path) -> None:
    """PAR on CLIP (train/clip_clean.py) does not resume: the killed run's folder is taken
    over by the same command and its weights equal the uninterrupted run's."""
    poisoned = tmp_path / "poisoned"
    _run("train/clip_poison.py", [*data_flags(tiny_data_args), "--external_save_dir",
         str(poisoned), "--run_name", "p", "--bd_attack_type", "blended_stripes",
         "--poison_rate", "0.25", "--clip_epochs", "1", "--clip_batch_size", "8"],
         tmp_path / "poison")  # fmt: skip

    def argv(out: Path) -> list[str]:
        return ["--poisoned_run", str(poisoned / "p"), "--clean_data", str(tiny_benchmark.root),
                "--epochs", "4", "--batch_size", "8", "--external_save_dir", str(out / "runs"),
                "--run_name", "c"]  # fmt: skip

    def compare(a: Path, b: Path) -> None:
        assert (b / "runs/c" / DONE_MARKER).is_file()
        weights = [(o / "runs/c/clip.safetensors").read_bytes() for o in (a, b)]
        assert weights[0] == weights[1]

    _kill_and_resume("par_clip", "train/clip_clean.py", argv, compare, [], "runs/c/config.json",
                     _exists("runs/c/DONE"), tmp_path)  # fmt: skip


def test_kill_soda_classifier(tmp_path_factory, tmp_path: Path) -> None:
    """SODA's classifier training does not resume: the same command redoes a killed run and
    its weights equal the uninterrupted run's."""
    from srd.soda.shapes import ShapesConfig, generate_shapes

    shapes = generate_shapes(
        tmp_path_factory.mktemp("shapes"),
        ShapesConfig(seed=0, per_class_train=6, per_class_test=8, resolution=16),
    )

    def argv(out: Path) -> list[str]:
        return ["--data_dir", str(shapes), "--external_save_dir", str(out / "runs"),
                "--run_name", "s", "--epoch", "40", "--width", "4", "--hidden", "8",
                "--bd_attack_type", "semantic_bg", "--ratio", "0.05"]  # fmt: skip

    def compare(a: Path, b: Path) -> None:
        assert (b / "runs/s" / DONE_MARKER).is_file()
        for name in ("model.safetensors", "poison_ids.json"):
            files = [(o / "runs/s" / name).read_bytes() for o in (a, b)]
            assert files[0] == files[1], name

    _kill_and_resume("soda_train", "train/soda_train.py", argv, compare, [],
                     "runs/s/config.json", _exists("runs/s/DONE"), tmp_path)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Killed, then an input changed: the re-run is refused, never resumed (issue 32 item 6)


def _with_value(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value (``--flag=v`` or ``--flag v``) set to ``value``."""
    out = []
    skip = False
    for token in argv:
        if skip:
            out.append(value)
            skip = False
        elif token == flag:
            out.append(token)
            skip = True
        elif token.startswith(f"{flag}="):
            out.append(f"{flag}={value}")
        else:
            out.append(token)
    assert value in out or f"{flag}={value}" in out, flag
    return out


def _chunk_written(folder: Path) -> Callable[[], bool]:
    def ready() -> bool:
        for manifest in folder.glob("shard-*.json"):
            try:
                if json.loads(manifest.read_text())["chunks"]:
                    return True
            except (ValueError, KeyError):  # being replaced: look again
                pass
        return False

    return ready


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix != ".log"
    }


CHANGED_INPUT = {
    # stage: (script, run folder, partial-work test, flag of the input changed, resume flags)
    "pretrain": ("train/pretrain.py", "runs/pre", "checkpoint_0.pt", "--coco_karpathy_json_path",
                 ["--resume_from_checkpoint"]),
    "train_backdoor": ("train/train_backdoor.py", "runs/bd", "checkpoint_0.pt",
                       "--checkpoint_path", ["--resume_from_checkpoint"]),
    "defend": ("train/defend.py", "runs/refine", "checkpoint_0.pt", "--checkpoint_path",
               ["--resume_from_checkpoint"]),
    "srd_clean_data": ("train/srd_clean_data.py", "clean", None, "--checkpoint_path", []),
}  # fmt: skip


@pytest.mark.parametrize("stage", sorted(CHANGED_INPUT))
def test_a_killed_stage_whose_input_changed_is_refused(setup: Setup, stage, tmp_path) -> None:
    """Each stage that resumes: killed once it holds partial work (a checkpoint, a cleaned
    chunk), then one of its inputs is replaced in place (same path, other bytes): the re-run
    stops with one line naming the input and leaves the partial work as it was; with the
    input restored it resumes and finishes."""
    script, folder, partial, flag, resume = CHANGED_INPUT[stage]
    source = setup.clean_checkpoint if stage == "train_backdoor" else setup.backdoor_checkpoint
    if flag == "--coco_karpathy_json_path":
        source = Path(next(t.split("=", 1)[1] for t in setup.data if t.startswith(flag + "=")))
    given = tmp_path / f"input{source.suffix}"  # the stage's copy of the input
    given.write_bytes(source.read_bytes())
    other = setup.clean_checkpoint if stage != "train_backdoor" else setup.backdoor_checkpoint
    changed = (
        json.dumps(json.loads(given.read_text()), indent=1).encode()  # same content, new bytes
        if flag == "--coco_karpathy_json_path"
        else other.read_bytes()
    )
    out = tmp_path / "run"
    argv = {
        "pretrain": [*setup.data, "--external_save_dir", str(out / "runs"), "--run_name", "pre",
                     "--export_dir", str(out / "export"), "--num_epochs", "4",
                     "--batch_size", "8", "--lm_hidden_size", "32", "--eval_batch_size", "8",
                     "--clip_checkpoint", "none"],
        "train_backdoor": [*setup.clean, "--external_save_dir", str(out / "runs"),
                           "--run_name", "bd", "--num_epochs", "3", "--batch_size", "8",
                           *setup.data],
        # (srd's manifest names the checkpoint's path it was cleaned for: no_mask's does not)
        "defend": [*setup.data, *setup.backdoor, "--defense", "no_mask",
                   "--poison_ids_path", str(setup.poison_ids),
                   "--external_save_dir", str(out / "runs"), "--run_name", "refine",
                   "--num_epochs", "3", "--batch_size", "8"],
        "srd_clean_data": [*setup.data, *setup.backdoor, *setup.sfs, "--policy", "random",
                           "--seed", "3", "--clean_data_save", str(out / "clean"),
                           "--poison_ids_path", str(setup.poison_ids)],
    }[stage]  # fmt: skip
    argv = _with_value(argv, flag, str(given))
    run_dir = out / folder
    ready = _chunk_written(run_dir) if partial is None else (lambda: (run_dir / partial).exists())
    first = _run(script, [*argv, *resume], out, ready, kill_share=0.0, work_seconds=0.0)
    assert first["killed"], f"{stage} finished before it held partial work"
    kept = _files(run_dir)
    given.write_bytes(changed)
    refused = _run(script, [*argv, *resume], tmp_path / "refused", expect=2)
    errors = [x for x in refused["stderr"].splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in refused["stderr"], refused["stderr"][-2000:]
    named = flag.lstrip("-").removesuffix("_path")
    assert named in errors[0] and "sha256" in errors[0], errors[0]
    assert _files(run_dir) == kept  # the partial work untouched, nothing resumed
    given.write_bytes(source.read_bytes())
    _run(script, [*argv, *resume], out)  # the original input again: resumed to the end
    done = (run_dir / DONE_MARKER).is_file() if partial else _shard_complete(out)
    assert done, stage
