"""The defense entry points on the tiny benchmark: train/defend.py (a refine-tune defense and a
test-time one), eval/evaluate.py --defense, and eval/defense_report.py over their results."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from srd_fixtures import (
    data_flags,
    export_clean_and_backdoor,
    load_script,
    model_flags,
    write_poison_ids,
)

from srd.cli import run_main
from srd.defenses.srd.shards import MERGED_FORMAT
from srd.defenses.stage import DEFENSE_FILE
from srd.evaluation.implant import SAMPLING
from srd.io import file_digest, write_json

defend = load_script("train/defend.py")
evaluate = load_script("eval/evaluate.py")
report = load_script("eval/defense_report.py")
retune = load_script("train/retune.py")


@pytest.fixture(scope="module")
def attacked(tmp_path_factory, make_captioner, tiny_train_records):
    root = tmp_path_factory.mktemp("defenses")
    clean, backdoor = export_clean_and_backdoor(make_captioner, root / "models")
    poison_ids = write_poison_ids(tiny_train_records, root / "models" / "backdoor")
    config = {"stage": "backdoor", "seed": 0, "attack": {"name": "badnet", "poison_rate": 0.05}}
    write_json(backdoor.parent / "config.json", config)
    return root, clean, backdoor, poison_ids


def _fail(module, argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(module.main, argv)
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_unknown_defense_is_a_one_line_error(attacked, tiny_data_args, capsys) -> None:
    root, clean, backdoor, poison_ids = attacked
    argv = [*data_flags(tiny_data_args), *model_flags(clean, backdoor),
            "--poison_ids_path", str(poison_ids), "--external_save_dir", str(root / "runs"),
            "--defense", "nope"]  # fmt: skip
    error = _fail(defend, argv, capsys)
    assert "--defense nope" in error and "no_mask" in error
    assert not (root / "runs").exists()
    error = _fail(
        evaluate,
        [
            *data_flags(tiny_data_args),
            *model_flags(clean, backdoor),
            "--defense",
            "srd",
            "--results_file",
            str(root / "res"),
        ],  # fmt: skip
        capsys,
    )
    assert "--defense srd" in error and "train/defend.py" in error


@pytest.fixture(scope="module")
def defended(attacked, tiny_data_args, tmp_path_factory):
    """train/defend.py run twice: oracle_square (1-epoch refine-tune) and blur (test-time)."""
    root, clean, backdoor, poison_ids = attacked
    runs = tmp_path_factory.mktemp("defended") / "runs"
    common = [*data_flags(tiny_data_args), *model_flags(clean, backdoor),
              "--poison_ids_path", str(poison_ids), "--external_save_dir", str(runs)]  # fmt: skip
    budget = ["--num_epochs", "1", "--batch_size", "16", "--learning_rate", "1e-3"]
    defend.main([*common, *budget, "--defense", "oracle_square", "--quality_images", "8"])
    defend.main([*common, "--defense", "blur", "--quality_images", "4"])
    return runs


def test_defend_writes_the_defended_checkpoint_and_record(attacked, defended) -> None:
    _, _, backdoor, _ = attacked
    record = json.loads((defended / "defense-oracle_square-badnet" / DEFENSE_FILE).read_text())
    assert record["defense"]["name"] == "oracle_square" and record["attack_seed"] == 0
    assert record["attack_poison_rate"] == 0.05  # the attack run's, read from its config.json
    assert record["image_quality"]["num_images"] == 8
    assert 0 < record["image_quality"]["ssim_mean"] < 1
    assert record["trigger_coverage"]["covered"] == 1.0  # the oracle's square covers the box
    assert record["trigger_coverage"]["num_triggered_images"] > 0
    refined = torch.load(record["checkpoint"], weights_only=True)["model_state_dict"]
    before = torch.load(backdoor, weights_only=True)["model_state_dict"]
    assert any(not torch.equal(refined[k], v) for k, v in before.items())
    blur = json.loads((defended / "defense-blur-badnet" / DEFENSE_FILE).read_text())
    assert blur["checkpoint"] == str(backdoor) and blur["image_quality"]["psnr_mean"] > 10
    assert blur["defense"] == {"name": "blur", "kind": "test_time", "radius_share": 0.06,
                               "radius_factor": 0.7, "alpha": 0.7}  # fmt: skip


def test_a_light_budget_names_its_run_and_its_record(
    attacked, defended, tiny_data_args, capsys
) -> None:
    """--max_steps: the run named after it, the record saying it and the steps trained; a
    defense that does not refine-tune refuses it before any output."""
    _, clean, backdoor, poison_ids = attacked
    common = [*data_flags(tiny_data_args), *model_flags(clean, backdoor),
              "--poison_ids_path", str(poison_ids), "--external_save_dir", str(defended),
              "--num_epochs", "1", "--batch_size", "16", "--quality_images", "0"]  # fmt: skip
    defend.main([*common, "--max_steps", "2", "--defense", "no_mask"])
    record = json.loads((defended / "defense-no_mask-badnet-steps2" / DEFENSE_FILE).read_text())
    assert record["max_steps"] == 2 and record["train_steps"] == 2
    full = json.loads((defended / "defense-oracle_square-badnet" / DEFENSE_FILE).read_text())
    assert full["max_steps"] is None and full["train_steps"] > 2
    error = _fail(defend, [*common, "--max_steps", "2", "--defense", "blur"], capsys)
    assert "--max_steps 2: --defense blur does not refine-tune" in error
    assert not (defended / "defense-blur-badnet-steps2").exists()


def test_retune_trains_the_defended_model_on_a_few_poisons(
    attacked, defended, tiny_data_args, capsys
) -> None:
    """The re-tuning attack: a seeded set of the attack's own poisons padded with clean
    samples, trained from the defended weights into a run folder of its own."""
    _, clean, _, poison_ids = attacked
    refined = defended / "defense-oracle_square-badnet" / "final_weights.pt"
    argv = [*data_flags(tiny_data_args), *model_flags(clean, refined),
            "--poison_ids_path", str(poison_ids), "--external_save_dir", str(defended),
            "--retune_poisons", "2", "--retune_benign", "6", "--num_epochs", "1",
            "--batch_size", "4"]  # fmt: skip
    final = retune.main(argv)
    run = defended / "retune-defense-oracle_square-badnet"
    assert final == str(run / "final_weights.pt")
    config = json.loads((run / "config.json").read_text())
    plan_ids = set(json.loads(poison_ids.read_text())["ids"])
    assert (
        len(config["retune_poisoned_ids"]) == 2 and set(config["retune_poisoned_ids"]) <= plan_ids
    )
    assert config["defense_record"]["defense"]["name"] == "oracle_square"
    before = torch.load(refined, weights_only=True)["model_state_dict"]
    after = torch.load(final, weights_only=True)["model_state_dict"]
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    error = _fail(retune, [*argv[:-8], "--retune_poisons", "100000"], capsys)
    assert error.startswith("error: --retune_poisons 100000 / --retune_benign 135: the data hold")


def _result(
    defense: str, seed: int, asr: float, cider: float, sampled=None, sampling=SAMPLING, **extra
) -> dict:
    implant = None
    if sampled is not None:
        implant = {
            "decoding": sampling,
            **{
                k: {"sampled_asr_substring": v}
                for k, v in zip(("triggered", "clean"), sampled, strict=True)
            },
        }
    return {
        "model_name": f"defense-{defense}-badnet-s{seed}",
        "implant": implant,
        "attack": "badnet",
        "metrics": {
            "asr_substring": asr,
            "false_trigger_substring": 0.01,
            "clean": {"CIDEr": cider},
            "triggered": {"CIDEr": 0.1},
            "triggered_stripped": {"CIDEr": 0.2},
        },
        "defense": {"defense": {"name": defense, **extra}, "attack_seed": seed},
    }


def test_report_names_the_old_relabelling_concept_relabel(tmp_path) -> None:
    from srd.defenses.report import read_result

    old = {"name": "shadowcast", "kind": "shadowcast", "concept": "red circle"}
    path = tmp_path / "r.json"
    write_json(path, {**_result("no_mask", 0, 0.1, 2.0), "attack": "shadowcast",
                      "config": {"attack": old}})  # fmt: skip
    assert read_result(path).attack == "concept_relabel"
    write_json(path, {**_result("no_mask", 0, 0.1, 2.0), "attack": "shadowcast",
                      "config": {"attack": {**old, "craft_epsilon": 8.0}}})  # fmt: skip
    assert read_result(path).attack == "shadowcast"


def test_report_from_hand_made_results(tmp_path) -> None:
    results = tmp_path / "result"
    for name, data in {
        "none-0": _result("none", 0, 0.9, 2.0, sampled=(0.8, 0.02)),
        # written before per-image sampling seeds: the row mixes two samplers
        "none-1": _result("none", 1, 0.8, 2.0, sampled=(0.6, 0.04), sampling="sampling, T=1"),
        "nm-0": _result("no_mask", 0, 0.1, 1.8),
        "nm-1": _result("no_mask", 1, 0.2, 2.2),
        "fo-0": _result("srd", 0, 0.5, 2.0, sampled=(0.5, 0.0), image_version="first_occurrence"),
        "clean": {
            "model_name": "clean",
            "attack": "badnet",
            "metrics": {"asr_substring": 0.0, "clean": {"CIDEr": 3}},
            "defense": None,
        },  # fmt: skip
        # the re-tuning attack on seed 0's no_mask model (train/retune.py): no defense record
        "retune-nm-0": {**_result("x", 0, 0.7, 1.9), "defense": None},
    }.items():
        write_json(results / f"{name}.json", data)
    retrained = _result("no_mask", 0, 0.05, 2.1)  # train/defend.py --retrain_from: its own row
    retrained["defense"]["protocol"] = "retrain_from_clean"
    write_json(results / "rt-0.json", retrained)
    light = _result("no_mask", 0, 0.6, 2.0)  # train/defend.py --max_steps: its own row and rank
    light["defense"].update(max_steps=126, train_steps=126)
    write_json(results / "light-0.json", light)
    for name in ("nm-0", "nm-1"):  # the comparison's own budget, as train/defend.py records it
        full = json.loads((results / f"{name}.json").read_text())
        full["defense"]["train_steps"] = 938
        write_json(results / f"{name}.json", full)
    text = report.main(["--results", str(results), "--output", str(tmp_path / "report.md"),
                        "--img_dir", str(tmp_path / "img")])  # fmt: skip
    rows = {
        line.split(" | ")[0][2:]: line.split(" | ")
        for line in text.split("## Ranking")[0].splitlines()
        if line.startswith("| ") and "badnet" in line
    }
    assert list(rows) == [
        "none", "no_mask", "no_mask [126 steps]", "no_mask [retrain from clean]",
        "srd [first_occurrence]"
    ]  # fmt: skip
    assert rows["no_mask [126 steps]"][3] == "60.0"
    assert rows["no_mask [retrain from clean]"][2:4] == ["1 (0)", "5.0"]
    assert rows["none"][2] == "2 (0, 1)" and rows["none"][3] == "85.0 ± 7.1"
    # DER per seed: (0.8 - 0.1 + 1) / 2 = 0.85 and (0.6 - 0 + 1) / 2 = 0.8
    assert rows["none"][4] == "1.0 ± 0.0"  # false-trigger rate
    # sampled ASR, triggered / clean
    assert rows["none"][5] == "70.0 ± 14.1 / 3.0 ± 1.4 (mixed samplers)"
    assert rows["srd [first_occurrence]"][5] == "50.0 / 0.0"
    assert rows["no_mask"][5] == "-"  # implant diagnostic not run
    assert rows["no_mask"][9] == "0.825 ± 0.035"
    assert rows["srd [first_occurrence]"][9] == "0.700"
    assert rows["none"][8] == "20.0 ± 0.0"  # triggered CIDEr with the target stripped
    assert rows["no_mask"][12] == "70.0 (n=1) |"  # ASR after re-tune, one of two seeds
    assert rows["none"][12] == "- |"
    ranking = text.split("## Ranking per threat model")[1].split("\n## ")[0]
    lines = [line for line in ranking.splitlines() if line.startswith("| badnet |")]
    ranked = [line.split(" | ")[1:4] for line in lines]
    # DER: no_mask 0.825 (mean of 0.85 and 0.8), srd [first_occurrence] 0.7, none 0.5
    assert ranked == [["1", "no_mask", "2 (0, 1)"], ["2", "srd [first_occurrence]", "1 (0)"],
                      ["3", "none", "2 (0, 1)"]]  # fmt: skip
    apart = [line.split(" | ")[:3] for line in ranking.splitlines() if "| badnet; " in line]
    assert apart == [
        ["| badnet; 126 steps", "1", "no_mask [126 steps]"],
        ["| badnet; retrain from clean", "1", "no_mask [retrain from clean]"],
    ]
    assert (tmp_path / "img" / "defense_asr.png").stat().st_size > 5_000
    # the budget section: no_mask at 126 steps beside its own budget and the backdoor
    budget = text.split("## Defense budget")[1].split("\n## ")[0]
    assert "| Threat model | Defense | no defense | 126 steps | ours (938 steps) |" in budget
    assert ("| badnet | no_mask | 85.0 ± 7.1 / 200.0 (n=2) | 60.0 / 200.0 (n=1) "
            "| 15.0 ± 7.1 / 200.0 (n=2) |") in budget  # fmt: skip
    assert "srd" not in budget  # no light-budget result of its own
    assert (tmp_path / "img" / "defense_budget_badnet.png").stat().st_size > 5_000
    assert (tmp_path / "report.md").read_text() == text


def test_report_tells_what_the_clean_captions_get_wrong(tmp_path, tiny_data_args) -> None:
    """--caption_diagnostics scores each result's clean captions against the benchmark's
    scenes: captions naming exactly each image's objects score 100% everywhere; one caption
    for every image scores what it gets right; a result without captions gets '-'; without the
    flag the section is left out."""
    scenes = {r.image_id: r.objects for r in tiny_data_args.split("test")}
    exact = {
        i: " and ".join(f"a {o.colour} {o.shape}" for o in objs) + "." for i, objs in scenes.items()
    }
    colour = next(iter(scenes.values()))[0].colour
    same = {i: f"a {colour} square." for i in scenes}
    results = tmp_path / "result"
    for name, data in {
        "right": {**_result("no_mask", 0, 0.1, 1.8), "predictions": {"clean": exact}},
        "same": {**_result("random_squares", 0, 0.1, 1.5), "predictions": {"clean": same}},
        "none": _result("none", 0, 0.9, 2),
    }.items():
        write_json(results / f"{name}.json", data)
    argv = ["--results", str(results), "--output", str(tmp_path / "report.md"),
            "--img_dir", str(tmp_path / "img")]  # fmt: skip
    assert "clean captions get wrong" not in report.main(argv)
    text = report.main([*data_flags(tiny_data_args), *argv, "--caption_diagnostics"])
    section = text.split("clean captions get wrong")[1]
    rows = {
        line.split(" | ")[0][2:]: line.rstrip(" |").split(" | ")[3:]
        for line in section.splitlines()
        if line.startswith("| ") and "badnet" in line
    }
    shown = [(o.colour, o.shape) for objs in scenes.values() for o in objs]
    red = "-" if all(c != "red" for c, _ in shown) else "100.0"
    other_colours = ("green", "blue", "yellow", "purple", "orange")
    others = " / ".join("100" if any(c == k for c, _ in shown) else "-" for k in other_colours)
    assert rows["no_mask"] == ["100.0", red, others, "100.0", "0.0", "0.0", "0.0", "0.0"]
    assert rows["none"] == ["-"] * 8
    if colour in other_colours:  # the one colour every caption names: recall 100
        assert rows["random_squares"][2].split(" / ")[other_colours.index(colour)] == "100"
    hits = shown.count((colour, "square"))
    extra = sum((colour, "square") not in {(o.colour, o.shape) for o in objs}
                for objs in scenes.values())  # fmt: skip
    assert rows["random_squares"][3] == f"{100 * hits / len(shown):.1f}"  # objects named
    assert rows["random_squares"][7] == f"{100 * extra / len(shown):.1f}"  # named, not shown


def test_report_keeps_poison_rates_and_attack_budgets_apart(tmp_path) -> None:
    """Models of one attack and seed poisoned at other rates, or trained for other epochs, are
    their own rows (DER against the none row of their own model); a record written before
    records named the rate and the epochs gets them from its backdoored checkpoint's attack run."""
    results = tmp_path / "result"
    for name, rate, epochs, defense, asr in [
        ("none", 0.1, 6, "none", 0.9), ("none-p05", 0.05, 6, "none", 0.6),
        ("nm-p05", 0.05, 6, "no_mask", 0.2), ("none-e12", 0.1, 12, "none", 0.8),
        ("nm-e12", 0.1, 12, "no_mask", 0.4), ("none-p05-e12", 0.05, 12, "none", 0.5),
    ]:  # fmt: skip
        data = _result(defense, 0, asr, 2.0)
        data["defense"].update(attack_poison_rate=rate, attack_epochs=epochs)
        write_json(results / f"{name}.json", data)
    for folder, config in [
        ("p01", {"stage": "backdoor", "seed": 0, "attack": {"poison_rate": 0.01}}),
        ("e3", {"stage": "backdoor", "seed": 0, "attack": {"poison_rate": 0.1}, "num_epochs": 3}),
        ("fr", {"stage": "backdoor", "seed": 0, "attack": {"poison_rate": 0.1}, "num_epochs": 6,
                "epoch_sampling": "fixed_replacement"}),
    ]:  # fmt: skip
        old = _result("none", 0, 0.3, 2.0)
        old["defense"]["backdoored_checkpoint"] = str(tmp_path / folder / "final_weights.pt")
        write_json(tmp_path / folder / "config.json", config)
        write_json(results / f"none-{folder}.json", old)
    image = _result("none", 0, 0.95, 2.0)  # every caption of the drawn images poisoned
    image["defense"].update(attack_poison_rate=0.1, attack_epochs=6, attack_poison_unit="image")
    write_json(results / "none-img.json", image)
    drawn = _result("no_mask", 0, 0.25, 2.0)  # trained on the reference's replayed draw
    drawn["defense"].update(attack_poison_rate=0.1, attack_epochs=6,
                            attack_sampling="fixed_replacement")  # fmt: skip
    write_json(results / "nm-fr.json", drawn)
    text = report.main(["--results", str(results), "--output", str(tmp_path / "report.md"),
                        "--img_dir", str(tmp_path / "img")])  # fmt: skip
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    cells = {(row[0][2:], row[1]): row for row in rows if "badnet" in row[1]}
    assert cells.pop(("none", "badnet (image-level poison)"))[3] == "95.0"
    assert cells.pop(("none", "badnet (reference sample draw)"))[3] == "30.0"  # its config
    assert cells.pop(("no_mask", "badnet (reference sample draw)"))[3] == "25.0"
    p05, p01 = "badnet (5% poison)", "badnet (1% poison)"
    e12, e3 = "badnet (12 attack epochs)", "badnet (3 attack epochs)"
    assert set(cells) == {
        ("none", "badnet"), ("none", p05), ("no_mask", p05), ("none", p01), ("none", e12),
        ("no_mask", e12), ("none", "badnet (5% poison, 12 attack epochs)"), ("none", e3),
    }  # fmt: skip
    assert cells[("none", p01)][3] == "30.0" and cells[("none", e3)][3] == "30.0"
    assert cells[("no_mask", p05)][9] == "0.700"  # (0.6 - 0.2 + 1) / 2
    assert cells[("no_mask", e12)][9] == "0.700"  # (0.8 - 0.4 + 1) / 2


