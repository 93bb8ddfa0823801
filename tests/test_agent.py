"""The DQN agent: explicit hyperparameters, learning a toy task, seeding, save/load, cleaning."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from srd_fixtures import one_torch_thread  # noqa: F401 (autouse: one thread for small convs)
from stable_baselines3 import DQN

from srd.config import parse
from srd.defenses.srd.dqn import (
    REFERENCE_SCHEDULE,
    DQNConfig,
    agent_report,
    build_dqn,
    evaluate_greedy,
    greedy_actions,
    read_reward_log,
    run_random_policy,
    sb3_kwargs,
    schedule_name,
    schedule_of,
    train_dqn,
)
from srd.defenses.srd.env import EnvConfig, MaskPool, RedMaskEnv
from srd.defenses.srd.policy import (
    POLICY_META,
    choose_mask,
    draw_try_actions,
    load_policy,
    save_policy,
    select_mask,
)
from srd.defenses.srd.reward import RewardConfig
from srd.defenses.srd.vecenv import BatchedRedMaskVecEnv
from srd.errors import SRDError
from srd.geometry import IMAGE_SIZE, RED, decode_action

PATCH = (slice(30, 50), slice(30, 50))
OBS = 36  # the smallest input NatureCNN takes: keeps the toy DQN fast on a CPU


def make_pool(n: int = 4) -> MaskPool:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    images[(slice(None), *PATCH)] = 255
    return MaskPool(
        images, np.zeros(n), np.full(n, 0.4), ["clean."] * n, [f"i{k}" for k in range(n)]
    )


def caption_fn(images: list[np.ndarray]) -> list[str]:
    """Stand-in captioner: "clean." only when the toy trigger patch is fully painted red."""
    red = np.array(RED, dtype=np.uint8)
    return ["clean." if (im[PATCH] == red).all() else "banana." for im in images]


def score_fn(captions: list[str], references: list[str]) -> tuple[np.ndarray, np.ndarray]:
    same = np.array([c == r for c, r in zip(captions, references, strict=True)], dtype=float)
    return same, 0.4 + 0.6 * same  # covering the patch: ds 1, df 0.6 -> +3; otherwise -1


def covers_patch(action: int) -> bool:
    sq = decode_action(action)
    return (
        sq.top <= PATCH[0].start
        and sq.bottom >= PATCH[0].stop
        and (sq.left <= PATCH[1].start and sq.right >= PATCH[1].stop)
    )


ENV_KEYS = ("max_steps", "pool_order", "obs_size")
DQN_SCHEDULE = {k: v for k, v in REFERENCE_SCHEDULE.items() if k not in ENV_KEYS}
ENV_SCHEDULE = {k: REFERENCE_SCHEDULE[k] for k in ENV_KEYS}


def toy_cfg(**changes) -> DQNConfig:
    """The reference's schedule (one env, 10,000-step target interval ...) unless changed."""
    return dataclasses.replace(DQNConfig(device="cpu", seed=0, **DQN_SCHEDULE), **changes)


def toy_vec_env(num_envs: int = 1, **env) -> BatchedRedMaskVecEnv:
    env = {"max_steps": 150, "pool_order": "random", **env}  # the reference's episodes
    return BatchedRedMaskVecEnv(
        make_pool(), caption_fn, score_fn, num_envs=num_envs, obs_size=OBS, **env
    )


def test_every_sb3_parameter_is_set_explicitly() -> None:
    params = set(inspect.signature(DQN.__init__).parameters) - {"self", "env", "_init_setup_model"}
    kwargs = sb3_kwargs(DQNConfig())
    assert set(kwargs) == params
    # Reference values of the learner (§9.2 / §15 item 17).
    assert kwargs["learning_rate"] == 1e-4 and kwargs["batch_size"] == 32
    assert kwargs["gamma"] == 0.99 and kwargs["tau"] == 1.0
    assert kwargs["train_freq"] == (4, "step") and kwargs["max_grad_norm"] == 10
    assert kwargs["exploration_initial_eps"] == 1.0 and kwargs["exploration_final_eps"] == 0.05
    assert kwargs["policy_kwargs"]["net_arch"] == []
    assert sb3_kwargs(DQNConfig(num_envs=4), num_envs=4)["gradient_steps"] == 4
    # The run's schedule is ours; the reference's is one flag away (--reference_schedule).
    ours = DQNConfig()
    assert (ours.total_timesteps, ours.num_envs, ours.learning_starts) == (3000, 16, 500)
    assert (ours.target_update_interval, ours.exploration_fraction) == (500, 0.5)
    reference = toy_cfg()
    assert (reference.total_timesteps, reference.target_update_interval) == (10_000, 10_000)
    assert (reference.learning_starts, reference.exploration_fraction) == (100, 0.1)
    assert (REFERENCE_SCHEDULE["max_steps"], EnvConfig().max_steps) == (150, 5)


