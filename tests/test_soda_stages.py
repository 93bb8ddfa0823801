"""SODA's entry points end to end on a tiny shapes set: a fixture model whose head carries a
planted backdoor is flagged with its (target, source); the chain runs through removal and the
baselines; bad input gives one-line errors with exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from srd_fixtures import load_script

from srd.cli import run_main
from srd.io import mark_finished, write_json
from srd.soda.classifier import (
    ClassifierSpec,
    build_classifier,
    save_classifier,
    split_model,
    to_input,
)
from srd.soda.shapes import CLASSES, ShapesConfig, generate_shapes, load_split

soda_data = load_script("train/soda_data.py")
soda_train = load_script("train/soda_train.py")
soda_causality = load_script("eval/soda_causality.py")
soda_detect = load_script("eval/soda_detect.py")
soda_gen = load_script("train/soda_gen_trigger.py")
soda_remove = load_script("train/soda_remove.py")
soda_baseline = load_script("train/soda_baseline.py")

TARGET = CLASSES.index("yellow triangle")
SOURCE = CLASSES.index("green circle")
RES = 16


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    return generate_shapes(
        root, ShapesConfig(seed=0, per_class_train=6, per_class_test=8, resolution=RES)
    )


@pytest.fixture(scope="module")
def planted(shapes, tmp_path_factory) -> Path:
    """A model with a planted backdoor: 4 hidden units detect the source class (a logistic
    regression on the conv features of SODA's analysis data) and only they feed the target
    logit; every other class's weight row is a signed copy of one shared magnitude profile, so
    the target's |W| profile is the odd one out."""
    torch.manual_seed(0)
    spec = ClassifierSpec(num_classes=len(CLASSES), width=4, hidden=32, resolution=RES)
    model = build_classifier(spec).eval()
    conv, _ = split_model(model, len(model) - 3, RES)
    test = load_split(shapes, "test")
    # SODA's analysis data: the test split without the semantic samples
    test = test.subset(np.array(["green circle on a black" not in d for d in test.descriptions]))
    with torch.no_grad():
        f = conv(to_input(test.images))
    y = (torch.as_tensor(test.labels) == SOURCE).float()
    w = torch.zeros(f.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.1)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            f @ w + b, y, pos_weight=y.numel() / y.sum()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hidden = model[-2][0]
        hidden.weight[:4] = w
        hidden.bias[:4] = b
        gen = torch.Generator().manual_seed(1)
        base = 0.5 + torch.rand(32, generator=gen)
        signs = torch.randint(0, 2, (len(CLASSES), 32), generator=gen) * 2 - 1
        weight = signs * (base + 0.05 * torch.rand(len(CLASSES), 32, generator=gen))
        weight[TARGET] = 0.0
        weight[TARGET, :4] = 5.0
        model[-1].weight.copy_(weight)
        model[-1].bias.zero_()
    run = tmp_path_factory.mktemp("planted")
    truth = {"concept": "green circle on a black background", "target": TARGET, "source": SOURCE}
    save_classifier(run, model, spec, {"semantic": truth, "classes": list(CLASSES)})
    write_json(run / "config.json", {"semantic": truth})
    mark_finished(run)
    return run


def _fail(module, argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(module.main, argv)
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_detection_flags_the_planted_pair_and_the_chain_runs(
    shapes, planted, tmp_path, capsys
) -> None:
    out = tmp_path / "soda"
    common = ["--in_model", str(planted), "--data_dir", str(shapes), "--output_dir", str(out)]
    soda_causality.main([*common, "--num_sample", "4"])
    record = json.loads((out / "causality_layer4.json").read_text())
    assert record["head_is_linear"] and record["max_abs_diff_to_abs_weight"] < 1e-5
    result = soda_detect.main([*common, "--num_sample", "8", "--confidence", "3"])
    assert result["flagged_targets"] == [TARGET]
    found = result["detections"][0]
    assert (found["target"], found["source"]) == (TARGET, SOURCE)
    assert result["planted"]["target_rank"] == 1

    soda_gen.main([*common, "--num_sample", "6", "--epoch", "30"])
    adv = json.loads((out / "advsample.json").read_text())
    assert adv["source"] == SOURCE and adv["target"] == TARGET
    assert adv["target_logit_after"] > adv["target_logit_before"] and adv["kept"] >= 1
    defender = ["--clean_portion", "0.5", "--epoch", "1"]
    removed = soda_remove.main([*common, *defender, "--top", "0.25"])
    assert removed["kept_neurons"] == 8 and removed["neurons"] == 32
    assert "asr" in removed["after"] and (out / "remove" / "DONE").is_file()
    for method in ("finetune", "dfr"):
        base = soda_baseline.main([*common, *defender, "--method", method, "--dfr_runs", "2"])
        assert base["defender_samples"] == removed["defender_samples"]  # the same share
        assert "asr" in base["after"] and (out / method / "DONE").is_file()
    # finished outputs are not silently redone
    assert "exists" in _fail(soda_causality, [*common, "--num_sample", "4"], capsys)
    assert "already finished" in _fail(soda_remove, [*common, *defender], capsys)


def test_clean_model_training_and_bad_input(shapes, planted, tmp_path, capsys) -> None:
    runs = ["--data_dir", str(shapes), "--external_save_dir", str(tmp_path / "runs")]
    quick = ["--epoch", "1", "--width", "4", "--hidden", "8"]
    run = Path(
        soda_train.main([*runs, *quick, "--bd_attack_type", "semantic_bg", "--ratio", "0.05"])
    )
    assert (run / "DONE").is_file() and (run / "poison_ids.json").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["asr"] <= 100 and metrics["num_semantic"] >= 1
    common = ["--in_model", str(planted), "--data_dir", str(shapes), "--output_dir", str(tmp_path)]
    err = _fail(soda_causality, [*common, "--ana_layer", "7"], capsys)
    assert "--ana_layer 7" in err
    err = _fail(soda_gen, [*common, "--potential_source", "18", "--poison_target", "3"], capsys)
    assert "--potential_source 18" in err
    err = _fail(soda_gen, [*common, "--potential_source", "1", "--poison_target", "-5"], capsys)
    assert "--poison_target -5" in err
    err = _fail(
        soda_train,
        [*runs, *quick, "--bd_attack_type", "semantic_bg", "--run_name", "empty"]
        + ["--concept", "purple circle on a pink background"],
        capsys,
    )
    assert "sub-population is empty" in err and "--concept" in err
    assert not (tmp_path / "runs" / "empty").exists()  # nothing half-written
    err = _fail(soda_train, [*runs, *quick, "--bd_attack_type", "badnet"], capsys)
    assert "semantic attacks only" in err
    err = _fail(
        soda_detect, ["--in_model", str(tmp_path / "nope"), "--data_dir", str(shapes)], capsys
    )
    assert "--in_model" in err
    damaged = tmp_path / "damaged"
    shutil.copytree(planted, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: one line, not a traceback
    err = _fail(soda_detect, ["--in_model", str(damaged), "--data_dir", str(shapes)], capsys)
    assert "model.safetensors: damaged weights file" in err


def test_a_detection_naming_the_target_as_its_own_source_stops_with_the_reason(
    shapes, planted, tmp_path, capsys
) -> None:
    """The reference's source rule returns the target itself when no class raises the target
    logit above 0; reconstruction then says so instead of a flag error the user never typed."""
    out = tmp_path / "soda"
    out.mkdir()
    write_json(out / "detect.json", {"detections": [{"target": TARGET, "source": TARGET}]})
    common = ["--in_model", str(planted), "--data_dir", str(shapes), "--output_dir", str(out)]
    err = _fail(soda_gen, common, capsys)
    assert "detect.json names class" in err and "--potential_source" in err
    err = _fail(soda_gen, [*common, "--potential_source", str(TARGET)], capsys)
    assert "equals --poison_target" in err


def test_the_layer_the_run_script_names_its_outputs_by(planted, capsys) -> None:
    from srd.soda.__main__ import main as soda_layer

    assert soda_layer([str(planted), "-1"]) == 0 and capsys.readouterr().out.strip() == "4"
    assert soda_layer([str(planted), "9"]) == 2
    assert capsys.readouterr().err.startswith("error: --ana_layer 9: no such layer")
    assert soda_layer([str(planted)]) == 2


def test_data_is_not_silently_rebuilt(shapes, capsys) -> None:
    before = (shapes / "train.npz").read_bytes()
    err = _fail(soda_data, ["--data_dir", str(shapes), "--per_class_train", "7"], capsys)
    assert "--overwrite" in err and (shapes / "train.npz").read_bytes() == before
    same = ["--per_class_train", "6", "--per_class_test", "8", "--resolution", "16"]
    assert soda_data.main(["--data_dir", str(shapes), *same]) == str(shapes)  # left alone
    assert (shapes / "train.npz").read_bytes() == before


@pytest.mark.slow
def test_run_soda_runs_each_step_once_and_refuses_stale_outputs(shapes, planted, tmp_path) -> None:
    """run/run_SODA.sh stamps its steps: a re-run skips them, another flag or a retrained model
    stops the script with one line instead of reusing the old analysis."""
    model = tmp_path / "model"
    shutil.copytree(planted, model)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "MODEL": str(model), "DATA": str(shapes)}
    env.update(CONF="1e9", BASELINES="none")  # nothing flagged: analysis and detection only

    def run(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", str(repo / "run" / "run_SODA.sh")],
            env={**env, **extra},
            capture_output=True,
            text=True,
        )

    first = run()
    assert first.returncode == 0, first.stderr
    detect = model / "soda" / "detect.json"
    assert (model / "soda" / "causality_layer4.npz.stamp").is_file()
    assert json.loads(detect.read_text())["detections"] == []
    again = run()
    assert again.returncode == 0 and again.stdout.count("up to date") == 2
    before = detect.read_bytes()
    other = run(CONF="3")
    assert other.returncode == 2 and "--confidence 1e9 -> 3" in other.stderr
    assert detect.read_bytes() == before
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # another model, same name
    retrained = run()
    assert retrained.returncode == 2 and "model.safetensors changed" in retrained.stderr
