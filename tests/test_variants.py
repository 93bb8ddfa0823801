"""Our variants of SRD's agent (issue 30): the area cost and the occlusion-map channel."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from srd_fixtures import one_torch_thread  # noqa: F401 (autouse: one thread for small convs)

from srd.config import parse
from srd.defenses.srd.clean import PolicyTries
from srd.defenses.srd.dqn import DQNConfig, greedy_actions, train_dqn
from srd.defenses.srd.env import EnvConfig, MaskPool, RedMaskEnv
from srd.defenses.srd.landscape import reward_structure
from srd.defenses.srd.policy import load_policy, save_policy
from srd.defenses.srd.variants import (
    action_count,
    agent_variant,
    caption_change,
    occlude,
    occlusion_maps,
    square_share,
    variant_tags,
)
from srd.defenses.srd.vecenv import BatchedRedMaskVecEnv
from srd.errors import SRDError
from srd.geometry import GRID, IMAGE_SIZE, MASK_SIZES, RED, decode_action

OBS = 36
CORNERS = [(30, 30), (30, 174), (174, 30), (174, 174)]
"""Top-left pixel of each pool image's 20x20 toy trigger: one per quadrant (cell of a 2x2 grid)."""


def patch(k: int) -> tuple[slice, slice]:
    r, c = CORNERS[k % len(CORNERS)]
    return slice(r, r + 20), slice(c, c + 20)


def make_pool() -> MaskPool:
    """Four images, the trigger in another quadrant of each: a policy must look to cover it."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, (4, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for k in range(4):
        images[(k, *patch(k))] = 255
    return MaskPool(images, np.zeros(4), np.full(4, 0.4), ["clean."] * 4, list("abcd"))


def caption_fn(images: list[np.ndarray]) -> list[str]:
    """Stand-in backdoored captioner: "clean." once its image's white patch is all red."""
    red = np.array(RED, dtype=np.uint8)
    out = []
    for im in images:
        white = [k for k in range(4) if (im[patch(k)] == 255).all()]
        hidden = any((im[patch(k)] == red).all() for k in range(4))
        out.append("clean." if hidden and not white else "banana in the scene.")
    return out


def score_fn(captions: list[str], references: list[str]) -> tuple[np.ndarray, np.ndarray]:
    same = np.array([c == r for c, r in zip(captions, references, strict=True)], dtype=float)
    return same, 0.4 + 0.6 * same  # the trigger hidden: table reward +3; otherwise -1


def action(side: int, row: int, col: int) -> int:
    return MASK_SIZES.index(side) * GRID * GRID + row * GRID + col


def test_area_cost_takes_the_stated_share_off_the_table_reward() -> None:
    pool = make_pool()
    big, small = action(200, 5, 5), action(40, 1, 1)  # small covers image a's trigger
    sq = decode_action(big)
    assert square_share(big) == (sq.bottom - sq.top) * (sq.right - sq.left) / IMAGE_SIZE**2
    for cost in (0.0, 2.5):
        env = RedMaskEnv(pool, caption_fn, score_fn, obs_size=OBS, area_cost=cost)
        env.reset(options={"index": 0})
        _, reward, _, _, info = env.step(small)
        assert info["table_reward"] == 3
        assert reward == pytest.approx(3 - cost * 40 * 40 / IMAGE_SIZE**2)
        _, reward, _, _, info = env.step(big)
        assert info["table_reward"] == 3  # 200 px over the middle also hides a's trigger
        assert reward == pytest.approx(3 - cost * square_share(big))
    assert reward < 1.01  # at cost 2.5 the 200-px square (80% of the image) earns a third of +3


def test_landscape_reads_the_table_reward_not_the_cost() -> None:
    steps = [
        {"image_id": "a", "action": a, "reward": r - 9.0, "table_reward": r}
        for a, r in [(0, 3), (1, -1), (100, 3), (101, -1)]
    ]
    structure = reward_structure(steps)
    assert structure["mean_reward"] == 1.0
    assert structure["eta2_centre_by_size"]["20"]["eta2"] == 1.0  # position explains it all


def test_occlusion_map_is_zero_where_the_caption_does_not_change() -> None:
    pool = make_pool()
    maps = occlusion_maps(list(pool.images), caption_fn, grid=2)
    assert maps.shape == (4, 2, 2) and maps.dtype == np.float32
    for k in range(4):
        expected = np.zeros((2, 2), dtype=np.float32)
        expected[divmod(k, 2)] = caption_change("clean.", "banana in the scene.")
        assert np.array_equal(maps[k], expected)  # only the trigger's cell moves the caption
    assert caption_change("a b c", "a b c") == 0.0 and caption_change("a b", "c d") == 1.0
    assert caption_change("a b", "a c") == pytest.approx(2 / 3)
    occluded = occlude(pool.images[0], 2, 3)
    assert (occluded[112:, 112:] == RED).all() and (occluded[:112] == pool.images[0][:112]).all()