def test_a_run_is_named_by_its_schedule() -> None:
    ours, reference = (DQNConfig(), EnvConfig()), (toy_cfg(), EnvConfig(**ENV_SCHEDULE))
    assert schedule_name(*ours) == "ours" and schedule_name(*reference) == "reference"
    # One field off either schedule (the 84-px policy on the reference's run) is neither.
    assert schedule_name(toy_cfg(), EnvConfig(**{**ENV_SCHEDULE, "obs_size": 84})) == "custom"
    assert schedule_name(DQNConfig(num_envs=1), EnvConfig()) == "custom"
    # A D2 run's recorded config (agent reports written before schedules were named).
    record = {**dataclasses.asdict(DQNConfig()), **dataclasses.asdict(EnvConfig())}
    assert (
        schedule_of(record) == "ours"
        and schedule_of({**record, **REFERENCE_SCHEDULE}) == "reference"
    )


def test_configs_compose_into_one_command_line() -> None:
    classes = (DQNConfig, EnvConfig, RewardConfig)
    assert all(f.metadata["help"] for cls in classes for f in dataclasses.fields(cls))
    argv = ["--obs_size", "36", "--target_update_interval", "500", "--beta", "0.4"]
    dqn, env_cfg, reward = parse([*argv, "--no-scale_updates_with_envs"], *classes)
    assert (env_cfg.obs_size, env_cfg.max_steps, env_cfg.pool_order) == (36, 5, "shuffled")
    assert (dqn.target_update_interval, dqn.scale_updates_with_envs) == (500, False)
    assert (reward.alpha, reward.alpha2, reward.beta) == (0.1, 0.2, 0.4)


LEARN_STEPS = 1200


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> tuple[DQN, dict, Path]:
    """A toy DQN trained with the reference's schedule: model, summary, reward log."""
    path = tmp_path_factory.mktemp("learned") / "rewards.jsonl"
    model, summary = train_dqn(toy_vec_env(), toy_cfg(total_timesteps=LEARN_STEPS), path)
    return model, summary, path


def test_dqn_learns_to_cover_the_trigger(learned) -> None:
    steps = LEARN_STEPS
    model, _, log_path = learned
    step_log, episodes = read_reward_log(log_path)
    assert len(step_log) == steps and len(episodes) == steps // 150
    assert [e["length"] for e in episodes] == [150] * len(episodes)
    rewards = np.array([s["reward"] for s in step_log])
    # A random policy scores about -0.6 here (~10 % of the 500 squares cover the patch).
    assert rewards[:200].mean() < 1.0 < 2.0 < rewards[-300:].mean()
    greedy = greedy_actions(model, list(make_pool().images))
    assert all(covers_patch(int(a)) for a in greedy)
    assert model.observation_space.shape == (3, OBS, OBS)  # SB3 transposed HWC -> CHW


def test_seeded_training_repeats_and_updates_scale_with_envs(tmp_path: Path) -> None:
    def run(seed: int, name: str) -> tuple[list[tuple], DQN]:
        cfg = toy_cfg(total_timesteps=300, learning_starts=50, num_envs=2, seed=seed)
        model, _ = train_dqn(toy_vec_env(2), cfg, tmp_path / name)
        steps, _ = read_reward_log(tmp_path / name)
        return [(s["image_id"], s["action"], s["reward"]) for s in steps], model

    first, model_a = run(7, "a.jsonl")
    again, model_b = run(7, "b.jsonl")
    other, _ = run(8, "c.jsonl")
    assert first == again and first != other
    for p, q in zip(model_a.policy.parameters(), model_b.policy.parameters(), strict=True):
        assert torch.equal(p, q)
    # Two envs, gradient_steps scaled by 2: still ~one update per 4 transitions after warm-up.
    assert abs(model_a._n_updates - (300 - 50) / 4) <= 2


