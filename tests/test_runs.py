"""One rule for run folders (srd.runs, srd.flags): a run's identity is its resolved config.

The silent-wrong-result cases of issue 12, each replayed through the entry point it hit:
a stale poison plan, a resume with changed settings, the YAML target, the evaluation's and the
pretrain's "finished" signals, a stale initial LM, an interrupted benchmark overwrite.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from srd_fixtures import (
    BIT_EXACT,
    REPO,
    data_flags,
    export_clean_and_backdoor,
    load_script,
    model_flags,
    torchrun_cpu_ranks,
)

from srd.attacks.registry import AttackArgs, build_attack
from srd.attacks.trainset import POISON_FILE, plan_poison
from srd.cli import run_main
from srd.config import parse
from srd.data import benchmark
from srd.data.benchmark import generate_benchmark
from srd.data.records import DataArgs
from srd.errors import SRDError
from srd.flags import SEED, check_flags
from srd.io import atomic_path, write_json
from srd.runs import (
    check_run_name,
    check_same_config,
    clear_folder,
    describe_difference,
    differing_keys,
)

train_backdoor = load_script("train/train_backdoor.py")
evaluate = load_script("eval/evaluate.py")
pretrain = load_script("train/pretrain.py")

ENTRY_POINTS = [
    "train/prepare_data.py", "train/pretrain_clip.py", "train/pretrain.py",
    "train/train_backdoor.py",
    "eval/evaluate.py", "eval/evaluate_sfs.py", "train/srd_pool.py", "train/srd_train.py",
    "train/srd_clean_data.py", "train/combine_data.py", "train/defend.py",
    "eval/results_table.py", "eval/srd_coverage.py", "eval/srd_figures.py", "eval/attributes.py",
]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_captioner):
    root = tmp_path_factory.mktemp("runs")
    clean, backdoor = export_clean_and_backdoor(make_captioner, root / "models")
    return clean, backdoor


def _fail(module, argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(module.main, argv)
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


# --------------------------------------------------------------------------------------------
# srd.runs and srd.flags on their own


def test_differing_keys_and_their_description() -> None:
    saved = {"poison_rate": 0.5, "seed": 3, "size": (1, 2), "gone": 1}
    now = {"poison_rate": 0.1, "seed": 3, "size": [1, 2], "new": "x"}
    assert differing_keys(saved, now) == ["gone", "new", "poison_rate"]
    assert differing_keys(saved, now, ignore=["gone", "new"]) == ["poison_rate"]
    text = describe_difference(saved, now, ["poison_rate"])
    assert text == "poison_rate 0.5 -> 0.1"
    with pytest.raises(SRDError, match=r"^where: the plan was made with other settings "):
        check_same_config(saved, now, "where", "the plan")
    check_same_config(saved, {**saved, "size": [1, 2]}, "where")  # a tuple equals its list


def test_clear_folder_moves_everything_and_refuses_the_working_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "old.pt").write_text("old")
    (tmp_path / ".run.old-1").mkdir()  # left by a clear that was killed before deleting
    clear_folder(run, "--run_name")
    assert run.is_dir() and list(run.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (run / "other").mkdir()  # --run_name . would point at a folder of runs
    (run / "other" / "DONE").write_text("done")
    with pytest.raises(SRDError, match="--run_name .*holds another run, other"):
        clear_folder(run, "--run_name")
    (run / "other" / "DONE").unlink()
    monkeypatch.chdir(run)
    (run / "x").write_text("x")
    with pytest.raises(SRDError, match="--run_name .*refusing"):
        clear_folder(run, "--run_name")
    assert (run / "x").is_file()


def _config_classes() -> list[type]:
    classes = []
    for script in ENTRY_POINTS:
        module = load_script(script)
        for value in vars(module).values():
            if dataclasses.is_dataclass(value) and isinstance(value, type):
                fields = dataclasses.fields(value)
                if fields and all("help" in f.metadata for f in fields):  # flag configs
                    classes.append(value)
    from srd.defenses import DEFENSES  # each defense's own flags, composed by train/defend.py

    return classes + [cls.Args for cls in DEFENSES.values()]


def test_a_full_disk_is_named_and_leaves_no_file(tmp_path, monkeypatch) -> None:
    """Issue 32 item 5: no message said the disk was full."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(SRDError, match=r"out\.json: no space left on device"):
        write_json(tmp_path / "out.json", {"a": 1})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # not even the temporary file
    with pytest.raises(RuntimeError, match="other"):  # other failures pass through as they are
        with atomic_path(tmp_path / "x.pt"):
            raise RuntimeError("other")