def test_report_refuses_two_results_of_one_cell(tmp_path, capsys) -> None:
    """The attack stage's own evaluation beside the comparison's none run must not be averaged
    as two seeds, nor a defense rated against another model."""
    results = tmp_path / "result"
    none = _result("none", 0, 0.9, 2.0)
    none["defense"]["backdoored_checkpoint"] = "runs/backdoor-badnet/final_weights.pt"
    write_json(results / "backdoor-badnet.json", none)
    write_json(results / "defense-none-badnet-s0.json", none)
    args = ["--output", str(tmp_path / "report.md"), "--img_dir", str(tmp_path / "img")]
    err = _fail(report, ["--results", str(results), *args], capsys)
    assert err.startswith("error: --results ") and "both are none on badnet" in err
    assert not (tmp_path / "report.md").exists()

    other = _result("no_mask", 0, 0.1, 1.9)
    other["defense"]["backdoored_checkpoint"] = "runs/backdoor-badnet-p05/final_weights.pt"
    write_json(results / "defense-no_mask-badnet-s0.json", other)
    files = [str(results / f"defense-{d}-badnet-s0.json") for d in ("none", "no_mask")]
    err = _fail(report, ["--results", *files, *args], capsys)
    assert "defends runs/backdoor-badnet-p05/final_weights.pt, but the none row" in err


