"""The red-mask environment: gymnasium/SB3 API, reference semantics, seeding, batching, memory."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.env_checker import check_env

from srd.defenses.srd.dqn import DQNConfig
from srd.defenses.srd.env import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_MAX_STEPS,
    DEFAULT_OBS_SIZE,
    ENV_ID,
    REFERENCE_MAX_STEPS,
    MaskPool,
    RedMaskEnv,
    captioner_caption_fn,
    replay_memory_bytes,
    sfs_score_fn,
    to_observation,
)
from srd.defenses.srd.vecenv import BatchedRedMaskVecEnv
from srd.errors import SRDError
from srd.geometry import IMAGE_SIZE, RED, apply_action, decode_action

PATCH = (slice(30, 50), slice(30, 50))
"""The toy "trigger": a white 20x20 patch; a caption is clean only when it is fully red."""


def make_pool(n: int = 5, seed: int = 0) -> MaskPool:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 200, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    images[(slice(None), *PATCH)] = 255
    return MaskPool(
        images=images,
        base_sem=np.zeros(n),
        base_flu=np.full(n, 0.4),
        references=["a clean scene."] * n,
        ids=[f"img{i}" for i in range(n)],
    )


class Recorder:
    """Stand-in captioner + scorer (cheap, deterministic) that records its batch sizes."""

    def __init__(self) -> None:
        self.caption_batches: list[int] = []
        self.score_batches: list[int] = []
        self.seen: list[np.ndarray] = []

    def caption(self, images: list[np.ndarray]) -> list[str]:
        self.caption_batches.append(len(images))
        self.seen.extend(images)
        red = np.array(RED, dtype=np.uint8)
        return ["a clean scene." if (im[PATCH] == red).all() else "a banana." for im in images]

    def score(self, captions: list[str], references: list[str]) -> tuple[np.ndarray, np.ndarray]:
        self.score_batches.append(len(captions))
        same = np.array([c == r for c, r in zip(captions, references, strict=True)], dtype=float)
        return same, 0.4 + 0.6 * same


def make_env(**kwargs) -> tuple[RedMaskEnv, Recorder]:
    rec = Recorder()
    return RedMaskEnv(make_pool(), rec.caption, rec.score, **kwargs), rec


def test_check_env_passes() -> None:
    for obs_size in (DEFAULT_OBS_SIZE, IMAGE_SIZE):
        env, _ = make_env(obs_size=obs_size)
        check_env(env, warn=True)


def test_gym_make_with_injected_callables() -> None:
    rec = Recorder()
    env = gym.make(ENV_ID, pool=make_pool(), caption_fn=rec.caption, score_fn=rec.score)
    obs, info = env.reset(seed=3)
    assert obs.shape == (DEFAULT_OBS_SIZE, DEFAULT_OBS_SIZE, 3) and obs.dtype == np.uint8
    assert env.action_space.n == 500
    _, reward, terminated, truncated, info = env.step(444)  # 200-px square over the patch
    assert (reward, terminated, truncated) == (3.0, False, False)
    assert info["caption"] == "a clean scene."


def test_masks_apply_to_the_original_image_and_do_not_accumulate() -> None:
    env, rec = make_env(obs_size=IMAGE_SIZE, render_mode="rgb_array")
    _, info = env.reset(seed=0)
    original = env.pool.images[info["pool_index"]]
    for action in (0, 347, 99):
        obs, *_ = env.step(action)
        expected = apply_action(original, action)
        np.testing.assert_array_equal(rec.seen[-1], expected)  # what the captioner saw
        np.testing.assert_array_equal(obs, expected)  # observation: only this step's square
        np.testing.assert_array_equal(env.render(), expected)
    # Action 347 -> size 80, centre (167, 100): rows 60-139, cols 127-206 (reference §14).
    assert decode_action(347) == (60, 140, 127, 207)


def test_step_info_and_reward_against_baselines() -> None:
    env, _ = make_env()
    env.reset(seed=1)
    _, reward, _, _, info = env.step(0)  # 20-px square at the top-left corner: patch visible
    assert info["caption"] == "a banana." and info["action"] == 0
    # sem 0 vs baseline 0 (ds 0), flu 0.4 vs 0.4 (df 0): the table's "otherwise" = -1.
    assert (info["sem"], info["flu"], info["reward"], reward) == (0.0, 0.4, -1, -1.0)
    assert info["image_id"] == env.pool.ids[info["pool_index"]] and info["step"] == 1


def test_empty_caption_rewards_zero() -> None:
    env = RedMaskEnv(make_pool(), lambda ims: [""] * len(ims), Recorder().score)
    env.reset(seed=0)
    assert env.step(444)[1] == 0.0


def test_episode_truncates_at_max_steps() -> None:
    env, _ = make_env(max_steps=4)
    env.reset(seed=0)
    flags = [env.step(1)[2:4] for _ in range(4)]
    assert flags == [(False, False)] * 3 + [(False, True)]


def test_default_episode_is_ours_and_the_reference_length_is_a_flag() -> None:
    for kwargs, length in (({}, DEFAULT_MAX_STEPS), ({"max_steps": REFERENCE_MAX_STEPS}, 150)):
        env, _ = make_env(**kwargs)
        env.reset(seed=0)
        truncated = [env.step(7)[3] for _ in range(length)]
        assert truncated.index(True) == length - 1
    assert DEFAULT_MAX_STEPS == 5


def test_shuffled_order_shows_every_image_once_per_pass() -> None:
    env, _ = make_env()
    first = env.reset(seed=3)[1]["pool_index"]
    drawn = [first] + [env.reset()[1]["pool_index"] for _ in range(9)]
    assert sorted(drawn[:5]) == sorted(drawn[5:]) == list(range(5))
    assert drawn[:5] != drawn[5:] or drawn[:5] != list(range(5))  # reshuffled, not cycled
    again, _ = make_env()
    assert [again.reset(seed=3)[1]["pool_index"]] + [
        again.reset()[1]["pool_index"] for _ in range(9)
    ] == drawn
    # The reference's order draws with replacement: 10 draws of 5 images repeat some.
    ref, _ = make_env(pool_order="random")
    draws = [ref.reset(seed=3)[1]["pool_index"]] + [ref.reset()[1]["pool_index"] for _ in range(4)]
    assert len(set(draws)) < 5
    with pytest.raises(SRDError, match="--pool_order"):
        make_env(pool_order="cycle")


def test_vec_env_deals_the_pool_from_one_shared_deck() -> None:
    rec = Recorder()
    vec = BatchedRedMaskVecEnv(make_pool(), rec.caption, rec.score, num_envs=2, max_steps=2, seed=4)
    vec.reset()
    images = [info["image_id"] for info in vec.reset_infos]
    for _ in range(8):  # 8 steps x 2 envs / 2-step episodes = 8 more episodes
        _, _, dones, _ = vec.step(np.array([1, 2]))
        images += [info["image_id"] for info, d in zip(vec.reset_infos, dones, strict=True) if d]
    # 10 episodes over 5 images: two passes, each a permutation of the pool.
    assert sorted(images[:5]) == sorted(images[5:]) == [f"img{i}" for i in range(5)]


def test_reset_seed_repeats_and_options_pick_an_image() -> None:
    def images_drawn(seed: int) -> list[int]:
        env, _ = make_env()
        first = env.reset(seed=seed)[1]["pool_index"]
        return [first] + [env.reset()[1]["pool_index"] for _ in range(9)]

    assert images_drawn(5) == images_drawn(5)
    assert images_drawn(5) != images_drawn(6)
    env, _ = make_env()
    assert env.reset(seed=0, options={"index": 3})[1]["image_id"] == "img3"


def test_seeded_runs_repeat() -> None:
    def run(seed: int) -> list[tuple]:
        env, _ = make_env(max_steps=5)
        env.reset(seed=seed)
        rng = np.random.default_rng(0)
        out = []
        for _ in range(12):
            obs, r, term, trunc, info = env.step(int(rng.integers(500)))
            out.append((obs.tobytes(), r, info["image_id"], info["caption"]))
            if term or trunc:
                env.reset()
        return out

    assert run(11) == run(11)


def _transition_key(obs, reward, done, info) -> tuple:
    info = {k: v for k, v in info.items() if k not in ("episode", "terminal_observation")}
    return obs.tobytes(), float(reward), bool(done), sorted(info.items())


def test_vec_env_equals_single_envs_with_the_same_seeds() -> None:
    n, seed, max_steps = 4, 100, 3
    rec = Recorder()
    order = {"max_steps": max_steps, "pool_order": "random"}  # each env draws its own images
    vec = BatchedRedMaskVecEnv(make_pool(), rec.caption, rec.score, num_envs=n, seed=seed, **order)
    singles = [RedMaskEnv(make_pool(), Recorder().caption, Recorder().score, **order)
               for _ in range(n)]  # fmt: skip
    vec_obs = vec.reset()
    for i, env in enumerate(singles):
        obs, _ = env.reset(seed=seed + i)
        np.testing.assert_array_equal(vec_obs[i], obs)
    rng = np.random.default_rng(0)
    for _ in range(2 * max_steps + 1):  # crosses two automatic resets
        actions = rng.integers(0, 500, size=n)
        v_obs, v_rew, v_done, v_infos = vec.step(actions)
        for i, env in enumerate(singles):
            obs, reward, terminated, truncated, info = env.step(actions[i])
            done = terminated or truncated
            info["TimeLimit.truncated"] = truncated and not terminated
            if done:
                np.testing.assert_array_equal(v_infos[i]["terminal_observation"], obs)
                assert v_infos[i]["episode"]["l"] == max_steps
                assert v_infos[i]["episode"]["r"] == pytest.approx(env.episode_return)
                obs, _ = env.reset()
            assert _transition_key(v_obs[i], v_rew[i], v_done[i], v_infos[i]) == _transition_key(
                obs, reward, done, info
            )
    # One batched caption call and one batched score call per step, N images each.
    assert rec.caption_batches == [n] * (2 * max_steps + 1)
    assert rec.score_batches == rec.caption_batches


def test_vec_env_seed_method_matches_constructor_seed() -> None:
    rec = Recorder()
    a = BatchedRedMaskVecEnv(make_pool(), rec.caption, rec.score, num_envs=3, seed=9)
    b = BatchedRedMaskVecEnv(make_pool(), rec.caption, rec.score, num_envs=3)
    b.seed(9)
    np.testing.assert_array_equal(a.reset(), b.reset())
    assert a.get_attr("obs_size") == [DEFAULT_OBS_SIZE] * 3


def test_pool_validation_names_the_source() -> None:
    pool = make_pool(3)
    with pytest.raises(SRDError, match="pool.npz: base_flu"):
        MaskPool(
            pool.images, pool.base_sem, pool.base_flu[:2], pool.references, pool.ids, "pool.npz"
        )
    with pytest.raises(SRDError, match="uint8"):
        MaskPool(pool.images[:, :100], pool.base_sem, pool.base_flu, pool.references, pool.ids)
    with pytest.raises(SRDError, match="not unique"):
        MaskPool(pool.images, pool.base_sem, pool.base_flu, pool.references, ["a", "a", "b"])


def test_observation_downscaling_keeps_the_mask_visible() -> None:
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    masked = apply_action(image, 0)  # smallest square, 20 px
    obs = to_observation(masked, DEFAULT_OBS_SIZE)
    assert obs.shape == (84, 84, 3)
    assert obs[..., 0].max() == 255  # some pixels stay pure red
    # Area averaging keeps the red share of the canvas.
    assert obs[..., 0].mean() / 255 == pytest.approx(masked[..., 0].mean() / 255, rel=0.1)
    full = to_observation(masked, IMAGE_SIZE)
    np.testing.assert_array_equal(full, masked)
    assert full is not masked


def test_replay_memory_figures() -> None:
    paper = (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert replay_memory_bytes(paper, 1_000_000) > 300e9  # SB3's default buffer: impossible
    assert replay_memory_bytes(paper, 10_000) == 10_000 * (2 * 150_528 + 20)  # 3.01 GB
    assert replay_memory_bytes(paper, 10_000, optimize_memory_usage=True) < 1.6e9
    assert replay_memory_bytes((84, 84, 3), DEFAULT_BUFFER_SIZE) < 0.43e9
    cfg = DQNConfig()
    assert cfg.buffer_size >= cfg.total_timesteps  # the reference's whole run fits
    assert replay_memory_bytes(paper, cfg.buffer_size) <= cfg.max_replay_gb * 1e9


@pytest.mark.parametrize(("num_envs", "optimize"), [(1, False), (3, False), (2, True)])
def test_replay_memory_matches_sb3_buffer(num_envs: int, optimize: bool) -> None:
    obs_space = gym.spaces.Box(0, 255, (40, 40, 3), np.uint8)
    buffer = ReplayBuffer(
        100,
        obs_space,
        gym.spaces.Discrete(500),
        n_envs=num_envs,
        optimize_memory_usage=optimize,
        handle_timeout_termination=not optimize,
    )
    arrays = [buffer.observations, buffer.actions, buffer.rewards, buffer.dones, buffer.timeouts]
    if not optimize:
        arrays.append(buffer.next_observations)
    assert sum(a.nbytes for a in arrays) == replay_memory_bytes(
        (40, 40, 3), 100, num_envs, optimize
    )


def test_with_the_real_tiny_captioner_and_sfs_scorer(make_captioner) -> None:
    """Integration: the environment drives the project's captioner and SFS scorer unchanged."""
    from srd.evaluation.fluency import NGramFluency
    from srd.evaluation.scorers import load_embedder
    from srd.evaluation.sfs import SFSScorer

    captioner = make_captioner(seed=0)
    refs = ["a red circle on a blue background.", "two green squares on grass."]
    scorer = SFSScorer(load_embedder(), NGramFluency.fit(refs * 3))
    caption_fn, score_fn = captioner_caption_fn(captioner), sfs_score_fn(scorer)
    pool = make_pool(3)
    sem, flu = score_fn(caption_fn(list(pool.images)), pool.references)
    pool = MaskPool(pool.images, sem, flu, pool.references, pool.ids)

    single = RedMaskEnv(pool, caption_fn, score_fn)
    check_env(single)
    vec = BatchedRedMaskVecEnv(pool, caption_fn, score_fn, num_envs=3, seed=0)
    vec.reset()
    _, rewards, _, infos = vec.step(np.array([0, 250, 499]))
    assert set(rewards.tolist()) <= {3.0, 2.0, 1.0, 0.0, -1.0, -2.0}
    for info in infos:
        assert isinstance(info["caption"], str) and np.isfinite(info["sem"])
