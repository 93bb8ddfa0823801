"""Stage D3/D3b/D4 library: mask selection per chunk, seeded tries, resumable shards, merging."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from srd_fixtures import (
    ScriptedTries,
    StandInModels,
    data_flags,
    gray_images,
    load_script,
    painted_action,
    run_entry_point,
)

from srd.attacks.registry import build_attack
from srd.attacks.trainset import PoisonPlan, plan_attack, plan_poison
from srd.cli import run_main
from srd.defenses.squares import RandomTries
from srd.defenses.srd.clean import (
    PolicyTries,
    RewardModels,
    clean_chunk,
    clean_shard,
    prepare_clean_folder,
    resolve_shard,
)
from srd.defenses.srd.dqn import DQNConfig, build_dqn
from srd.defenses.srd.env import MaskPool, RedMaskEnv
from srd.defenses.srd.merge import (
    MERGED_FILE,
    combine_clean_data,
    masked_training_actions,
)
from srd.defenses.srd.shards import CLEAN_CONFIG, ShardWriter, config_hash, shard_indices
from srd.errors import SRDError
from srd.geometry import NUM_ACTIONS, apply_action

RUN = "random:0"
CONFIG = {"policy": "random", "seed": 0}
HASH = config_hash(CONFIG)


def models_of(stand_in: StandInModels) -> RewardModels:
    return RewardModels(stand_in.caption, stand_in.reference, stand_in.score)


def run_shard(folder, ids, shard_id=0, num_shards=1, stand_in=None, tries=None, chunk=2):
    """Clean the ids of one shard into ``folder`` with the stand-in models."""
    images = gray_images(ids)
    mine = [str(ids[i]) for i in shard_indices(len(ids), shard_id, num_shards)]
    prepare_clean_folder(folder, RUN, CONFIG)
    writer = ShardWriter(folder, RUN, HASH, shard_id, num_shards, mine)
    stand_in = stand_in or StandInModels(rewards={a: [3, 2, 1, -1, -2][a % 5] for a in range(500)})
    return clean_shard(
        writer, images.__getitem__, tries or RandomTries(0), models_of(stand_in), chunk, False
    )


def actions_by_id(merged: dict) -> dict[str, tuple[int, float]]:
    return {r["id"]: (r["action"], r["reward"]) for r in merged["records"]}


# --------------------------------------------------------------------------------------------
# Selection


def test_selection_through_the_chunked_path(tmp_path: Path) -> None:
    tries = {
        1: [10, 11, 12],  # +1, +3 (stop), +2 -> 11
        2: [20, 21, 22],  # -1, +2, +1 -> the best positive, 21
        3: [30, 31],  # -1, -2 -> none positive: the last, 31
        4: [40, 40, 40, 40, 40],  # the same greedy action 5 times: evaluated once
        5: [50, 51],  # -2, -1 -> the last, 51
    }
    rewards = {10: 1, 11: 3, 12: 2, 20: -1, 21: 2, 22: 1, 30: -1, 31: -2, 40: 1, 50: -2, 51: -1}
    stand_in = StandInModels(rewards)
    ids = list(tries)
    writer = ShardWriter(tmp_path, RUN, HASH, 0, 1, [str(i) for i in ids])
    images = gray_images(ids)
    manifest = clean_shard(
        writer, images.__getitem__, ScriptedTries(tries), models_of(stand_in), 2, False
    )
    records = {i: (a, r, e) for c in manifest["chunks"] for i, a, r, e in
               zip(c["ids"], c["actions"], c["rewards"], c["extras"], strict=True)}  # fmt: skip
    chosen = {int(i): (a, int(r)) for i, (a, r, _) in records.items()}
    assert chosen == {1: (11, 3), 2: (21, 2), 3: (31, -2), 4: (40, 1), 5: (51, -1)}
    assert records["1"][2]["tries"] == [[10, 1], [11, 3]]  # stopped at +3
    assert records["3"][2]["tries"] == [[30, -1], [31, -2]]
    assert records["1"][2]["caption"] == "plain" and records["1"][2]["masked_caption"] == "act 11"
    assert records["2"][2]["base_sem"] == 0.0 and records["2"][2]["reference"] == "reference"
    # Chunks of 2 images: one reference call, ONE caption call (unmasked + every distinct try)
    # and ONE score call per chunk.
    assert stand_in.reference_calls == [2, 2, 1]
    assert stand_in.caption_calls == [2 + 6, 2 + 3, 1 + 2]
    assert stand_in.score_calls == stand_in.caption_calls


def test_random_tries_are_seeded_per_image() -> None:
    ids = list(range(20))
    images = list(gray_images(ids).values())
    first = RandomTries(0)(ids, images)
    assert all(len(t) == 1 and 0 <= t[0] < NUM_ACTIONS for t in first)
    assert RandomTries(0)(ids, images) == first
    assert RandomTries(0)(ids[::-1], images[::-1]) == first[::-1]  # not by position
    assert RandomTries(1)(ids, images) != first
    chosen = clean_chunk(ids, images, RandomTries(0), models_of(StandInModels()))
    assert [c.action for c in chosen] == [t[0] for t in first]
    assert all(painted_action(apply_action(images[0], c.action)) is not None for c in chosen)


def test_policy_tries_are_greedy_plus_seeded_exploration() -> None:
    images = list(gray_images([1, 2, 3]).values())
    stand_in = StandInModels()
    pool = MaskPool(np.stack(images), np.zeros(3), np.zeros(3), ["r"] * 3, ["1", "2", "3"])
    env = RedMaskEnv(pool, stand_in.caption, stand_in.score, obs_size=36)
    policy = build_dqn(env, DQNConfig(device="cpu", buffer_size=10, seed=0, num_envs=1))
    greedy = PolicyTries(policy, n_tries=5, epsilon=0.0)([1, 2, 3], images)
    assert all(len(set(t)) == 1 and len(t) == 5 for t in greedy)
    explore = PolicyTries(policy, n_tries=5, epsilon=1.0, seed=4)
    assert explore([1, 2, 3], images) == explore([1, 2, 3], images)
    assert explore([1, 2, 3], images) != PolicyTries(policy, 5, 1.0, seed=5)([1, 2, 3], images)
    with pytest.raises(SRDError, match="--n_tries"):
        PolicyTries(policy, n_tries=0)
    with pytest.raises(SRDError, match="--epsilon"):
        PolicyTries(policy, epsilon=1.5)


# --------------------------------------------------------------------------------------------
# Shards: resume, sharding, merging


def test_interrupted_cleaning_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    ids = list(range(100, 111))
    run_shard(tmp_path / "whole", ids, chunk=3)
    whole = combine_clean_data(tmp_path / "whole", ids)

    folder = tmp_path / "killed"
    rewards = {a: [3, 2, 1, -1, -2][a % 5] for a in range(500)}
    with pytest.raises(KeyboardInterrupt):
        run_shard(folder, ids, stand_in=StandInModels(rewards, crash_after=2), chunk=3)
    manifest = json.loads((folder / "shard-00000-of-00001.json").read_text())
    assert not manifest["complete"] and sum(len(c["ids"]) for c in manifest["chunks"]) == 6
    with pytest.raises(SRDError, match="not finished"):
        combine_clean_data(folder, ids)
    again = StandInModels(rewards)
    run_shard(folder, ids, stand_in=again, chunk=3)
    assert again.reference_calls == [3, 2]  # only the 5 pending images were cleaned
    resumed = combine_clean_data(folder, ids)
    assert actions_by_id(resumed) == actions_by_id(whole)
    assert [r["id"] for r in resumed["records"]] == [str(i) for i in ids]


def test_two_shards_merge_to_the_one_shard_result(tmp_path: Path) -> None:
    ids = list(range(7, 20))
    run_shard(tmp_path / "one", ids)
    for shard in (1, 0):
        run_shard(tmp_path / "two", ids, shard_id=shard, num_shards=2)
    one = combine_clean_data(tmp_path / "one", ids)
    two = combine_clean_data(tmp_path / "two", ids)
    assert actions_by_id(one) == actions_by_id(two) and two["num_shards"] == 2
    written = json.loads((tmp_path / "two" / MERGED_FILE).read_text())
    assert written["clean_config"]["config"] == CONFIG and len(written["records"]) == len(ids)
    assert sum(written["reward_counts"].values()) == len(ids)


def test_another_run_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    """A folder holding another run's cleaned images is refused; another run's leftovers
    without a cleaned image (its config and an empty manifest: it failed before its first
    chunk) are replaced, so a re-run with corrected flags needs no new folder."""
    prepare_clean_folder(tmp_path, RUN, CONFIG)
    assert prepare_clean_folder(tmp_path, RUN, dict(CONFIG)) == HASH
    writer = ShardWriter(tmp_path, RUN, HASH, 0, 1, ["1", "2"])
    other = {**CONFIG, "seed": 1}
    digest = prepare_clean_folder(tmp_path, RUN, other)  # nothing cleaned yet: replaced
    assert digest != HASH and not writer.path.exists()
    saved = json.loads((tmp_path / CLEAN_CONFIG).read_text())
    assert saved["config_hash"] == digest
    writer = ShardWriter(tmp_path, RUN, digest, 0, 1, ["1"])
    writer.write_chunk(["1"], [0], [1.0], None)
    with pytest.raises(SRDError, match="holds another cleaning run \\(seed differ"):
        prepare_clean_folder(tmp_path, RUN, CONFIG)


def test_resolve_shard() -> None:
    assert resolve_shard(None, None, 1, 2) == (1, 2)
    assert resolve_shard(2, 3, 0, 1) == (2, 3)
    with pytest.raises(SRDError, match="together"):
        resolve_shard(1, None, 0, 1)
    with pytest.raises(SRDError, match="several processes"):
        resolve_shard(0, 2, 0, 2)


# --------------------------------------------------------------------------------------------
# The combine entry point on bad shard folders


def _partial_shards(folder: Path, assignments: list[list[int]], run: str = RUN) -> None:
    """Finished shards with the given ids (possibly overlapping or incomplete)."""
    config = {**CONFIG, "run": run}
    digest = prepare_clean_folder(folder, run, config)
    for k, ids in enumerate(assignments):
        writer = ShardWriter(folder, run, digest, k, len(assignments), [str(i) for i in ids])
        writer.write_chunk([str(i) for i in ids], [i % 500 for i in ids], [1.0] * len(ids))
        writer.finish()


def test_combine_entry_point_missing_image_exits_2(tmp_path: Path, tiny_data_args, capsys) -> None:
    ids = [r.image_id for r in tiny_data_args.split("train")]
    folder = tmp_path / "missing"
    _partial_shards(folder, [ids[:-1]])
    code, _, err = run_entry_point(
        "train/combine_data.py",
        [*data_flags(tiny_data_args), "--clean_data_save", str(folder)],
        capsys,
    )
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]
    assert str(ids[-1]) in lines[0] and not (folder / MERGED_FILE).exists()


def test_combine_entry_point_duplicates_and_mixed_runs_exit_2(
    tmp_path: Path, tiny_data_args, capsys: pytest.CaptureFixture
) -> None:
    module = load_script("train/combine_data.py")
    ids = [r.image_id for r in tiny_data_args.split("train")]
    _partial_shards(tmp_path / "dup", [ids[:13], ids[12:]])
    _partial_shards(tmp_path / "mixed", [ids[:12], ids[12:]])
    other = ShardWriter(tmp_path / "mixed", "dqn:other.zip", "0" * 16, 0, 3, ["1"])
    other.write_chunk(["1"], [3], [1.0])
    other.finish()
    (tmp_path / "ok").mkdir()
    _partial_shards(tmp_path / "ok", [ids[:5], ids[5:]])
    cases = {"dup": f"image id '{ids[12]}' appears twice", "mixed": "different runs"}
    for name, message in cases.items():
        with pytest.raises(SystemExit) as exc:
            run_main(module.main, [*data_flags(tiny_data_args), "--clean_data_save",
                                   str(tmp_path / name)])  # fmt: skip
        assert exc.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
        assert not (tmp_path / name / MERGED_FILE).exists()
    run_main(module.main, [*data_flags(tiny_data_args), "--clean_data_save", str(tmp_path / "ok")])
    merged = json.loads((tmp_path / "ok" / MERGED_FILE).read_text())
    assert [r["id"] for r in merged["records"]] == [str(i) for i in ids]
    assert (tmp_path / "ok" / CLEAN_CONFIG).is_file()


# --------------------------------------------------------------------------------------------
# The defender's data and D4's images


def test_plan_attack_rebuilds_the_recorded_attack(tmp_path: Path, tiny_train_records) -> None:
    plan = plan_poison(tiny_train_records, build_attack("badnet"), seed=0)
    plan.save(tmp_path / "poison_ids.json")
    loaded = PoisonPlan.load(tmp_path / "poison_ids.json")
    assert plan_attack(loaded, "p.json").to_dict() == build_attack("badnet").to_dict()
    loaded.meta["attack"]["trigger_sha256"] = "0" * 16
    with pytest.raises(SRDError, match="p.json: the recorded attack cannot be rebuilt.*sha256"):
        plan_attack(loaded, "p.json")
    with pytest.raises(SRDError, match="no attack config"):
        plan_attack(dataclasses.replace(loaded, meta={}), "p.json")


def test_masked_training_actions_cover_every_training_image(tiny_train_records) -> None:
    """D4's squares (one per image id, from the merged manifest); the srd defense paints them
    on the defender's version of each image (tests/test_defenses.py)."""
    ids = [r.image_id for r in tiny_train_records]
    merged = {"records": [{"id": str(i), "action": (7 * i) % 500} for i in ids]}
    assert masked_training_actions(tiny_train_records, merged) == {i: (7 * i) % 500 for i in ids}
    with pytest.raises(SRDError, match="merged.json: does not cover the training images"):
        masked_training_actions(
            tiny_train_records, {"records": merged["records"][1:]}, "merged.json"
        )