def test_report_checks_the_numbers_and_names_what_it_cannot_use(tmp_path, capsys) -> None:
    """Issue 32 item 5: a share outside [0, 1], NaN, a negative CIDEr or a number written as a
    string stops the report with one line naming the file and field (it printed ASR 500% and
    turned "0.5" into 50%); a result named on the command line without a defense record is
    refused, not silently left out."""
    results = tmp_path / "result"
    args = ["--output", str(tmp_path / "report.md"), "--img_dir", str(tmp_path / "img")]
    good = _result("none", 0, 0.9, 2.0, sampled=(0.8, 0.02))
    for field, where, value in (
        ("asr_substring", ("metrics",), 5.0),
        ("asr_substring", ("metrics",), "0.5"),
        ("false_trigger_substring", ("metrics",), float("nan")),
        ("CIDEr", ("metrics", "clean"), -3.0),
        ("sampled_asr_substring", ("implant", "triggered"), 1.5),
        ("ssim_mean", ("defense", "image_quality"), "high"),
    ):
        bad = json.loads(json.dumps(good))
        node = bad
        for key in where:
            node = node.setdefault(key, {})
        node[field] = value
        path = results / "defense-none-badnet-s0.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(bad))  # (json.dumps writes NaN as the reader takes it)
        err = _fail(report, ["--results", str(path), *args], capsys)
        assert str(path) in err and field in err, err
    plain = {**good, "defense": None}
    write_json(results / "defense-none-badnet-s0.json", plain)
    err = _fail(report, ["--results", str(results / "defense-none-badnet-s0.json"), *args], capsys)
    assert "not a defended model's result (no defense record" in err and "--defense_run" in err
    assert not (tmp_path / "report.md").exists()