def test_every_numeric_flag_has_a_range() -> None:
    missing = []
    for cls in _config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            numeric = tp in (int, float) or tp in (int | None, float | None)
            if numeric and f.name != "seed" and "check" not in f.metadata:
                missing.append(f"{cls.__name__}.{f.name}")
            if numeric and f.name == "seed":
                assert f.metadata.get("check") is SEED, f"{cls.__name__}.seed"
    assert missing == []


def test_flag_ranges_name_the_flag() -> None:
    (args,) = parse([], AttackArgs)
    check_flags([args])  # None = "the attack config's value" passes
    with pytest.raises(SRDError, match=r"^--poison_rate 0.0: must be in \(0, 1\]$"):
        parse(["--poison_rate", "0"], AttackArgs)
    with pytest.raises(SRDError, match="argument --alpha: invalid"):
        parse(["--alpha", "x"], AttackArgs)
    with pytest.raises(SRDError, match="unrecognized arguments: --nope"):
        parse(["--nope"], AttackArgs)


# --------------------------------------------------------------------------------------------
# Case 3: a YAML field beats a flag's default, never a flag the user gave


def test_yaml_target_beats_the_flag_default_not_the_flag(tmp_path) -> None:
    path = tmp_path / "apple.yaml"
    path.write_text("kind: badnet\ntarget: apple\n")
    (args,) = parse(["--bd_attack_type", str(path)], AttackArgs)
    assert args.build().target == "apple"
    (args,) = parse(["--bd_attack_type", str(path), "--target_label", "pear"], AttackArgs)
    assert args.build().target == "pear"
    (args,) = parse(["--bd_attack_type", str(path), "--target_label", "banana"], AttackArgs)
    assert args.build().target == "banana"  # given explicitly, even if it equals the default
    (args,) = parse([], AttackArgs)
    assert args.build().target == "banana"  # shipped badnet.yaml


# --------------------------------------------------------------------------------------------
# Cases 1 and 2: poison plans and resumed training runs


def _backdoor_argv(data: DataArgs, clean, runs: Path, *extra: str) -> list[str]:
    return [*data_flags(data), *model_flags(clean, clean.checkpoint_path),
            "--external_save_dir", str(runs), "--run_name", "bd",
            "--num_epochs", "2", "--batch_size", "16", *extra]  # fmt: skip


def test_a_stale_poison_plan_is_refused_not_reused(
    models, tiny_data_args, tiny_train_records, tmp_path, capsys
) -> None:
    clean, _ = models
    runs = tmp_path / "runs"
    # a run that fails on a bad checkpoint leaves nothing behind (no plan to reuse later)
    bad = [*_backdoor_argv(tiny_data_args, clean, runs, "--poison_rate", "0.5"),
           "--checkpoint_path", str(tmp_path / "missing.pt")]  # fmt: skip
    assert "--checkpoint_path" in _fail(train_backdoor, bad, capsys)
    assert not runs.exists()
    # a plan drawn at 0.5 beside a checkpoint (a killed run) is never trained at 0.1
    stale = plan_poison(tiny_train_records, build_attack("badnet", poison_rate=0.5), seed=42)
    (runs / "bd").mkdir(parents=True)
    stale.save(runs / "bd" / POISON_FILE)
    (runs / "bd" / "checkpoint_0.pt").write_bytes(b"an epoch's checkpoint")
    before = (runs / "bd" / POISON_FILE).read_bytes()
    error = _fail(train_backdoor, _backdoor_argv(tiny_data_args, clean, runs), capsys)
    assert "poison_rate 0.5 -> 0.1" in error and "--overwrite" in error
    error = _fail(
        train_backdoor,
        _backdoor_argv(tiny_data_args, clean, runs, "--poison_rate", "0.5", "--seed", "7"),
        capsys,
    )
    assert "seed 42 -> 7" in error
    assert (runs / "bd" / POISON_FILE).read_bytes() == before
    assert sorted(p.name for p in (runs / "bd").iterdir()) == ["checkpoint_0.pt", POISON_FILE]