def test_trigger_coverage_of_badnet_patch() -> None:
    """A 40-px square centred on the bottom-right patch covers it; a top-left one does not."""
    from srd.attacks.registry import build_attack
    from srd.defenses.coverage import covered_share, trigger_box, trigger_coverage
    from srd.geometry import GRID, decode_action

    attack = build_attack("badnet")
    box = trigger_box(attack)
    assert tuple(box) == (203, 224, 203, 224)
    corner = 1 * GRID * GRID + 9 * GRID + 9  # size index 1 (40 px), centre (212, 212)
    assert covered_share(decode_action(corner), box) == 1.0
    assert covered_share(decode_action(0), box) == 0.0
    merged = {"records": [{"id": "1", "action": corner}, {"id": "2", "action": 0}]}
    report = trigger_coverage(merged, attack, triggered_ids={1, 2})
    assert report["covered"] == 0.5
    assert report["square_sides"] == {"20": 1, "40": 1}
    assert trigger_box(build_attack("blended")) is None


def test_training_coverage_bins_the_squares_on_triggered_pool_images() -> None:
    from srd.attacks.registry import build_attack
    from srd.defenses.coverage import covering_signal, map_localisation, training_coverage
    from srd.geometry import GRID

    corner = 1 * GRID * GRID + 9 * GRID + 9  # covers the BadNet patch
    steps = [
        {"timestep": t, "image_id": i, "action": a, "reward": r, "table_reward": r}
        for t, i, a, r in [(1, 1, 0, -1), (2, 2, corner, 3), (3, 1, corner, 3), (4, 3, 0, -2)]
    ]
    bins = training_coverage(steps, build_attack("badnet"), {1, 2}, bin_size=2)
    assert [b["timesteps"] for b in bins] == [[1, 2], [3, 4]]
    assert [b["transitions_on_triggered"] for b in bins] == [2, 1]  # image 3 is not triggered
    assert [b["covered"] for b in bins] == [0.5, 1.0]
    assert [b["mean_table_reward"] for b in bins] == [1.0, 3.0]
    assert training_coverage(steps, build_attack("blended"), {1, 2}) == []
    maps = {"1": [[0, 0], [0, 0.9]], "2": [[0.5, 0], [0, 0.1]], "3": [[0.2, 0.2], [0.2, 0.2]]}
    where = map_localisation(maps, build_attack("badnet"), {1, 2})  # trigger: bottom-right cell
    assert (where["grid"], where["trigger_cell"]) == (2, 3)
    assert where["triggered"]["largest_is_trigger_cell"] == 0.5
    assert where["triggered"]["trigger_cell_mean"] == pytest.approx(0.5)
    assert where["clean"]["images"] == 1
    assert where["clean"]["other_cells_mean"] == pytest.approx(0.2)
    signal = covering_signal(steps, build_attack("badnet"), {1, 2})
    assert (signal["on_triggered_images"], signal["covering"]) == (3, 2)
    assert signal["mean_table_reward_covering"] == 3.0
    assert signal["mean_table_reward_not_covering"] == -1.0
