"""The reference reward table (reference §9.1), branch by branch, scalar and vectorised."""

from __future__ import annotations

import numpy as np
import pytest

from srd.defenses.srd.landscape import reward_branches
from srd.defenses.srd.reward import (
    BRANCH_REWARDS,
    REWARD_BRANCHES,
    RewardConfig,
    caption_rewards,
    reward_branch_array,
    reward_table,
    reward_table_array,
)

# (delta_sem, delta_flu, reward) with alpha=0.1, alpha2=0.2, beta=0.5; one row per table branch.
BRANCHES = [
    (0.2, 0.6, 3),  # ds >= a, df >= b
    (0.2, 0.3, 2),  # ds >= a, a <= df < b
    (0.2, -0.6, -2),  # ds >= a, df <= -b
    (0.2, -0.1, -1),  # ds >= a, -b < df < 0
    (0.2, 0.05, 1),  # ds >= a, 0 <= df < a
    (-0.3, 0.6, -2),  # ds < a, df >= b, ds <= -a2
    (-0.1, 0.6, 1),  # ds < a, df >= b, ds > -a2
    (-0.15, 0.2, -2),  # ds < a, df < b, ds <= -a
    (0.0, 0.2, -1),  # otherwise
]

# Values exactly on the thresholds: each comparison's direction as in the table.
BOUNDARIES = [
    (0.1, 0.5, 3),  # ds == a counts as a gain, df == b as big
    (0.1, 0.1, 2),  # df == a is the +2 band
    (0.1, -0.5, -2),  # df == -b is <= -b
    (0.1, 0.0, 1),  # df == 0 is the +1 band
    (0.09, 0.5, 1),  # just below a: no gain, fluency big, ds > -a2
    (-0.2, 0.5, -2),  # ds == -a2
    (-0.1, 0.49, -2),  # ds == -a, df < b
    (-0.09, 0.49, -1),
]


@pytest.mark.parametrize(("ds", "df", "expected"), BRANCHES + BOUNDARIES)
def test_table_branches(ds: float, df: float, expected: int) -> None:
    assert reward_table(ds, df) == expected
    assert reward_table_array([ds], [df]).tolist() == [expected]


def test_every_reward_value_is_reachable() -> None:
    assert {r for _, _, r in BRANCHES} == {3, 2, 1, -1, -2}


def test_empty_caption_gives_zero() -> None:
    assert reward_table(0.9, 0.9, empty=True) == 0
    rewards = reward_table_array([0.9, 0.9], [0.9, 0.9], empty=[True, False])
    assert rewards.tolist() == [0, 3]


def test_nan_deltas_fall_to_otherwise() -> None:
    assert reward_table(float("nan"), 0.9) == -1
    assert reward_table(0.5, float("nan")) == -1
    assert reward_table_array([np.nan, 0.5], [0.9, np.nan]).tolist() == [-1, -1]


def test_vectorised_matches_scalar_on_a_grid() -> None:
    values = np.round(np.arange(-0.8, 0.81, 0.05), 2)
    ds, df = (g.ravel() for g in np.meshgrid(values, values))
    vec = reward_table_array(ds, df)
    assert vec.dtype == np.int64
    assert vec.tolist() == [reward_table(a, b) for a, b in zip(ds, df, strict=True)]


def test_thresholds_come_from_the_config() -> None:
    cfg = RewardConfig(alpha=0.3, alpha2=0.2, beta=0.5)
    # ds = 0.2 is a gain with the default alpha but not with alpha = 0.3.
    assert reward_table(0.2, 0.6) == 3
    assert reward_table(0.2, 0.6, cfg.alpha, cfg.alpha2, cfg.beta) == 1


def test_caption_rewards_against_baselines() -> None:
    rewards = caption_rewards(
        ["a dog on grass.", "   ", "a cat."],
        sem=[0.8, 0.9, 0.4],
        flu=[1.2, 1.2, 0.5],
        base_sem=[0.6, 0.1, 0.6],
        base_flu=[0.6, 0.1, 0.5],
    )
    # 1st: ds 0.2, df 0.6 -> +3; 2nd: blank caption -> 0; 3rd: ds -0.2, df 0 -> -2.
    assert rewards.tolist() == [3, 0, -2]


def test_caption_rewards_rejects_misaligned_scores() -> None:
    with pytest.raises(ValueError, match="shapes"):
        caption_rewards(["a", "b"], [0.1], [0.1], [0.0, 0.0], [0.0, 0.0])


def test_every_table_row_is_named_and_reached_in_order() -> None:
    """reward_branch_array is the table's one source: each row's reward is the scalar table's,
    and a grid of changes reaches every row but the empty-caption one (reached by ``empty``)."""
    grid = np.linspace(-1.0, 1.0, 81)
    ds, df = (a.ravel() for a in np.meshgrid(grid, grid))
    branch = reward_branch_array(ds, df)
    expected = [reward_table(a, b) for a, b in zip(ds, df, strict=True)]
    np.testing.assert_array_equal(BRANCH_REWARDS[branch], expected)
    assert set(branch) == set(range(len(REWARD_BRANCHES) - 1))
    empty = reward_branch_array([0.5], [0.5], empty=[True])
    assert REWARD_BRANCHES[int(empty[0])] == ("empty caption", 0)


def test_reward_branches_of_a_reward_log() -> None:
    base = {"1": (0.5, 0.5), "2": (0.9, 0.2)}
    steps = [  # (image, sem, flu, caption): +3, -2 (semantic loss), -1 (otherwise), 0 (empty)
        {"image_id": 1, "sem": 0.7, "flu": 1.1, "caption": "a cat", "reward": 3},
        {"image_id": 2, "sem": 0.5, "flu": 0.2, "caption": "a dog", "reward": -2},
        {"image_id": 2, "sem": 0.9, "flu": 0.1, "caption": "a dog", "reward": -1},
        {"image_id": 1, "sem": 0.1, "flu": 0.1, "caption": "", "reward": 0},
    ]
    found = reward_branches(steps, base, RewardConfig())
    shares = {b["branch"]: b["share"] for b in found["branches"]}
    assert shares["d_sem >= alpha, d_flu >= beta"] == 0.25
    assert shares["d_sem < alpha, d_flu < beta, d_sem <= -alpha"] == 0.25
    assert shares["otherwise (-alpha < d_sem < alpha, d_flu < beta)"] == 0.25
    assert shares["empty caption"] == 0.25 and sum(shares.values()) == 1.0
    assert found["rewards_match_log"] and found["delta_sem"]["p50"] == pytest.approx(-0.2)
    steps[0]["reward"] = 2  # a log the table does not reproduce is flagged
    assert not reward_branches(steps, base, RewardConfig())["rewards_match_log"]
    strict = reward_branches(steps, base, RewardConfig(beta=0.7))  # other thresholds
    assert strict["branches"][0]["count"] == 0 and strict["thresholds"]["beta"] == 0.7
    with pytest.raises(ValueError, match="no pool baseline for image 3"):
        reward_branches([{**steps[0], "image_id": 3}], base, RewardConfig())