def test_short_run_ends_episodes_visits_the_pool_and_copies_the_target(tmp_path: Path) -> None:
    # Our schedule in small: 2 envs, 5-step episodes over the shuffled 4-image pool.
    cfg = toy_cfg(total_timesteps=400, num_envs=2, learning_starts=50, target_update_interval=100)
    model, summary = train_dqn(toy_vec_env(2, max_steps=5, pool_order="shuffled"), cfg,
                               tmp_path / "r.jsonl")  # fmt: skip
    steps, episodes = read_reward_log(tmp_path / "r.jsonl")
    assert summary["transitions"] == len(steps) == 400
    assert summary["episodes"] == len(episodes) == 400 // 5
    assert {e["length"] for e in episodes} == {5}
    assert {s["exploration_rate"] for s in steps[:50]} == {1.0}  # random until learning_starts
    # The shared shuffled deck: each pass over the pool shows every image once.
    first_pass = [e["image_id"] for e in sorted(episodes, key=lambda e: e["timestep"])][:4]
    assert sorted(first_pass) == [f"i{k}" for k in range(4)]
    assert summary["images_visited"] == 4
    # A copy every 100 transitions (50 vec steps): at 100, 200, 300, 400, all after updates.
    assert summary["target_updates"] == 4
    assert summary["gradient_updates"] == model._n_updates > 0
    for p, q in zip(model.q_net.parameters(), model.q_net_target.parameters(), strict=True):
        assert not torch.equal(p, q) or model._n_updates % 2 == 0  # target lags the net
    # The reference's schedule on the same budget: no episode ends, the target never moves.
    _, reference = train_dqn(toy_vec_env(2), toy_cfg(total_timesteps=200, num_envs=2),
                             tmp_path / "ref.jsonl")  # fmt: skip
    assert (reference["episodes"], reference["target_updates"]) == (0, 0)


def test_random_policy_steps_the_same_environment(tmp_path: Path) -> None:
    cfg = toy_cfg(total_timesteps=60, num_envs=2, learning_starts=10, seed=3)
    _, trained = train_dqn(toy_vec_env(2, max_steps=3, pool_order="shuffled"), cfg,
                           tmp_path / "t.jsonl")  # fmt: skip
    random = run_random_policy(toy_vec_env(2, max_steps=3, pool_order="shuffled"),
                               trained["transitions"], 3, tmp_path / "r.jsonl")  # fmt: skip
    t_steps, t_episodes = read_reward_log(tmp_path / "t.jsonl")
    r_steps, r_episodes = read_reward_log(tmp_path / "r.jsonl")
    # Same seed and flags: the same images in the same order, the same number of transitions.
    assert [s["image_id"] for s in r_steps] == [s["image_id"] for s in t_steps]
    # SB3 collects train_freq vec steps at a time: 64 transitions for 60 asked.
    assert random["transitions"] == trained["transitions"] == len(t_steps) == 64
    assert random["episodes"] == len(r_episodes) == len(t_episodes) == 20
    assert random["mean_reward"] == pytest.approx(np.mean([s["reward"] for s in r_steps]))
    # Its actions are seeded: a rerun repeats them, another seed does not.
    again = run_random_policy(toy_vec_env(2, max_steps=3), 64, 3, tmp_path / "r2.jsonl")
    other = run_random_policy(toy_vec_env(2, max_steps=3), 64, 4, tmp_path / "r3.jsonl")
    actions = [[s["action"] for s in read_reward_log(tmp_path / f)[0]]
               for f in ("r.jsonl", "r2.jsonl", "r3.jsonl")]  # fmt: skip
    assert actions[0] == actions[1] != actions[2]
    assert again == random and other["transitions"] == 64


