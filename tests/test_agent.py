"""The DQN agent: explicit hyperparameters, learning a toy task, seeding, save/load, cleaning."""

from __future__ import annotations

import dataclasses
import inspect
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import DQN

from srd.config import parse
from srd.errors import SRDError
from srd.geometry import IMAGE_SIZE, RED, decode_action
from srd.rl.agent import (
    POLICY_META,
    DQNConfig,
    build_dqn,
    choose_mask,
    draw_try_actions,
    greedy_actions,
    load_policy,
    read_reward_log,
    save_policy,
    sb3_kwargs,
    select_mask,
    train_dqn,
)
from srd.rl.env import BatchedRedMaskVecEnv, EnvConfig, MaskPool, RedMaskEnv
from srd.rl.reward import RewardConfig

PATCH = (slice(30, 50), slice(30, 50))
OBS = 36  # the smallest input NatureCNN takes: keeps the toy DQN fast on a CPU


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    # Small convolutions on a shared 2-core machine are much faster single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def toy_cfg(**changes) -> DQNConfig:
    return dataclasses.replace(DQNConfig(device="cpu", seed=0), **changes)


def toy_vec_env(num_envs: int = 1) -> BatchedRedMaskVecEnv:
    return BatchedRedMaskVecEnv(make_pool(), caption_fn, score_fn, num_envs=num_envs, obs_size=OBS)


def test_every_sb3_parameter_is_set_explicitly() -> None:
    params = set(inspect.signature(DQN.__init__).parameters) - {"self", "env", "_init_setup_model"}
    kwargs = sb3_kwargs(DQNConfig())
    assert set(kwargs) == params
    # Reference values (§9.2 / §15 item 17).
    assert kwargs["learning_rate"] == 1e-4 and kwargs["learning_starts"] == 100
    assert kwargs["batch_size"] == 32 and kwargs["gamma"] == 0.99 and kwargs["tau"] == 1.0
    assert kwargs["train_freq"] == (4, "step") and kwargs["gradient_steps"] == 1
    assert kwargs["target_update_interval"] == 10_000 and kwargs["max_grad_norm"] == 10
    assert (kwargs["exploration_fraction"], kwargs["exploration_initial_eps"]) == (0.1, 1.0)
    assert kwargs["exploration_final_eps"] == 0.05 and DQNConfig().total_timesteps == 10_000
    assert kwargs["policy_kwargs"]["net_arch"] == []
    assert sb3_kwargs(DQNConfig(num_envs=4), num_envs=4)["gradient_steps"] == 4


def test_configs_compose_into_one_command_line() -> None:
    classes = (DQNConfig, EnvConfig, RewardConfig)
    assert all(f.metadata["help"] for cls in classes for f in dataclasses.fields(cls))
    argv = ["--obs_size", "36", "--target_update_interval", "500", "--beta", "0.4"]
    dqn, env_cfg, reward = parse([*argv, "--no-scale_updates_with_envs"], *classes)
    assert (env_cfg.obs_size, env_cfg.max_steps) == (36, 150)
    assert (dqn.target_update_interval, dqn.scale_updates_with_envs) == (500, False)
    assert (reward.alpha, reward.alpha2, reward.beta) == (0.1, 0.2, 0.4)


def test_dqn_learns_to_cover_the_trigger(tmp_path: Path) -> None:
    steps = 1200
    model = train_dqn(toy_vec_env(), toy_cfg(total_timesteps=steps), tmp_path / "rewards.jsonl")
    step_log, episodes = read_reward_log(tmp_path / "rewards.jsonl")
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
        model = train_dqn(toy_vec_env(2), cfg, tmp_path / name)
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
    path = save_policy(model, tmp_path / "policy", cfg)
    assert path.name == "policy.zip"
    with zipfile.ZipFile(path) as archive:
        meta = json.loads(archive.read(POLICY_META))
    assert meta["num_actions"] == 500 and meta["obs_shape"] == [3, OBS, OBS]
    loaded = load_policy(tmp_path / "policy")  # the SB3 convention: ".zip" may be left out
    images = list(make_pool().images)
    np.testing.assert_array_equal(greedy_actions(loaded, images), greedy_actions(model, images))
    assert loaded.exploration_rate == 0.05


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