def test_what_a_run_failed_before_its_first_checkpoint_left_is_replaced(
    models, tiny_data_args, tiny_train_records, tmp_path, capsys
) -> None:
    """Issue 32 item 5: a run that failed or was killed before its first checkpoint leaves its
    config, poison plan and log; they hold nothing computed, so a re-run with other flags
    replaces them (no --overwrite needed) and trains with its own plan, never the stale one."""
    clean, _ = models
    runs = tmp_path / "runs"
    run = runs / "bd"
    run.mkdir(parents=True)
    plan_poison(tiny_train_records, build_attack("badnet", poison_rate=0.5), seed=42).save(
        run / POISON_FILE
    )
    write_json(run / "config.json", {"stage": "backdoor", "poison_rate": 0.5, "seed": 9})
    (run / "train.log").write_text("the failed run's log\n")
    train_backdoor.main(_backdoor_argv(tiny_data_args, clean, runs, "--num_epochs", "1"))
    assert (run / "DONE").is_file()
    assert json.loads((run / "config.json").read_text())["seed"] == 42
    plan = json.loads((run / POISON_FILE).read_text())
    assert plan["meta"]["poison_rate"] == 0.1 and plan["meta"]["seed"] == 42
    assert (run / "train.log").read_text().startswith("the failed run's log")  # kept


def test_a_resume_with_changed_settings_is_refused(
    models, tiny_data_args, tmp_path, capsys
) -> None:
    clean, _ = models
    runs = tmp_path / "runs"
    argv = _backdoor_argv(tiny_data_args, clean, runs)
    train_backdoor.main([*argv, "--resume_from_checkpoint"])  # as run_train.sh always runs it
    run = runs / "bd"
    finished = torch.load(run / "final_weights.pt", weights_only=True)["model_state_dict"]
    finished_bytes = (run / "final_weights.pt").read_bytes()
    # as if killed after the first epoch's checkpoint
    for name in ("DONE", "final_weights.pt", "checkpoint_1.pt"):
        (run / name).unlink()
    plan = (run / POISON_FILE).read_bytes()
    for flag, value, named in (
        ("--learning_rate", "5e-4", "learning_rate 0.001 -> 0.0005"),
        ("--poison_rate", "0.2", "poison_rate"),
        ("--batch_size", "8", "batch_size 16 -> 8"),
    ):
        error = _fail(train_backdoor, [*argv, "--resume_from_checkpoint", flag, value], capsys)
        assert named in error, error
    assert (run / POISON_FILE).read_bytes() == plan
    assert not (run / "DONE").exists()
    # the same settings resume, and finish with the weights of the uninterrupted run
    train_backdoor.main([*argv, "--resume_from_checkpoint"])
    resumed = torch.load(run / "final_weights.pt", weights_only=True)["model_state_dict"]
    assert not BIT_EXACT or all(torch.equal(finished[k], resumed[k]) for k in finished)
    # and the same bytes (issue 32 item 2: no temporary file name inside the archive)
    assert not BIT_EXACT or (run / "final_weights.pt").read_bytes() == finished_bytes
    epochs = [json.loads(line)["epoch"] for line in (run / "train_log.jsonl").open()]
    assert epochs == [0, 1]
    # --overwrite under the flag run_train.sh always passes starts again (case 9, one process)
    train_backdoor.main([*argv, "--resume_from_checkpoint", "--overwrite", "--seed", "5"])
    assert json.loads((run / "config.json").read_text())["seed"] == 5
    assert json.loads((run / POISON_FILE).read_text())["meta"]["seed"] == 5