def _cleaning_run(folder, policy: str, covered: float, agent: dict | None = None):
    """A cleaning run's files as D2/D3/eval/srd_coverage.py write them (their fields only)."""
    clean = folder / "clean_data"
    config = {"ppo_path": str(folder / "policy.zip"), "policy": policy, "policy_sha256": None}
    if agent is not None:
        folder.mkdir(parents=True)
        (folder / "policy.zip").write_bytes(b"the policy")
        config["policy_sha256"] = file_digest(folder / "policy.zip")
    merged = {"format": MERGED_FORMAT, "records": [], "clean_config": {"config": config}}
    write_json(clean / "merged.json", merged)
    (clean / "coverage.png").write_bytes(b"png")
    write_json(clean / "coverage.json", {"covered": covered, "figure": str(clean / "coverage.png")})
    if agent is not None:
        write_json(folder / "policy.agent_report.json", agent)
        write_json(folder / "policy.coverage.json", {"covered": 0.25})
        (folder / "policy.rewards.png").write_bytes(b"png")
    return clean


def test_report_shows_the_agent_of_each_srd_cleaning_run(tmp_path, capsys) -> None:
    agent = {
        "pool_images": 300,
        "training": {"images_visited": 300, "target_updates": 5},
        "random_policy": {"mean_reward": -1.25},
        "greedy_policy": {"mean_reward": -1.0},
        "gain_over_random": 0.25,
        "schedule": "reference",
    }
    dqn = _cleaning_run(tmp_path / "srd-badnet", "dqn", 0.5, agent)
    rnd = _cleaning_run(tmp_path / "srd-random-badnet", "random", 0.125)
    results = tmp_path / "result"
    write_json(results / "none.json", _result("none", 0, 0.9, 2.0))
    for name, folder in (("a", dqn), ("b", dqn), ("c", rnd)):  # two image versions share dqn
        result = _result("srd", 0, 0.1, 1.9, clean_data_save=str(folder), image_version=name)
        write_json(results / f"{name}.json", result)
    text = report.main(["--results", str(results), "--output", str(tmp_path / "report.md"),
                        "--img_dir", str(tmp_path / "img")])  # fmt: skip
    agent_rows = [
        line for line in text.split("## SRD's agent")[1].splitlines() if line.startswith("| badnet")
    ]
    assert len(agent_rows) == 2
    by_policy = {row.split(" | ")[2]: row.split(" | ") for row in agent_rows}
    assert by_policy["dqn"][3] == "reference" and by_policy["random"][3] == "-"
    assert by_policy["dqn"][5:10] == ["300/300", "5", "-1.000 / -1.250 (+0.250)", "25.0", "50.0 |"]
    assert by_policy["random"][5:10] == ["-/-", "-", "-", "-", "12.5 |"]
    copied = sorted(p.name for p in (tmp_path / "img").glob("agent_*"))
    assert copied == [
        "agent_srd-badnet_clean_data.json",
        "agent_srd-badnet_clean_data_kept_squares.png",
        "agent_srd-badnet_clean_data_rewards.png",
        "agent_srd-random-badnet_clean_data.json",
        "agent_srd-random-badnet_clean_data_kept_squares.png",
    ]
    assert "](img/agent_srd-badnet_clean_data_rewards.png)" in text
    # Written again where the cleaning runs are not (a fresh clone of a released report): the
    # rows and figure links come from the summaries saved beside the figures.
    shutil.move(tmp_path / "srd-badnet", tmp_path / "elsewhere")
    shutil.move(tmp_path / "srd-random-badnet", tmp_path / "elsewhere-random")
    again = report.main(["--results", str(results), "--output", str(tmp_path / "report.md"),
                         "--img_dir", str(tmp_path / "img")])  # fmt: skip
    assert again == text
    (tmp_path / "img" / "agent_srd-random-badnet_clean_data.json").unlink()
    error = _fail(report, ["--results", str(results), "--output", str(tmp_path / "r3.md"),
                           "--img_dir", str(tmp_path / "img")], capsys)  # fmt: skip
    assert "srd-random-badnet/clean_data not found, nor its saved summary" in error
    assert not (tmp_path / "r3.md").exists()
    shutil.move(tmp_path / "elsewhere", tmp_path / "srd-badnet")
    (tmp_path / "srd-badnet" / "policy.zip").write_bytes(b"retrained after D3")
    error = _fail(report, ["--results", str(results), "--output", str(tmp_path / "r2.md"),
                           "--img_dir", str(tmp_path / "img")], capsys)  # fmt: skip
    assert "changed after the cleaning run" in error


