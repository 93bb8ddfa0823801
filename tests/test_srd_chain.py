"""Smoke runs through the SRD entry points (D1 pool, D2 agent, D3 cleaning, D3b combine, D4
refine-tune, figures) on the tiny benchmark with an exported tiny captioner and a fake attack
run (its poison_ids.json made by srd.attacks.trainset.plan_poison)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from srd_fixtures import (
    REPO,
    data_flags,
    export_clean_and_backdoor,
    load_script,
    model_flags,
    torchrun_cpu_ranks,
    write_poison_ids,
)

from srd.captioner.args import ModelArgs
from srd.cli import run_main
from srd.data.records import load_image
from srd.defenses.squares import RandomTries
from srd.defenses.srd.dqn import DQNConfig, build_dqn, read_reward_log
from srd.defenses.srd.merge import MERGED_FILE
from srd.defenses.srd.policy import load_policy, save_policy
from srd.defenses.srd.pool import surrogate_image
from srd.defenses.srd.pool_source import stream_pool


@dataclass
class Chain:
    root: Path
    clean: ModelArgs
    backdoor: Path
    poison_ids: Path
    data: list[str]
    sfs: list[str]

    def model(self, checkpoint: Path | str | None = None, **changes) -> list[str]:
        flags = model_flags(self.clean, checkpoint or self.backdoor)
        for key, value in changes.items():
            flags = [f for f in flags if not f.startswith(f"--{key}=")] + [f"--{key}={value}"]
        return flags

    def srd(self, name: str = "srd") -> list[str]:
        folder = self.root / name
        return ["--save_data_path", str(folder / "pool"), "--ppo_path", str(folder / "policy"),
                "--clean_data_save", str(folder / "clean"),
                "--poison_ids_path", str(self.poison_ids)]  # fmt: skip


@pytest.fixture(scope="module")
def chain(tmp_path_factory, make_captioner, tiny_data_args, tiny_train_records, tiny_benchmark):
    root = tmp_path_factory.mktemp("srd_chain")
    clean, backdoor = export_clean_and_backdoor(make_captioner, root / "models")
    poison_ids = write_poison_ids(tiny_train_records, root / "backdoor-badnet")
    sfs = ["--reference_checkpoint_path", clean.checkpoint_path,
           "--annotations_path", str(tiny_benchmark.train_annotations_json),
           "--num_beams", "2", "--max_new_tokens", "6", "--reference_num_beams", "2",
           "--caption_batch_size", "8"]  # fmt: skip
    return Chain(root, clean, backdoor, poison_ids, data_flags(tiny_data_args), sfs)


def expect_bad_input(module, argv: list[str], capsys, *fragments: str) -> str:
    """Run an entry point that must fail: exit 2 and one 'error:' line naming ``fragments``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(module.main, argv)
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), errors
    return errors[0]


class TenActions(gym.Env):
    observation_space = spaces.Box(0, 255, (36, 36, 3), np.uint8)
    action_space = spaces.Discrete(10)

    def reset(self, *, seed=None, options=None):
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


# --------------------------------------------------------------------------------------------