def test_a_resume_over_changed_inputs_is_refused(models, tiny_benchmark, tmp_path, capsys) -> None:
    """Issue 32 item 2: the run's config.json records its inputs' digests (the split JSON, both
    image folders, the starting checkpoint), so a killed run whose inputs then changed is
    refused on resume, not continued from the old inputs' checkpoint."""
    clean, backdoor = models
    copy = benchmark.benchmark_paths(shutil.copytree(tiny_benchmark.root, tmp_path / "bench"))
    data = DataArgs(
        coco_train_image_dir_path=str(copy.train_image_dir),
        coco_val_image_dir_path=str(copy.val_image_dir),
        coco_karpathy_json_path=str(copy.karpathy_json),
        coco_annotations_json_path=str(copy.annotations_json),
    )
    start = tmp_path / "start.pt"
    shutil.copyfile(clean.checkpoint_path, start)
    runs = tmp_path / "runs"
    argv = [*_backdoor_argv(data, clean, runs, "--num_epochs", "1"), "--checkpoint_path",
            str(start), "--resume_from_checkpoint"]  # fmt: skip
    train_backdoor.main(argv)
    run = runs / "bd"
    for name in ("DONE", "final_weights.pt"):  # as if killed after its checkpoint
        (run / name).unlink()
    images = sorted(copy.train_image_dir.iterdir())
    original = images[0].read_bytes()
    images[0].write_bytes(images[1].read_bytes())  # a training image overwritten in place
    error = _fail(train_backdoor, argv, capsys)
    assert "coco_train_image_dir_path_sha256" in error, error
    images[0].write_bytes(original)  # the same bytes again (a new mtime): accepted
    shutil.copyfile(backdoor, start)  # another starting checkpoint
    assert "checkpoint_path_sha256" in _fail(train_backdoor, argv, capsys)
    shutil.copyfile(clean.checkpoint_path, start)
    train_backdoor.main(argv)
    assert (run / "DONE").is_file()


# --------------------------------------------------------------------------------------------
# Case 5: the "finished" signals come last


def test_evaluation_writes_its_result_after_the_sfs_inputs(
    models, tiny_data_args, tmp_path, capsys, monkeypatch
) -> None:
    clean, backdoor = models
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    argv = [*data_flags(tiny_data_args), *model_flags(clean, backdoor),
            "--results_file", str(tmp_path / "result"), "--model_name", "m",
            "--sfs_data_dir", str(tmp_path / "sfs"),
            "--batch_size", "8", "--num_beams", "1", "--max_new_tokens", "4"]  # fmt: skip
    # an SFS folder that cannot be made fails before any captioning
    error = _fail(evaluate, [*argv, "--sfs_data_dir", str(blocker / "sfs")], capsys)
    assert "--sfs_data_dir" in error and "blocker" in error
    assert not (tmp_path / "result").exists()

    def fail_to_write(*args, **kwargs):
        raise SRDError("--sfs_data_dir: disk full")

    # SFS inputs that fail to write leave no result file, so a re-run is not refused or
    # skipped as finished by run_*.sh (the kill test re-runs it to the end)
    monkeypatch.setattr(evaluate, "_write_sfs", fail_to_write)
    assert "disk full" in _fail(evaluate, argv, capsys)
    assert not (tmp_path / "result" / "m.json").exists()
    assert not (tmp_path / "sfs" / "m").exists() or not any((tmp_path / "sfs" / "m").iterdir())