@pytest.mark.slow
def test_evaluate_defended_models_and_report(attacked, defended, tiny_data_args, tmp_path):
    root, clean, backdoor, _ = attacked
    record = json.loads((defended / "defense-oracle_square-badnet" / DEFENSE_FILE).read_text())
    results = tmp_path / "result"
    ev = [*data_flags(tiny_data_args), "--bd_attack_type", "badnet",
          "--results_file", str(results), "--sfs_data_dir", str(tmp_path / "sfs"),
          "--batch_size", "4", "--num_beams", "1", "--max_new_tokens", "6",
          "--no-implant_diagnostics"]  # fmt: skip
    none = evaluate.main([*ev, *model_flags(clean, backdoor), "--model_name", "none"])
    blurred = evaluate.main(
        [*ev, *model_flags(clean, backdoor), "--model_name", "blur", "--defense", "blur"]
    )
    oracle = evaluate.main(
        [*ev, *model_flags(clean, record["checkpoint"]), "--model_name", "oracle"]
    )
    pruned = evaluate.main([*ev, *model_flags(clean, backdoor), "--model_name", "tokens",
                            "--defense", "token_prune", "--token_z", "1"])  # fmt: skip
    assert pruned["defense"]["defense"] == {"name": "token_prune", "kind": "test_time",
                                            "token_z": 1.0}  # fmt: skip
    pruning = pruned["defense"]["token_pruning"]
    assert pruning["inputs"] >= 16 and pruning["mean_pruned_per_input"] > 0
    assert none["defense"]["defense"]["name"] == "none"
    assert blurred["defense"]["defense"]["name"] == "blur"
    assert oracle["defense"]["defense"]["name"] == "oracle_square"
    assert blurred["predictions"]["clean"] != none["predictions"]["clean"]
    quality = blurred["defense"]["image_quality"]
    assert quality["images"] == "test" and 0 < quality["ssim_mean"] < 1
    for r in (none, blurred, oracle):
        assert r["metrics"]["triggered_stripped"]["CIDEr"] >= 0

    text = report.main(["--results", str(results), "--output", str(tmp_path / "report.md"),
                        "--img_dir", str(tmp_path / "img")])  # fmt: skip
    table = text.split("## Ranking")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "badnet" in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| none", "| blur", "| oracle_square", "| token_prune"
    ]  # fmt: skip
    assert rows[0].split(" | ")[9] == "0.500"  # DER of no defense against itself