def test_greedy_evaluation_and_report_against_random(learned, tmp_path: Path) -> None:
    model, trained, _ = learned
    envs = toy_vec_env(3).envs
    greedy = evaluate_greedy(model, envs)
    pool = make_pool()
    assert greedy["image_ids"] == pool.ids and greedy["images"] == len(pool)
    # Each reward is the one of the greedy action on that unmasked image.
    assert greedy["actions"] == [int(a) for a in greedy_actions(model, list(pool.images))]
    assert greedy["rewards"] == [3.0 if covers_patch(a) else -1.0 for a in greedy["actions"]]
    random = run_random_policy(toy_vec_env(), trained["transitions"], 0, tmp_path / "r.jsonl")
    report = agent_report(trained, random, greedy, len(pool))
    assert report["pool_images"] == 4 and report["training"]["transitions"] == 1200
    assert report["gain_over_random"] == pytest.approx(
        greedy["mean_reward"] - random["mean_reward"]
    )
    # The toy agent learned to cover the patch (+3) where random squares mostly miss (-1).
    assert report["beats_random"] and report["gain_over_random"] > 2
    assert report["greedy_policy"]["reward_counts"] == {"+3": 4}
    assert [r["image_id"] for r in report["greedy_policy"]["per_image"]] == pool.ids
    json.dumps(report)  # JSON-serialisable as written


def test_replay_bound_and_incompatible_options_are_refused() -> None:
    env = RedMaskEnv(make_pool(), caption_fn, score_fn, obs_size=IMAGE_SIZE)
    with pytest.raises(SRDError, match="--buffer_size 1000000.*301.* GB"):
        build_dqn(env, toy_cfg(buffer_size=1_000_000))
    with pytest.raises(SRDError, match="--optimize_memory_usage"):
        build_dqn(env, toy_cfg(optimize_memory_usage=True, bootstrap_at_time_limit=True))


def _small_model() -> tuple[DQN, DQNConfig]:
    cfg = toy_cfg(buffer_size=200)
    return build_dqn(RedMaskEnv(make_pool(), caption_fn, score_fn, obs_size=OBS), cfg), cfg


def test_save_and_load_policy_round_trip(tmp_path: Path) -> None:
    model, cfg = _small_model()
    path = save_policy(model, tmp_path / "policy", cfg, schedule="reference")
    assert path.name == "policy.zip"
    with zipfile.ZipFile(path) as archive:
        meta = json.loads(archive.read(POLICY_META))
    assert meta["num_actions"] == 500 and meta["obs_shape"] == [3, OBS, OBS]
    loaded = load_policy(tmp_path / "policy")  # the SB3 convention: ".zip" may be left out
    images = list(make_pool().images)
    np.testing.assert_array_equal(greedy_actions(loaded, images), greedy_actions(model, images))
    assert loaded.exploration_rate == 0.05 and loaded.schedule == "reference"


def test_identical_trainings_save_identical_policy_files(tmp_path: Path) -> None:
    """Issue 32 item 2: no wall-clock time and no memory address in the zip, so stamps see the
    same policy (across processes: tests/test_kill.py's D2 run compares two)."""
    paths = []
    for name in ("a", "b"):
        model, cfg = _small_model()
        model.learn(total_timesteps=12)
        paths.append(save_policy(model, tmp_path / name, cfg))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    with zipfile.ZipFile(paths[0]) as archive:
        data = archive.read("data").decode()
    assert " at 0x0>" in data and not re.search(r" at 0x[0-9a-f]*[1-9a-f]", data)
    again = DQN.load(paths[0], device="cpu")  # still a stable-baselines3 zip
    assert again.action_space.n == 500


def test_load_plain_sb3_zip(tmp_path: Path) -> None:
    model, _ = _small_model()
    model.save(tmp_path / "plain.zip")
    loaded = load_policy(tmp_path / "plain.zip")
    images = list(make_pool().images)
    np.testing.assert_array_equal(greedy_actions(loaded, images), greedy_actions(model, images))