def test_observation_carries_the_map_and_a_map_policy_needs_maps(tmp_path: Path) -> None:
    pool = make_pool()
    maps = occlusion_maps(list(pool.images), caption_fn, grid=2)
    env = RedMaskEnv(pool, caption_fn, score_fn, obs_size=OBS, occlusion=maps)
    obs, _ = env.reset(options={"index": 3})
    assert obs.shape == (OBS, OBS, 4)
    assert obs[..., 3].max() == 255 and (obs[: OBS // 2, :, 3] == 0).all()  # trigger bottom-right
    with pytest.raises(SRDError, match="occlusion maps"):
        RedMaskEnv(pool, caption_fn, score_fn, obs_size=OBS, occlusion=maps[:2])
    cfg = dataclasses.replace(DQNConfig(device="cpu", seed=0), buffer_size=100, num_envs=1)
    vec = BatchedRedMaskVecEnv(pool, caption_fn, score_fn, obs_size=OBS, occlusion=maps)
    model, _ = train_dqn(vec, dataclasses.replace(cfg, total_timesteps=8), tmp_path / "r.jsonl")
    path = save_policy(model, tmp_path / "p.zip", cfg, {"occlusion_grid": 2, "area_cost": 1.0})
    loaded = load_policy(path)
    assert loaded.occlusion_grid == 2 and variant_tags(loaded.variant) == [
        "area cost 1",
        "occlusion map 2x2",
    ]
    with pytest.raises(SRDError, match="reads an occlusion map"):
        greedy_actions(loaded, list(pool.images))
    with pytest.raises(SRDError, match="reads an occlusion map"):
        PolicyTries(loaded, n_tries=1)([0], [pool.images[0]])
    assert greedy_actions(loaded, list(pool.images), list(maps)).shape == (4,)
    plain = save_policy(model, tmp_path / "q.zip", cfg)  # a map policy saved without its grid
    with pytest.raises(SRDError, match="does not fit the observation"):
        load_policy(plain)


def test_without_the_largest_squares_the_actions_keep_their_numbers(tmp_path: Path) -> None:
    pool = make_pool()
    env = RedMaskEnv(pool, caption_fn, score_fn, obs_size=OBS, max_square_side=80)
    assert env.action_space.n == 400 and action_count(200) == 500
    env.reset(options={"index": 0})
    _, _, _, _, info = env.step(action(40, 1, 1))  # the same square as in the 500 actions
    assert info["table_reward"] == 3
    with pytest.raises(ValueError, match=r"action 455 outside \[0, 400\)"):
        env.step(action(200, 5, 5))
    cfg = dataclasses.replace(DQNConfig(device="cpu", seed=0), buffer_size=100, num_envs=1)
    vec = BatchedRedMaskVecEnv(pool, caption_fn, score_fn, obs_size=OBS, max_square_side=80)
    model, _ = train_dqn(vec, dataclasses.replace(cfg, total_timesteps=8), tmp_path / "r.jsonl")
    path = save_policy(model, tmp_path / "p.zip", cfg, {"max_square_side": 80})
    loaded = load_policy(path)
    assert loaded.action_space.n == 400 and variant_tags(loaded.variant) == ["squares up to 80 px"]
    tries = PolicyTries(loaded, n_tries=50, epsilon=1.0)([0], [pool.images[0]])
    assert max(tries[0]) < 400  # D3's exploration stays in the variant's action space
    with pytest.raises(SRDError, match="policy has 400 actions, expected 500"):
        load_policy(save_policy(model, tmp_path / "q.zip", cfg))


def test_variant_flags_are_checked_and_recorded() -> None:
    for argv, flag in ((["--max_square_side", "100"], "--max_square_side"),
                       (["--occlusion_grid", "9"], "--occlusion_grid 9"),
                       (["--occlusion_grid", "1"], "--occlusion_grid 1"),
                       (["--area_cost", "-1"], "--area_cost -1")):  # fmt: skip
        with pytest.raises(SRDError, match=flag):
            parse(argv, EnvConfig)
    (env_cfg,) = parse(["--area_cost", "2", "--occlusion_grid", "4"], EnvConfig)
    assert agent_variant("data", env_cfg) == {
        "pool_source": "data",
        "area_cost": 2.0,
        "occlusion_grid": 4,
    }
    assert agent_variant("surrogate", EnvConfig()) == {}  # the reference's agent: no tag
    with pytest.raises(SRDError, match="--occlusion_grid 9"):
        occlusion_maps([make_pool().images[0]], caption_fn, grid=9)


def test_dqn_with_the_map_and_an_area_cost_learns_to_cover_each_images_trigger(
    tmp_path: Path,
) -> None:
    """The trigger sits in another quadrant of each image and one 200-px square would hide
    them all: with the area cost, only a policy that finds each image's trigger scores."""
    pool = make_pool()
    maps = occlusion_maps(list(pool.images), caption_fn, grid=2)
    vec = BatchedRedMaskVecEnv(
        pool, caption_fn, score_fn, num_envs=4, obs_size=OBS, seed=0, area_cost=4.0, occlusion=maps
    )  # our schedule (5-step episodes over the shuffled pool), 4 environments
    cfg = DQNConfig(device="cpu", seed=0, total_timesteps=3000, num_envs=4, buffer_size=3000)
    model, _ = train_dqn(vec, cfg, tmp_path / "rewards.jsonl")
    greedy = greedy_actions(model, list(pool.images), list(maps))
    for k, a in enumerate(greedy):
        sq, (rows, cols) = decode_action(int(a)), patch(k)
        covers = sq.top <= rows.start and sq.bottom >= rows.stop
        assert covers and sq.left <= cols.start and sq.right >= cols.stop, (k, sq)
        assert sq.bottom - sq.top < 200  # not the square that hides everything