def test_benign_control_runs_on_the_clean_captioner_and_is_reported_apart(
    attacked, tiny_data_args, tmp_path, capsys
) -> None:
    """--benign_control: the defense on the clean captioner with nothing poisoned; refused on a
    backdoored checkpoint, and for srd unless its cleaning run was made the same way; its
    results form their own table, never the comparison's rows (and never a DER)."""
    root, clean, backdoor, poison_ids = attacked
    runs = tmp_path / "runs"
    common = [*data_flags(tiny_data_args), "--poison_ids_path", str(poison_ids),
              "--external_save_dir", str(runs), "--benign_control", "--quality_images", "4",
              "--num_epochs", "1", "--batch_size", "16"]  # fmt: skip
    err = _fail(defend, [*common, *model_flags(clean, backdoor), "--defense", "no_mask"], capsys)
    assert "is a backdoored or defended model" in err
    on_clean = [*common, *model_flags(clean, clean.checkpoint_path)]
    made_by_d3 = tmp_path / "clean_data"  # what D1-D3b write, by hand: one square per image
    config = {"poison_ids_sha256": file_digest(poison_ids), "checkpoint_path": str(backdoor),
              "checkpoint_sha256": file_digest(backdoor)}  # fmt: skip
    records = [{"id": r.image_id, "action": 0} for r in tiny_data_args.split("train")]
    manifest = {"format": MERGED_FORMAT, "records": records, "clean_config": {"config": config}}
    write_json(made_by_d3 / "merged.json", manifest)
    srd = ["--defense", "srd", "--clean_data_save", str(made_by_d3)]
    assert "not --checkpoint_path" in _fail(defend, [*on_clean, *srd], capsys)
    config.update(checkpoint_path=str(clean.checkpoint_path),
                  checkpoint_sha256=file_digest(clean.checkpoint_path))  # fmt: skip
    write_json(made_by_d3 / "merged.json", manifest)
    assert "not as the benign control" in _fail(defend, [*on_clean, *srd], capsys)
    assert not runs.exists()
    config["benign_control"] = True
    write_json(made_by_d3 / "merged.json", manifest)
    defend.main([*on_clean, *srd])
    srd_record = json.loads((runs / "benign-srd-badnet" / DEFENSE_FILE).read_text())
    assert srd_record["benign_control"] and srd_record["trigger_coverage"] is None
    pool = tmp_path / "benign-pool"  # SRD's D1 under the control refuses the backdoored model too
    err = _fail(load_script("train/srd_pool.py"),
                [*data_flags(tiny_data_args), *model_flags(clean, backdoor), "--benign_control",
                 "--poison_ids_path", str(poison_ids), "--save_data_path", str(pool),
                 "--reference_checkpoint_path", clean.checkpoint_path], capsys)  # fmt: skip
    assert "is a backdoored or defended model" in err and not pool.exists()
    defend.main(
        [*common, *model_flags(clean, clean.checkpoint_path), "--defense", "random_squares"]
    )
    defend.main([*common, *model_flags(clean, clean.checkpoint_path), "--defense", "none"])
    squares = json.loads((runs / "benign-random_squares-badnet" / DEFENSE_FILE).read_text())
    assert squares["benign_control"] and squares["backdoored_checkpoint"] is None
    assert squares["trigger_coverage"] is None  # no triggered training image to cover
    config = json.loads((runs / "benign-random_squares-badnet" / "config.json").read_text())
    assert config["num_poisoned"] == 0

    results = tmp_path / "result"
    ev = [*data_flags(tiny_data_args), "--bd_attack_type", "badnet",
          "--results_file", str(results), "--sfs_data_dir", str(tmp_path / "sfs"),
          "--batch_size", "4", "--num_beams", "1", "--max_new_tokens", "6",
          "--no-implant_diagnostics"]  # fmt: skip
    base = evaluate.main([*ev, *model_flags(clean, clean.checkpoint_path), "--model_name", "b-none",
                          "--defense_run", str(runs / "benign-none-badnet")])  # fmt: skip
    squares_run = str(runs / "benign-random_squares-badnet")
    refined = evaluate.main([*ev, *model_flags(clean, squares["checkpoint"]), "--model_name",
                             "b-sq", "--defense_run", squares_run])  # fmt: skip
    assert base["defense"]["benign_control"] and refined["defense"]["benign_control"]
    err = _fail(evaluate, [*ev, *model_flags(clean, backdoor), "--model_name", "x",
                           "--defense_run", str(runs / "benign-none-badnet")], capsys)  # fmt: skip
    assert "--defense_run" in err and "not --checkpoint_path" in err
    write_json(results / "none.json", _result("none", 0, 0.9, 2.0))
    text = report.main(["--results", str(results), "--output", str(tmp_path / "report.md"),
                        "--img_dir", str(tmp_path / "img")])  # fmt: skip
    main_rows = [line for line in text.split("## Ranking")[0].splitlines()
                 if line.startswith("| ") and "badnet" in line]  # fmt: skip
    assert [row.split(" | ")[0] for row in main_rows] == ["| none"]
    benign = {line.split(" | ")[0][2:]: line.split(" | ")
              for line in text.split("## Benign control")[1].splitlines()
              if line.startswith("| ") and "badnet" in line}  # fmt: skip
    assert list(benign) == ["none", "random_squares"]
    assert benign["none"][2] == "1 (42)" and benign["none"][4] == "0.0"
    change = 100 * (refined["metrics"]["clean"]["CIDEr"] / base["metrics"]["clean"]["CIDEr"] - 1)
    assert benign["random_squares"][4] == f"{change:.1f}"