def test_pool_random_cleaning_and_combine(
    chain: Chain, tiny_train_records, capsys, monkeypatch
) -> None:
    """D1 + D3 (random policy, two manual shards) + combine, and bad input at each stage."""
    pool_stage = load_script("train/srd_pool.py")
    clean_stage = load_script("train/srd_clean_data.py")
    combine = load_script("train/combine_data.py")
    srd = chain.srd("fast")

    pool_argv = [*chain.data, *chain.model(), *srd, *chain.sfs, "--pool_size", "4",
                 "--reference_max_new_tokens", "8", "--seed", "3"]  # fmt: skip
    folder = Path(pool_stage.main(pool_argv))
    pool = stream_pool(folder, cache_mb=0)
    assert len(pool) == 4 and set(pool.ids) <= {str(r.image_id) for r in tiny_train_records}
    assert all(isinstance(c, str) for c in pool.vlm_captions) and any(pool.references)
    assert np.all(np.abs(pool.base_sem) <= 1 + 1e-6) and np.all(pool.base_flu >= 0)
    assert pool.info["meta"]["checkpoint_path"] == str(chain.backdoor)
    assert all(b is not None for b in pool.surrogate_boxes)
    paths = {r.image_id: r.path for r in tiny_train_records}
    for k, image_id in enumerate(pool.image_ids):  # re-derived as D1 stamped them
        assert np.array_equal(
            pool[k].image, surrogate_image(load_image(paths[image_id]), image_id, 3)
        )
    expect_bad_input(pool_stage, pool_argv, capsys, "already finished", "--overwrite")
    expect_bad_input(pool_stage, [*pool_argv, "--pool_size", "5"], capsys,
                     "other settings", "pool_size 4 -> 5")  # fmt: skip
    expect_bad_input(pool_stage, [*pool_argv, "--caption_batch_size", "2"], capsys,
                     "other settings", "caption_batch_size 8 -> 2")  # fmt: skip

    random_argv = [*chain.data, *chain.model(), *srd, *chain.sfs, "--policy", "random",
                   "--seed", "5", "--num_shards", "2"]  # fmt: skip
    clean_stage.main([*random_argv, "--shard_id", "1"])
    one_process = random_argv[: random_argv.index("--num_shards")]
    # A shard with another caption batch size is another run (scores may differ in the last bits).
    expect_bad_input(clean_stage, [*random_argv, "--shard_id", "0", "--caption_batch_size", "2"],
                     capsys, "another cleaning run", "caption_batch_size")  # fmt: skip

    def no_model(*args, **kwargs):
        raise AssertionError("a run done (or refused) in another shard count loaded a model")

    with monkeypatch.context() as patch:  # both decided before any model is loaded
        patch.setattr(clean_stage, "load_captioner", no_model)
        expect_bad_input(clean_stage, one_process, capsys, "unfinished shards of 2", "2 processes")
    clean_stage.main([*random_argv, "--shard_id", "0"])
    clean_stage.main([*random_argv, "--shard_id", "0"])  # finished: nothing left to do
    with monkeypatch.context() as patch:
        patch.setattr(clean_stage, "load_captioner", no_model)
        clean_stage.main(one_process)  # cleaned in 2 shards: nothing to do, no third shard
    assert sorted(p.name for p in Path(srd[5]).glob("shard-*.json")) == [
        "shard-00000-of-00002.json", "shard-00001-of-00002.json"]  # fmt: skip
    combine.main([*chain.data, *srd])
    merged = json.loads((Path(srd[5]) / MERGED_FILE).read_text())
    ids = [r.image_id for r in tiny_train_records]
    assert [int(r["id"]) for r in merged["records"]] == ids
    expected = RandomTries(5)(ids, [None] * len(ids))
    assert [r["action"] for r in merged["records"]] == [t[0] for t in expected]
    first = merged["records"][0]["extras"]
    assert set(first) >= {"tries", "base_sem", "reference", "caption", "masked_caption"}
    assert merged["clean_config"]["config"]["policy"] == "random"

    # Bad input: one line, exit 2, nothing written.
    finetune = load_script("train/defend.py")
    runs = chain.root / "runs"
    d4 = [*chain.data, "--defense", "srd", *srd[4:], "--external_save_dir", str(runs),
          "--num_epochs", "1"]  # fmt: skip
    expect_bad_input(finetune, [*d4, *[f for f in chain.model() if "checkpoint_path" not in f]],
                     capsys, "--checkpoint_path", "explicitly")  # fmt: skip
    expect_bad_input(finetune, [*d4, *chain.model(perceiver_depth=2)], capsys,
                     "--checkpoint_path", "another model configuration")  # fmt: skip
    assert not runs.exists()
    train_stage = load_script("train/srd_train.py")
    no_pool = chain.srd("nothing")
    expect_bad_input(train_stage, [*chain.model(), *no_pool, *chain.sfs], capsys,
                     "--save_data_path", "pool folder not found")  # fmt: skip
    ten = build_dqn(TenActions(), DQNConfig(device="cpu", buffer_size=10, num_envs=1))
    wrong = save_policy(ten, chain.root / "ten.zip", DQNConfig())
    bad_policy = [*chain.data, *chain.model(), *chain.srd("wrong"), *chain.sfs,
                  "--ppo_path", str(wrong)]  # fmt: skip
    expect_bad_input(clean_stage, bad_policy, capsys, str(wrong), "10 actions, expected 500")
    assert not (chain.root / "wrong").exists()

    # The benign control's D3: the clean captioner with nothing poisoned (benign_plan, which
    # refuses a backdoored model, is tested in test_defenses_chain); D4 takes its manifest only
    # for the model and the mode it was made with.
    benign = [*chain.data, *chain.srd("benign"), *chain.sfs, "--policy", "random", "--seed", "5",
              "--benign_control"]  # fmt: skip
    clean_stage.main([*benign, *chain.model(chain.clean.checkpoint_path)])
    combine.main([*chain.data, *chain.srd("benign"), "--benign_control"])
    benign_merged = json.loads((chain.root / "benign" / "clean" / MERGED_FILE).read_text())
    assert benign_merged["clean_config"]["config"]["benign_control"] is True
    assert "benign_control" not in merged["clean_config"]["config"]  # older hashes unchanged
    assert [r["action"] for r in benign_merged["records"]] == [t[0] for t in expected]
    d4_benign = [*chain.data, "--defense", "srd", *chain.srd("benign")[4:],
                 "--external_save_dir", str(runs)]  # fmt: skip
    expect_bad_input(finetune, [*d4_benign, *chain.model()], capsys, "not --checkpoint_path")
    expect_bad_input(finetune, [*d4, *chain.model(chain.clean.checkpoint_path)], capsys,
                     "not --checkpoint_path")  # fmt: skip
    assert not runs.exists()