def test_load_policy_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SRDError, match="missing.zip: policy file not found"):
        load_policy(tmp_path / "missing.zip")
    (tmp_path / "junk.zip").write_text("not a zip")
    with pytest.raises(SRDError, match="junk.zip: not a stable-baselines3"):
        load_policy(tmp_path / "junk.zip")
    model, cfg = _small_model()
    path = save_policy(model, tmp_path / "p500.zip", cfg)
    with pytest.raises(SRDError, match=r"p500.zip: policy has 500 actions, expected 400"):
        load_policy(path, expected_actions=400)


def test_policy_with_another_action_count_is_refused(tmp_path: Path) -> None:
    class TenActions(gym.Env):
        observation_space = gym.spaces.Box(0, 255, (OBS, OBS, 3), np.uint8)
        action_space = gym.spaces.Discrete(10)

    cfg = toy_cfg(buffer_size=10)
    path = save_policy(build_dqn(TenActions(), cfg), tmp_path / "ten.zip", cfg)
    with pytest.raises(SRDError, match="ten.zip: policy has 10 actions, expected 500"):
        load_policy(path)


# ----------------------------------------------------------------------------------------------
# The cleaning rule (reference §10 / B13)


def test_select_mask_keeps_the_best_positive_reward() -> None:
    choice = select_mask([5, 7, 9, 11, 13], {5: 1, 7: 2, 9: -1, 11: 1, 13: -2})
    assert (choice.action, choice.reward) == (7, 2)
    assert [a for a, _ in choice.tries] == [5, 7, 9, 11, 13]


def test_select_mask_stops_at_plus_three() -> None:
    choice = select_mask([5, 7, 9, 11, 13], {5: 1, 7: 3, 9: 3, 11: 1, 13: 2})
    assert (choice.action, choice.reward) == (7, 3)
    assert choice.tries == [(5, 1), (7, 3)]


def test_select_mask_keeps_the_last_try_when_none_is_positive() -> None:
    choice = select_mask([5, 7, 9], {5: 0, 7: -2, 9: -1})
    assert (choice.action, choice.reward) == (9, -1)
    assert len(choice.tries) == 3


def test_choose_mask_caches_repeated_actions() -> None:
    model, _ = _small_model()
    image = make_pool().images[0]
    greedy = int(greedy_actions(model, [image])[0])
    calls: list[list[int]] = []

    def try_fn(actions: list[int]) -> list[int]:
        calls.append(list(actions))
        return [-1 for _ in actions]

    # epsilon 0: five identical greedy tries, one evaluation, the last (= greedy) is kept.
    choice = choose_mask(model, image, try_fn, n_tries=5, epsilon=0.0, rng=np.random.default_rng(0))
    assert calls == [[greedy]] and choice.evaluated == [greedy]
    assert (choice.action, choice.reward, len(choice.tries)) == (greedy, -1, 5)

    # epsilon 1: random tries; each distinct action is evaluated once, in one call.
    calls.clear()
    rng = np.random.default_rng(3)
    choice = choose_mask(model, image, try_fn, n_tries=5, epsilon=1.0, rng=rng)
    tried = [a for a, _ in choice.tries]
    assert len(calls) == 1 and calls[0] == list(dict.fromkeys(tried))
    assert choice.action == tried[-1]


def test_choose_mask_stops_at_plus_three_and_repeats_with_the_seed() -> None:
    model, _ = _small_model()
    image = make_pool().images[1]

    def try_fn(actions: list[int]) -> list[int]:
        return [3 if covers_patch(a) else 1 for a in actions]

    def run(seed: int):
        return choose_mask(model, image, try_fn, epsilon=0.5, rng=np.random.default_rng(seed))

    assert run(4) == run(4)
    for seed in range(10):
        choice = run(seed)
        rewards = [r for _, r in choice.tries]
        assert 3 not in rewards[:-1]  # nothing is tried after a +3
        assert choice.reward == max(rewards)


def test_draw_try_actions_epsilon() -> None:
    rng = np.random.default_rng(0)
    tries = draw_try_actions(np.array([17] * 2000), n_tries=5, epsilon=0.05, rng=rng)
    assert tries.shape == (2000, 5)
    assert 0.03 < (tries != 17).mean() < 0.07