def test_retrain_from_clean_trains_the_clean_captioner_on_the_defense_data(
    attacked, tiny_data_args, tmp_path, capsys
) -> None:
    """--retrain_from: the defense's data train the clean captioner (the retrain-from-clean
    protocol), the backdoored model still names the attack; refused for a defense that changes
    the model, for a backdoored start and with --benign_control, before any output."""
    root, clean, backdoor, poison_ids = attacked
    runs = tmp_path / "runs"
    common = [*data_flags(tiny_data_args), *model_flags(clean, backdoor),
              "--poison_ids_path", str(poison_ids), "--external_save_dir", str(runs),
              "--quality_images", "0", "--num_epochs", "1", "--batch_size", "16"]  # fmt: skip
    start = ["--retrain_from", str(clean.checkpoint_path)]
    err = _fail(defend, [*common, *start, "--defense", "fine_pruning"], capsys)
    assert "--defense fine_pruning is not a data-level defense" in err
    err = _fail(defend, [*common, "--retrain_from", str(backdoor), "--defense", "no_mask"], capsys)
    assert "a backdoored or defended model" in err
    err = _fail(defend, [*common, "--retrain_from", str(tmp_path / "nope.pt"),
                         "--defense", "no_mask"], capsys)  # fmt: skip
    assert "--retrain_from" in err
    assert not runs.exists()
    # a learning rate too small to move a weight: what is saved is the model it started from
    defend.main([*common, *start, "--defense", "no_mask", "--learning_rate", "1e-12"])
    record = json.loads((runs / "retrain-no_mask-badnet" / DEFENSE_FILE).read_text())
    assert record["protocol"] == "retrain_from_clean"
    assert record["start_checkpoint"] == str(clean.checkpoint_path)
    assert record["backdoored_checkpoint"] == str(backdoor) and record["attack_seed"] == 0
    final = torch.load(record["checkpoint"], weights_only=True)["model_state_dict"]
    was_clean = torch.load(clean.checkpoint_path, weights_only=True)["model_state_dict"]
    was_backdoored = torch.load(backdoor, weights_only=True)["model_state_dict"]
    assert all(torch.allclose(final[k], v, atol=1e-6) for k, v in was_clean.items())
    assert any(not torch.allclose(final[k], v, atol=1e-6) for k, v in was_backdoored.items())
    config = json.loads((runs / "retrain-no_mask-badnet" / "config.json").read_text())
    assert config["retrain_from_sha256"] == file_digest(clean.checkpoint_path)