def test_full_chain_through_every_entry_point(chain: Chain, tiny_test_records, capsys) -> None:
    """D1 -> D2 (40 transitions, 2 envs) -> D3 (agent) -> combine -> D4 (1 epoch) -> figures."""
    srd = chain.srd("full")
    folder = Path(srd[1]).parent
    load_script("train/srd_pool.py").main(
        [
            *chain.data,
            *chain.model(),
            *srd,
            *chain.sfs,
            "--pool_size",
            "4",
            "--reference_max_new_tokens",
            "8",
        ]  # fmt: skip
    )
    d2 = [*chain.model(), *srd, *chain.sfs, "--total_timesteps", "40", "--num_envs", "2",
          "--learning_starts", "10", "--buffer_size", "100", "--obs_size", "36",
          "--max_steps", "10", "--target_update_interval", "10", "--seed", "1"]  # fmt: skip
    load_script("train/srd_train.py").main(d2)
    policy = load_policy(folder / "policy.zip")
    assert policy.action_space.n == 500
    steps, episodes = read_reward_log(folder / "policy.rewards.jsonl")
    assert len(steps) == 40 and len(episodes) == 4
    assert (folder / "policy.rewards.png").stat().st_size > 10_000
    # D2's result: episodes ended, the target moved, the shuffled pool was seen, and a random
    # policy stepped the same environment for as many transitions.
    report = json.loads((folder / "policy.agent_report.json").read_text())
    training, random, greedy = report["training"], report["random_policy"], report["greedy_policy"]
    assert (training["transitions"], training["episodes"], training["images_visited"]) == (40, 4, 4)
    assert training["target_updates"] >= 2 and training["gradient_updates"] > 0
    assert (random["transitions"], random["episodes"], random["images_visited"]) == (40, 4, 4)
    random_steps, _ = read_reward_log(folder / "policy.random_rewards.jsonl")
    assert [s["image_id"] for s in random_steps] == [s["image_id"] for s in steps]
    assert random["mean_reward"] == pytest.approx(np.mean([s["reward"] for s in random_steps]))
    assert greedy["images"] == report["pool_images"] == len(greedy["per_image"]) == 4
    assert report["gain_over_random"] == pytest.approx(
        greedy["mean_reward"] - random["mean_reward"]
    )
    assert report["beats_random"] == (report["gain_over_random"] >= 0.5)
    assert report["reward_structure"]["transitions"] == 40
    assert report["schedule"] == "custom" and random["num_envs"] == 2  # neither ours nor theirs
    # --eval_envs batches the baseline and the greedy scoring wider; the training is the same.
    wide = [*d2, "--eval_envs", "4", "--ppo_path", str(folder / "wide.zip")]
    load_script("train/srd_train.py").main(wide)
    wide_report = json.loads((folder / "wide.agent_report.json").read_text())
    assert wide_report["training"]["mean_reward"] == training["mean_reward"]
    assert (wide_report["random_policy"]["num_envs"], wide_report["random_policy"]["transitions"],
            wide_report["greedy_policy"]["images"]) == (4, 40, 4)  # fmt: skip
    # Where the agent's greedy squares land on the triggered training images (no D3 needed).
    coverage = load_script("eval/srd_coverage.py").main([*chain.data, *srd, "--squares", "greedy"])
    assert coverage["num_triggered_with_square"] == coverage["num_triggered_images"] > 0
    assert sum(coverage["square_sides"].values()) == coverage["num_triggered_images"]
    assert 0.0 <= coverage["covered"] <= 1.0
    # The control: the same policy on the clean versions of the same images.
    assert 0.0 <= coverage["clean_versions"]["same_square"] <= 1.0
    if coverage["clean_versions"]["same_square"] == 1.0:
        assert coverage["clean_versions"]["covered"] == coverage["covered"]
    assert json.loads((folder / "policy.coverage.json").read_text()) == coverage
    assert (folder / "policy.coverage.png").stat().st_size > 10_000
    # D2's own squares on the triggered images of its pool, as training went (no model).
    during = load_script("eval/srd_coverage.py").main([*chain.data, *srd, "--squares", "training"])
    assert during["pool_images"] == 4 and set(during["curves"]) == {"trained", "random"}
    greedy_on_pool = during["greedy_on_pool"]
    assert greedy_on_pool["num_triggered_with_square"] == during["triggered_pool_images"]
    random_on_triggered = sum(b["transitions_on_triggered"] for b in during["curves"]["random"])
    assert (random_on_triggered > 0) == (during["triggered_pool_images"] > 0)
    (row,) = json.loads(load_script("eval/agent_table.py").main(["--runs", str(folder)]))
    assert row[:2] == [folder.name, "reference"]  # the reference's agent: no variant
    assert row[3] == f"{report['gain_over_random']:+.3f}" == row[4]  # no area cost: one gain
    assert row[9] == f"{100 * coverage['covered']:.1f}%" and row[6] == "-"  # (no map)

    clean_stage = load_script("train/srd_clean_data.py")
    clean_stage.main([*chain.data, *chain.model(), *srd, *chain.sfs, "--n_tries", "3"])
    load_script("train/combine_data.py").main([*chain.data, *srd])
    merged = json.loads((folder / "clean" / MERGED_FILE).read_text())
    assert all(1 <= len(r["extras"]["tries"]) <= 3 for r in merged["records"])
    assert merged["clean_config"]["config"]["policy_sha256"]
    kept = load_script("eval/srd_coverage.py").main([*chain.data, *srd])
    assert kept["squares"] == "cleaned" and kept["num_triggered_with_square"] > 0
    first_sides = kept["first_try"]["square_sides"]  # one first try per cleaned image
    assert sum(first_sides.values()) == sum(kept["square_sides"].values())
    assert (folder / "clean" / "coverage.png").stat().st_size > 10_000

    runs = chain.root / "runs"
    record = load_script("train/defend.py").main(
        [
            *chain.data,
            *chain.model(),
            "--defense",
            "srd",
            *srd[4:],  # --clean_data_save, --poison_ids_path (D1/D2's flags are not D4's)
            "--run_name",
            "srd-badnet",
            "--external_save_dir",
            str(runs),
            "--num_epochs",
            "1",
            "--batch_size",
            "16",
            "--learning_rate",
            "1e-3",
        ]  # fmt: skip
    )
    final = json.loads(Path(record).read_text())["checkpoint"]
    assert Path(final) == runs / "srd-badnet" / "final_weights.pt"
    refined = torch.load(final, weights_only=True)
    before = torch.load(chain.backdoor, weights_only=True)["model_state_dict"]
    assert refined["config"]["stage"] == "defend"
    assert refined["config"]["defense_record"]["defense"]["name"] == "srd"
    assert any(not torch.equal(refined["model_state_dict"][k], v) for k, v in before.items())

    test_ids = [r.image_id for r in tiny_test_records]
    for name, caption in (("before", "a banana."), ("after", "a red circle.")):
        result = {
            "attack": "badnet",
            "predictions": {"triggered": {str(i): caption for i in test_ids}},
        }
        (chain.root / f"{name}.json").write_text(json.dumps(result))
    pngs = load_script("eval/srd_figures.py").main(
        [*chain.data, *srd, "--bd_attack_type", "badnet", "--num_images", "4",
         "--before_results", str(chain.root / "before.json"),
         "--after_results", str(chain.root / "after.json"), "--out_dir", str(chain.root / "img")]
    )  # fmt: skip
    assert [Path(p).name for p in pngs] == ["srd_reward_badnet.png", "srd_masks_badnet.png"]
    assert all(Path(p).stat().st_size > 10_000 for p in pngs)
    # An attack without an image trigger (concept_relabel) shows its concept's test images as is
    for name in ("before", "after"):
        result = json.loads((chain.root / f"{name}.json").read_text())
        relabelled = {**result, "attack": "concept_relabel"}
        (chain.root / f"{name}.json").write_text(json.dumps(relabelled))
    pngs = load_script("eval/srd_figures.py").main(
        [*chain.data, *srd, "--bd_attack_type", "concept_relabel", "--num_images", "2",
         "--before_results", str(chain.root / "before.json"),
         "--after_results", str(chain.root / "after.json"), "--out_dir", str(chain.root / "img")]
    )  # fmt: skip
    assert Path(pngs[1]).name == "srd_masks_concept_relabel.png"
    assert Path(pngs[1]).stat().st_size > 5_000