def _hold_lock(target: Path) -> subprocess.Popen:
    """Another process holding ``target``'s writer lock (srd.io.writer_lock's file)."""
    lock = target.parent / f".{target.name}.lock"
    target.parent.mkdir(parents=True, exist_ok=True)
    code = (
        "import fcntl, sys, time\n"
        f"f = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_one_writer_per_result_and_per_run(models, tiny_data_args, tmp_path, capsys) -> None:
    """Issue 32 item 4: two evaluations under one name at once both exited 0 and the first
    result was lost; now the second stops with one line while the first writes (and after
    it, refuses to replace its result without --overwrite). The same for a training run."""
    clean, backdoor = models
    result = tmp_path / "result" / "m.json"
    argv = [*data_flags(tiny_data_args), *model_flags(clean, backdoor),
            "--results_file", str(result.parent), "--model_name", "m",
            "--sfs_data_dir", str(tmp_path / "sfs"),
            "--batch_size", "8", "--num_beams", "1", "--max_new_tokens", "4"]  # fmt: skip
    holder = _hold_lock(result)
    try:
        error = _fail(evaluate, argv, capsys)
    finally:
        holder.kill()
        holder.wait()
    assert "another process is writing it now" in error and "--model_name" in error
    assert not result.exists()
    run_main(evaluate.main, argv)  # the lock died with its holder
    assert result.is_file()
    runs = tmp_path / "runs"
    holder = _hold_lock(runs / "bd")
    try:
        error = _fail(train_backdoor, _backdoor_argv(tiny_data_args, clean, runs), capsys)
    finally:
        holder.kill()
        holder.wait()
    assert "--run_name" in error and "another process is writing it now" in error
    assert not (runs / "bd" / "DONE").exists()


def test_pretrain_is_finished_only_with_its_export_and_refuses_a_stale_lm(
    tiny_data_args, tmp_path, capsys, monkeypatch
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    argv = [*data_flags(tiny_data_args), "--external_save_dir", str(tmp_path / "runs"),
            "--run_name", "pre", "--num_epochs", "1", "--batch_size", "16",
            "--lm_hidden_size", "32", "--eval_batch_size", "8", "--clip_checkpoint", "none",
            "--export_dir", str(tmp_path / "x")]  # fmt: skip
    run = tmp_path / "runs" / "pre"
    # an export folder that cannot be made fails before training, leaving nothing
    error = _fail(pretrain, [*argv, "--export_dir", str(blocker / "x")], capsys)
    assert "--export_dir" in error
    assert not (tmp_path / "runs").exists()

    def killed_export(*args, **kwargs):
        raise KeyboardInterrupt("killed during the export")

    monkeypatch.setattr(pretrain, "export_captioner", killed_export)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(argv)
    monkeypatch.undo()
    assert (run / "final_weights.pt").is_file() and not (run / "DONE").exists()
    # case 6: the initial LM of that run is not reused with other sizes
    error = _fail(pretrain, [*argv, "--lm_hidden_size", "64", "--resume_from_checkpoint"], capsys)
    assert "lm_hidden_size 32 -> 64" in error
    pretrain.main([*argv, "--resume_from_checkpoint"])
    assert (run / "DONE").is_file() and (run / "pretrain_report.json").is_file()
    assert (tmp_path / "x" / "checkpoint.pt").is_file()
    lm = json.loads((tmp_path / "x" / "lm" / "config.json").read_text())
    assert lm["hidden_size"] == 32


# --------------------------------------------------------------------------------------------
# Case 7: an interrupted benchmark overwrite


def test_an_interrupted_benchmark_overwrite_leaves_no_captions(tmp_path, monkeypatch) -> None:
    paths = generate_benchmark(tmp_path / "b", seed=0, num_train=4, num_val=2, num_test=2)
    data = DataArgs(
        coco_train_image_dir_path=str(paths.train_image_dir),
        coco_val_image_dir_path=str(paths.val_image_dir),
        coco_karpathy_json_path=str(paths.karpathy_json),
        coco_annotations_json_path=str(paths.annotations_json),
    )
    assert len(data.split("train")) == 4
    written = []
    real_write = benchmark._write_png

    def write_then_die(image, path):
        if len(written) == 3:
            raise KeyboardInterrupt("killed")
        written.append(path)
        real_write(image, path)

    monkeypatch.setattr(benchmark, "_write_png", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate_benchmark(tmp_path / "b", seed=1, num_train=4, num_val=2, num_test=2,
                           overwrite=True)  # fmt: skip
    with pytest.raises(SRDError, match="dataset_coco.json"):
        data.split("train")  # old captions never describe the new images


@pytest.mark.slow
def test_overwrite_under_two_processes(models, tiny_data_args, tmp_path) -> None:
    """Case 9: run_train.sh always passes --resume_from_checkpoint; adding --overwrite under
    torchrun used to crash rank 1 (it tried to resume from a checkpoint rank 0 had deleted)."""
    clean, _ = models
    runs = tmp_path / "runs"
    argv = [str(REPO / "train/train_backdoor.py"),
            *_backdoor_argv(tiny_data_args, clean, runs, "--num_epochs", "1")]  # fmt: skip
    for extra in ([], ["--resume_from_checkpoint", "--overwrite", "--seed", "9"]):
        done = torchrun_cpu_ranks([*argv, *extra], 900, tmp_path, PYTHONPATH=str(REPO))
        assert done.returncode == 0, done.stderr[-3000:]
    run = runs / "bd"
    assert (run / "DONE").is_file()
    assert json.loads((run / "config.json").read_text())["seed"] == 9
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_0.pt"]


@pytest.mark.parametrize("name", ["../data", "/tmp/x", "~/x", "a/../../b", "a//b", "./a", ""])
def test_run_names_stay_in_their_folder(name) -> None:
    """A run or result name is a folder below its parent: --run_name ../data --overwrite once
    emptied a data folder beside the runs."""
    with pytest.raises(SRDError, match="expected a name below its folder"):
        check_run_name(name, "--run_name")


def test_run_names_may_have_sub_folders() -> None:
    for name in ("backdoor-badnet", "embedded/clip", "par/badnet/par", "defense-srd-p05-s1"):
        assert check_run_name(name, "--run_name") == name
