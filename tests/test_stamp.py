"""srd.stamp: a stage is skipped only when its output was made by the same command from the same
inputs; anything else is refused, never reused (the run/*.sh scripts' ``once``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import srd.io
from srd.attacks.config import CONFIG_DIR
from srd.budgets import ATTACK
from srd.io import DIGEST_CACHE_ENV, tree_digest
from srd.io import file_digest as real_digest
from srd.stamp import NAMED_INPUTS, command_key, describe, fingerprint, main, stamp_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def stage(tmp_path: Path):
    """A stage script: writes its --out file from its --data file and --scale, and counts its
    runs in runs.txt."""
    script = tmp_path / "stage.py"
    script.write_text(
        "import argparse, pathlib\n"
        "p = argparse.ArgumentParser()\n"
        "for flag in ('--data', '--out', '--policy', '--coco_train_image_dir_path'):\n"
        "    p.add_argument(flag)\n"
        "p.add_argument('--scale', default='1')\n"
        "for flag in ('--overwrite', '--fail'): p.add_argument(flag, action='store_true')\n"
        "a = p.parse_args()\n"
        "runs = pathlib.Path(a.out).with_name('runs.txt')\n"
        "runs.write_text(runs.read_text() + 'x' if runs.exists() else 'x')\n"
        "if a.fail: raise SystemExit(3)\n"
        "pathlib.Path(a.out).write_text(pathlib.Path(a.data).read_text() * int(a.scale))\n"
    )
    data = tmp_path / "data.txt"
    data.write_text("abc")
    out = tmp_path / "out.txt"

    def run(*extra: str, output: Path = out, pre: tuple[str, ...] = ()) -> int:
        command = [sys.executable, str(script), "--data", str(data), "--out", str(out), *extra]
        return main([*pre, str(output), "--", *command])

    def runs() -> int:
        runs_file = tmp_path / "runs.txt"
        return len(runs_file.read_text()) if runs_file.exists() else 0

    return run, runs, data, out


def test_a_stage_runs_once_then_is_up_to_date(stage, capsys) -> None:
    run, runs, _, out = stage
    assert run() == 0 and runs() == 1
    assert out.read_text() == "abc" and stamp_path(out).is_file()
    assert run() == 0 and runs() == 1  # skipped
    assert "up to date" in capsys.readouterr().out


def test_other_flags_or_inputs_are_refused_and_nothing_is_touched(stage, capsys) -> None:
    run, runs, data, out = stage
    assert run() == 0
    assert run("--scale", "2") == 2 and runs() == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--scale <absent> -> 2" in err and str(out) in err
    data.write_text("abd")  # the same command, another input
    assert run() == 2 and runs() == 1
    assert f"input {os.path.normpath(data)} changed" in capsys.readouterr().err
    assert out.read_text() == "abc"


def test_an_unstamped_or_replaced_output_is_refused_unless_adopted(stage, capsys) -> None:
    run, runs, _, out = stage
    out.write_text("made elsewhere")
    assert run() == 2 and runs() == 0
    assert "has no stamp" in capsys.readouterr().err
    assert run(pre=("--adopt",)) == 0 and runs() == 0  # vouched for: stamped, not redone
    assert run() == 0 and runs() == 0
    out.write_text("replaced after the stamp")
    assert run() == 2 and "changed after its stamp" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "refused"),
    [(("--scale", "2"), ""), (("--scale", "2.0", "--lr", "1e-3", "--cache"), ""),
     (("--scale", "3"), "--scale 3 (recorded: 2)"), (("--lr=0.01",), "--lr 0.01 (recorded: 0.001)"),
     (("--no-cache",), "--cache false (recorded: true)"), (("--ids", "1"), "--ids 1 (recorded")],
)  # fmt: skip
def test_adopting_compares_the_run_folders_own_record(tmp_path, capsys, extra, refused) -> None:
    """SRD_ADOPT vouches for an output made before stamps, but never against what the output's
    own record (a run folder's config.json beside its DONE) says it was made with."""
    done = tmp_path / "run" / "DONE"
    done.parent.mkdir()
    done.write_text("")
    config = {"scale": 2, "lr": 0.001, "cache": True, "ids": [1, 2], "name": "x"}
    (done.parent / "config.json").write_text(json.dumps(config))
    command = [sys.executable, "train/x.py", "--name", "./x", *extra]
    code = main(["--adopt", str(done), "--", *command])
    err = capsys.readouterr().err
    assert code == (2 if refused else 0), err
    assert stamp_path(done).is_file() == (not refused)
    if refused:
        assert err.startswith(f"error: {done}: not adopted") and refused in err


def test_overwrite_redoes_and_a_failed_stage_leaves_no_stamp(stage) -> None:
    run, runs, _, out = stage
    assert run() == 0
    assert run("--overwrite") == 0 and runs() == 2
    assert run("--overwrite") == 0 and runs() == 3  # asked to redo: always runs
    stamp_path(out).unlink()
    out.unlink()
    assert run("--fail") == 3 and not stamp_path(out).exists()


def test_a_file_that_appears_after_the_stage_is_not_an_input(stage, tmp_path) -> None:
    """A shared flag may name a file a later stage writes (run_SRD.sh's --ppo_path in D1)."""
    run, runs, _, _ = stage
    later = tmp_path / "policy.zip"
    assert run("--policy", str(later)) == 0 and runs() == 1
    later.write_text("written by a later stage")
    assert run("--policy", str(later)) == 0 and runs() == 1


def test_folder_inputs_and_attack_names_are_digested(stage, tmp_path, capsys) -> None:
    """Issue 32 item 1: the files of a folder given to an input-folder flag (an image folder,
    the LM folder), and the built-in config behind an attack name, are inputs of the stamp."""
    run, runs, _, _ = stage
    images = tmp_path / "images"
    images.mkdir()
    (images / "1.png").write_bytes(b"one")
    (images / "2.png").write_bytes(b"two")
    flags = ("--coco_train_image_dir_path", str(images))
    assert run(*flags) == 0 and runs() == 1
    (images / "2.png").write_bytes(b"TWO")  # overwritten in place, same size
    assert run(*flags) == 2 and runs() == 1
    assert f"input {os.path.normpath(images)} changed" in capsys.readouterr().err
    (images / "2.png").write_bytes(b"two")  # the same bytes again: up to date
    (images / ".2.png.tmp").write_bytes(b"a write in progress")  # hidden: not an input
    assert run(*flags) == 0 and runs() == 1
    (images / "2.png").rename(images / "3.png")  # a renamed file is another folder
    assert run(*flags) == 2 and runs() == 1
    capsys.readouterr()
    key = command_key(["python", "train/x.py", "--bd_attack_type", "badnet", "--lm_path", "x"])
    inputs = fingerprint("out.json", key, [])["inputs"]
    assert list(inputs) == [os.path.normpath(CONFIG_DIR / "badnet.yaml")]
    assert NAMED_INPUTS["--bd_attack_type"] == CONFIG_DIR


def test_a_folder_digest_reads_only_the_files_that_changed(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "lm"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.bin", "sub/b.json"):
        (folder / name).write_text(name)
    reads = []
    monkeypatch.setattr(srd.io, "file_digest", lambda p: reads.append(p) or real_digest(p))
    first = tree_digest(folder)
    assert len(reads) == 2
    assert tree_digest(folder) == first and len(reads) == 2  # from the cache
    (folder / "a.bin").write_text("A.bin")
    assert tree_digest(folder) != first and len(reads) == 3  # only the changed file
    (folder / "a.bin").write_text("a.bin")
    assert tree_digest(folder) == first
    monkeypatch.setenv(DIGEST_CACHE_ENV, str(tmp_path / "cache-file"))
    (tmp_path / "cache-file").write_text("not a folder")  # an unusable cache: still digested
    assert tree_digest(folder) == first


def test_the_launcher_is_not_part_of_the_command() -> None:
    assert command_key(
        ["accelerate", "launch", "--num_processes", "2", "train/x.py", "--a", "1"]
    ) == [
        "train/x.py",
        "--a",
        "1",
    ]
    assert command_key(["python", "train/x.py"]) == command_key(["torchrun", "train/x.py"])


def test_a_repeated_flag_is_named_as_the_list_of_its_values() -> None:
    def stamp(*values: str) -> dict:
        command = ["x.py"] + [t for v in values for t in ("--results", v)]
        return {"command": command, "inputs": {}}

    said = describe(stamp("a", "b", "c"), stamp("a", "b", "d"))
    assert said == '--results ["a", "b", "c"] -> ["a", "b", "d"]'


def test_missing_input_and_usage_errors(tmp_path, capsys) -> None:
    assert main([str(tmp_path / "o"), "--input", str(tmp_path / "nope"), "--", "true"]) == 2
    assert "--input" in capsys.readouterr().err
    assert main([str(tmp_path / "o"), "true"]) == 2


def test_the_shell_helper_of_the_run_scripts(tmp_path) -> None:
    """run/common.sh's ``once`` calls srd.stamp, and SRD_ADOPT=1 adopts an unstamped output."""
    out = tmp_path / "result.json"
    out.write_text("{}")
    script = f'. {REPO}/run/common.sh; once "{out}" -- python -c "raise SystemExit(5)"'
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shell = ["sh", "-c", script, str(REPO / "run" / "inline.sh")]  # $0: common.sh cds to the repo
    refused = subprocess.run(shell, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "has no stamp" in refused.stderr
    env["SRD_ADOPT"] = "1"
    adopted = subprocess.run(shell, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert adopted.returncode == 0 and stamp_path(out).is_file()


@pytest.mark.parametrize(
    ("rate", "epochs", "seed", "suffix"),
    [("", "", "0", ""), ("", "", "2", "-s2"), ("0.05", "", "0", "-p05"),
     ("0.01", "", "1", "-p01-s1"), ("", "12", "0", "-e12"), ("", "6", "0", ""),
     ("0.05", "12", "1", "-p05-e12-s1"),
     ("0.x5", "", "0", "POISON_RATE=0.x5"), ("5", "", "0", "POISON_RATE=5"),
     ("", "0", "0", "ATTACK_EPOCHS=0"), ("", "x", "0", "ATTACK_EPOCHS=x"),
     ("", "06", "0", "ATTACK_EPOCHS=06")],
)  # fmt: skip
def test_run_names_carry_the_rate_the_budget_and_the_replicate(rate, epochs, seed, suffix) -> None:
    """run/common.sh: the names of a model poisoned at POISON_RATE or trained for ATTACK_EPOCHS
    other than the default (and of its defenses) differ from the default model's, so a sweep
    never reuses another model's runs; a rate that is not a share or a count that is not a whole
    number stops the script with one line naming it (``suffix`` holds that variable then)."""
    _assert_suffix({"POISON_RATE": rate, "ATTACK_EPOCHS": epochs, "SEED": seed}, suffix)


def _assert_suffix(variables: dict[str, str], suffix: str) -> None:
    """run/common.sh under ``variables`` names runs with ``suffix``, or, when ``suffix`` is
    ``VARIABLE=value``, stops with exit 2 and one line naming it."""
    script = f'. {REPO}/run/common.sh; echo "[$SUFFIX]"'
    shell = ["sh", "-c", script, str(REPO / "run" / "inline.sh")]
    done = subprocess.run(shell, env={**os.environ, **variables}, capture_output=True, text=True)
    if "=" in suffix:
        assert done.returncode == 2 and done.stderr.startswith(f"error: {suffix}:")
    else:
        assert done.returncode == 0 and done.stdout.strip() == f"[{suffix}]"


def test_an_attack_file_gives_its_name_to_the_runs(tmp_path) -> None:
    """Issue 32 item 3: ATTACK=<file>.yaml named runs backdoor-<path>/...; now its name:."""
    config = tmp_path / "held_out.yaml"
    config.write_text((REPO / "srd" / "attacks" / "configs" / "badnet.yaml").read_text()
                      .replace("name: badnet", "name: held_out_patch"))  # fmt: skip
    script = f'. {REPO}/run/common.sh; echo "[$ATTACK] [$ATTACK_SPEC]"'
    shell = ["sh", "-c", script, str(REPO / "run" / "inline.sh")]
    done = subprocess.run(shell, env={**os.environ, "ATTACK": str(config)}, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == f"[held_out_patch] [{config}]"
    config.write_text("name: ../up\nkind: badnet\n")
    done = subprocess.run(shell, env={**os.environ, "ATTACK": str(config)}, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("error:") == 1, done.stderr


@pytest.mark.parametrize(
    ("unit", "suffix"),
    [("", "-p05-e12-s1"), ("caption", "-p05-e12-s1"), ("image", "-p05-img-e12-s1"),
     ("images", "POISON_UNIT=images")],
)  # fmt: skip
def test_run_names_carry_the_poison_unit(unit, suffix) -> None:
    """POISON_UNIT=image (every caption of a drawn image poisoned) is another model: -img."""
    variables = {"POISON_RATE": "0.05", "ATTACK_EPOCHS": "12", "SEED": "1", "POISON_UNIT": unit}
    _assert_suffix(variables, suffix)


@pytest.mark.parametrize(
    ("sampling", "suffix"),
    [("", "-img-s1"), ("shuffle", "-img-s1"), ("fixed_replacement", "-img-fr-s1"),
     ("reference", "ATTACK_SAMPLING=reference")],
)  # fmt: skip
def test_run_names_carry_the_attack_sampling(sampling, suffix) -> None:
    """ATTACK_SAMPLING=fixed_replacement (the reference's replayed draw) is another model: -fr."""
    _assert_suffix({"POISON_UNIT": "image", "SEED": "1", "ATTACK_SAMPLING": sampling}, suffix)


def test_attack_budget_default_is_the_scripts() -> None:
    """The report leaves the attack's epochs out of a row's name when they are run/common.sh's
    default budget, which run/run_train.sh trains; another ATTACK_EPOCHS names its runs."""
    script = f'. {REPO}/run/common.sh; echo "$ATTACK_EPOCHS"'
    shell = ["sh", "-c", script, str(REPO / "run" / "inline.sh")]
    env = {k: v for k, v in os.environ.items() if k != "ATTACK_EPOCHS"}
    done = subprocess.run(shell, env=env, capture_output=True, text=True, check=True)
    assert int(done.stdout) == ATTACK.epochs  # srd/budgets.py, which the report reads too
    assert '--num_epochs "$ATTACK_EPOCHS"' in (REPO / "run" / "run_train.sh").read_text()
    assert "$BUDGET_REFINE_EPOCHS" in (REPO / "run" / "run_SRD.sh").read_text()
    defenses = (REPO / "run" / "run_defenses.sh").read_text()  # refine-tune or retrain budget
    assert "BUDGET_OF=REFINE" in defenses and "BUDGET_OF=ATTACK" in defenses
    assert 'eval "echo \\$BUDGET_${BUDGET_OF}_$1"' in defenses


@pytest.mark.parametrize("jobs", ["2", "1"])
def test_jobs_run_side_by_side_and_a_failed_one_stops_the_script(tmp_path, jobs) -> None:
    """run/common.sh's ``job``/``wait_jobs`` (run/run_embedded.sh's SRD and ablation): each job
    runs with one torch thread, its stage lines reach the console under its name and its whole
    output its log; when one fails the script stops after both ended, naming the failed job.
    JOBS=1 runs them one after the other with the caller's threads, and stops at the failure."""
    ok = 'echo "=== ok $OMP_NUM_THREADS"; echo noise; echo "=== done: ok (0 s; total 0 s)"'
    bad = 'echo "=== bad"; echo broken >&2; exit 3'
    script = (
        f". {REPO}/run/common.sh; set -e; job first sh -c '{ok}'; job second sh -c '{bad}'; "
        f"job third sh -c '{ok}'; wait_jobs; echo past"
    )
    env = {**os.environ, "SRD_LOG_DIR": str(tmp_path), "JOBS": jobs, "OMP_NUM_THREADS": "2"}
    shell = ["sh", "-c", script, str(REPO / "run" / "inline.sh")]
    done = subprocess.run(shell, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "past" not in done.stdout
    lines = done.stdout.splitlines()
    finished = re.compile(r"=== done: job (first|third) \(\d+ s; total \d+ s\)")  # its wall time
    if jobs == "1":
        assert lines[:3] == ["=== ok 2", "noise", "=== done: ok (0 s; total 0 s)"]
        assert finished.fullmatch(lines[3]) and lines[4:] == ["=== bad"]
        assert not list(tmp_path.iterdir())
        return
    for name in ("first", "third"):
        assert f"[{name}] === ok 1" in lines and f"[{name}] === done: ok (0 s; total 0 s)" in lines
        assert any(finished.fullmatch(line.removeprefix(f"[{name}] ")) for line in lines)
        assert (tmp_path / f"{name}.log").read_text().splitlines()[1] == "noise"
    assert "[second] === bad" in lines and not any("noise" in line for line in lines)
    assert not any("job second (" in line for line in lines)
    assert done.stderr.startswith(f"error: job second failed; the end of {tmp_path}/second.log:")
    assert "broken" in done.stderr and "first" not in done.stderr


def test_a_job_count_other_than_one_or_two_is_refused() -> None:
    done = subprocess.run(
        ["sh", "-c", f". {REPO}/run/common.sh", str(REPO / "run" / "inline.sh")],
        env={**os.environ, "JOBS": "4"}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("error: JOBS=4: expected 1")


def test_par_script_refuses_its_old_rate_variable() -> None:
    """run/run_PAR.sh takes the poison rate from POISON_RATE, as every script does; RATE (its own
    variable before) stops it with one line instead of being silently ignored."""
    error = _script_error("run_PAR.sh", RATE="0.05")
    assert error.startswith("error: RATE=0.05: the poison rate is POISON_RATE now")


def test_defenses_script_refuses_red_as_an_extra_mask_colour() -> None:
    """MASK_COLOURS adds rows with the squares in another colour; red would repeat the default
    rows under a second name (two results of one report cell), so it stops with one line."""
    error = _script_error("run_defenses.sh", MASK_COLOURS="cyan red")
    assert error.startswith("error: MASK_COLOURS=cyan red: red is the colour of the rows")


def test_defenses_script_refuses_triggered_as_an_extra_image_version() -> None:
    error = _script_error("run_defenses.sh", IMAGE_VERSIONS="first_occurrence triggered")
    assert error.startswith("error: IMAGE_VERSIONS=first_occurrence triggered: triggered is")


def test_defenses_script_refuses_a_light_budget_that_is_not_a_step_count() -> None:
    for steps in ("0", "12a", "-5"):
        error = _script_error("run_defenses.sh", STEPS=steps)
        assert error.startswith(f"error: STEPS={steps}: expected a positive whole number")


def test_defenses_script_refuses_an_unknown_protocol_and_a_retrained_benign_control() -> None:
    error = _script_error("run_defenses.sh", PROTOCOL="retrain_from_clean")
    assert error.startswith("error: PROTOCOL=retrain_from_clean: expected refine or retrain")
    error = _script_error("run_defenses.sh", PROTOCOL="retrain", BENIGN="1")
    assert error.startswith("error: PROTOCOL=retrain: the benign control (BENIGN=1) already")


def test_srd_script_names_every_agent_variant() -> None:
    """Our agent variants run under their own names (VARIANT), never as the reference's run."""
    error = _script_error("run_SRD.sh", AGENT_FLAGS="--area_cost 2")
    assert error.startswith("error: AGENT_FLAGS=--area_cost 2: name the variant's runs")
    error = _script_error("run_SRD.sh", VARIANT="ac-2", AGENT_FLAGS="--area_cost 2")
    assert error.startswith("error: VARIANT=ac-2: expected lower-case letters and digits")
    error = _script_error("run_SRD.sh", VARIANT="ac2", POLICY="random")
    assert error.startswith("error: VARIANT=ac2: needs POLICY=dqn and the variant's AGENT_FLAGS")
    error = _script_error("run_SRD.sh", SCHEDULE="paper")
    assert error.startswith("error: SCHEDULE=paper: expected ours or reference")
    error = _script_error("run_SRD.sh", SCHEDULE="reference", POLICY="random")
    assert error.startswith("error: SCHEDULE=reference: needs POLICY=dqn and no BENIGN=1")


def _script_error(script: str, **env: str) -> str:
    """Run run/SCRIPT with ``env`` added; it must stop with exit 2 and one line: returns it."""
    done = subprocess.run(
        ["sh", str(REPO / "run" / script)], env={**os.environ, **env}, capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    return done.stderr