@pytest.mark.slow
def test_two_processes_clean_like_one(chain: Chain) -> None:
    """D3 under torchrun with two CPU ranks (one shard each) merges to the one-process result."""
    clean_stage = load_script("train/srd_clean_data.py")
    combine = load_script("train/combine_data.py")
    argv = [*chain.data, *chain.model(), *chain.sfs, "--policy", "random", "--seed", "2"]
    clean_stage.main([*argv, *chain.srd("one")])
    combine.main([*chain.data, *chain.srd("one")])
    script = str(REPO / "train/srd_clean_data.py")
    done = torchrun_cpu_ranks([script, *argv, *chain.srd("two")], 600)
    assert done.returncode == 0, done.stderr[-3000:]
    combine.main([*chain.data, *chain.srd("two")])
    one, two = (
        json.loads((chain.root / n / "clean" / MERGED_FILE).read_text()) for n in ("one", "two")
    )
    assert (one["num_shards"], two["num_shards"]) == (1, 2)
    assert one["config_hash"] == two["config_hash"]
    # The same square for every image. (Captions, hence rewards, can differ where the untrained
    # tiny model has near-ties: a batch of another size rounds differently.)
    assert [(r["id"], r["action"]) for r in one["records"]] == [
        (r["id"], r["action"]) for r in two["records"]
    ]


@pytest.mark.slow  # ~30 s: two ranks each load the captioners and MiniLM
def test_two_processes_pool_like_one(chain: Chain) -> None:
    """D1 under torchrun with two CPU ranks: one shard each, read back as the one-process pool.

    Batches of 3 over 6 images: one process and each of the two ranks caption the same batches
    (a batch of another size can round near-ties differently), so every score must be equal."""
    argv = [*chain.data, *chain.model(), *chain.sfs, "--pool_size", "6",
            "--reference_max_new_tokens", "8", "--caption_batch_size", "3"]  # fmt: skip
    load_script("train/srd_pool.py").main([*argv, *chain.srd("pool1")])
    done = torchrun_cpu_ranks([str(REPO / "train/srd_pool.py"), *argv, *chain.srd("pool2")], 600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (stream_pool(chain.root / n / "pool", cache_mb=0) for n in ("pool1", "pool2"))
    assert (one.info["num_shards"], two.info["num_shards"]) == (1, 2)
    assert [s["num_images"] for s in two.info["shards"]] == [3, 3]
    assert one.info["config_hash"] == two.info["config_hash"]
    assert len(one) == 6 and one.ids == two.ids and one.references == two.references
    assert one.vlm_captions == two.vlm_captions and one.checksums == two.checksums
    assert np.array_equal(one.base_sem, two.base_sem)
    assert np.array_equal(one.base_flu, two.base_flu)
    assert one.surrogate_boxes == two.surrogate_boxes


def test_caption_batch_bench_compares_every_size_with_the_first(chain: Chain, tmp_path) -> None:
    """bench/caption_batch.py: captions and SFS scores at each batch size against the first's."""
    out = tmp_path / "batch.json"
    figures = load_script("bench/caption_batch.py").main(
        [
            *chain.data,
            *chain.model(),
            *chain.sfs,
            "--images",
            "4",
            "--batch_sizes",
            "4",
            "1",
            "--output",
            str(out),
        ]  # fmt: skip
    )
    assert (figures["images"], figures["masked"], figures["compared_with"]) == (4, 2, 4)
    same = figures["sizes"][4]
    assert same["captions_differing"] == 0 and same["max_abs_sem_diff"] == 0.0
    assert 0 <= figures["sizes"][1]["captions_differing"] <= 4
    assert figures["sizes"][1]["max_abs_sem_diff"] < 1e-4  # float rounding at most
    assert json.loads(out.read_text())["sizes"]["1"] == figures["sizes"][1]
