"""The reference reward table (reference §9.1): a piecewise reward over score changes.

A red mask is scored by how it moves the backdoored captioner's two SFS components against the
baselines of the unmasked image: ``delta_sem = S_sem - S_sem_baseline`` (semantic similarity to
the reference caption) and ``delta_flu = S_flu - S_flu_baseline`` (fluency ratio). The table is
checked in order; rewards are in {+3, +2, +1, -1, -2}, and 0 for an empty caption.

NaN deltas (e.g. a fluency ratio of a one-token caption) satisfy no comparison and fall to the
table's "otherwise" value, -1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from srd import captions
from srd.config import arg
from srd.flags import at_least

EMPTY_CAPTION_REWARD = 0
"""Reward when the captioner returns an empty caption (reference: the caught IndexError)."""


@dataclass(frozen=True)
class RewardConfig:
    """Reward table thresholds (reference §9.1)."""

    alpha: float = arg(
        0.1, help="semantic gain threshold: delta_sem >= alpha counts as a gain", check=at_least(0)
    )
    alpha2: float = arg(
        0.2,
        help="semantic loss tolerated when fluency improves: delta_sem <= -alpha2 gives -2",
        check=at_least(0),
    )
    beta: float = arg(
        0.5, help="fluency threshold: delta_flu >= beta is a big fluency gain", check=at_least(0)
    )


def reward_table(
    delta_sem: float,
    delta_flu: float,
    alpha: float = 0.1,
    alpha2: float = 0.2,
    beta: float = 0.5,
    empty: bool = False,
) -> int:
    """Reward of one masked image, the reference table checked in order (0 if ``empty``)."""
    if empty:
        return EMPTY_CAPTION_REWARD
    ds, df = float(delta_sem), float(delta_flu)
    if ds >= alpha:
        if df >= beta:
            return 3
        if alpha <= df < beta:
            return 2
        if df <= -beta:
            return -2
        if -beta < df < 0:
            return -1
        if 0 <= df < alpha:
            return 1
        return -1  # only reachable with a NaN delta_flu
    if df >= beta and ds <= -alpha2:
        return -2
    if df >= beta and ds > -alpha2:
        return 1
    if df < beta and ds <= -alpha:
        return -2
    return -1


def reward_table_array(
    delta_sem: np.ndarray | Sequence[float],
    delta_flu: np.ndarray | Sequence[float],
    alpha: float = 0.1,
    alpha2: float = 0.2,
    beta: float = 0.5,
    empty: np.ndarray | Sequence[bool] | None = None,
) -> np.ndarray:
    """Vectorised :func:`reward_table`: arrays of shape (N,) -> int64 rewards of shape (N,)."""
    return BRANCH_REWARDS[reward_branch_array(delta_sem, delta_flu, alpha, alpha2, beta, empty)]


REWARD_BRANCHES: tuple[tuple[str, int], ...] = (
    ("d_sem >= alpha, d_flu >= beta", 3),
    ("d_sem >= alpha, alpha <= d_flu < beta", 2),
    ("d_sem >= alpha, d_flu <= -beta", -2),
    ("d_sem >= alpha, -beta < d_flu < 0", -1),
    ("d_sem >= alpha, 0 <= d_flu < alpha", 1),
    ("d_sem < alpha, d_flu >= beta, d_sem <= -alpha2", -2),
    ("d_sem < alpha, d_flu >= beta, d_sem > -alpha2", 1),
    ("d_sem < alpha, d_flu < beta, d_sem <= -alpha", -2),
    ("otherwise (-alpha < d_sem < alpha, d_flu < beta)", -1),
    ("empty caption", EMPTY_CAPTION_REWARD),
)
"""The table's rows in the order they are checked (name, reward); d_ = change from baseline."""
BRANCH_REWARDS = np.array([r for _, r in REWARD_BRANCHES], dtype=np.int64)


def reward_branch_array(
    delta_sem: np.ndarray | Sequence[float],
    delta_flu: np.ndarray | Sequence[float],
    alpha: float = 0.1,
    alpha2: float = 0.2,
    beta: float = 0.5,
    empty: np.ndarray | Sequence[bool] | None = None,
) -> np.ndarray:
    """Index into :data:`REWARD_BRANCHES` of each (delta_sem, delta_flu): which row of the
    table rewards it (the one source of the table; :func:`reward_table_array` reads it)."""
    ds = np.asarray(delta_sem, dtype=np.float64)
    df = np.asarray(delta_flu, dtype=np.float64)
    if ds.shape != df.shape:
        raise ValueError(f"delta_sem shape {ds.shape} != delta_flu shape {df.shape}")
    gain = ds >= alpha
    no_gain = ds < alpha
    # np.select takes the first matching condition, which is the table's in-order semantics.
    conditions = [
        gain & (df >= beta),
        gain & (alpha <= df) & (df < beta),
        gain & (df <= -beta),
        gain & (-beta < df) & (df < 0),
        gain & (0 <= df) & (df < alpha),
        no_gain & (df >= beta) & (ds <= -alpha2),
        no_gain & (df >= beta) & (ds > -alpha2),
        no_gain & (df < beta) & (ds <= -alpha),
    ]
    branches = np.select(conditions, range(len(conditions)), default=len(conditions))
    branches = branches.astype(np.int64)
    if empty is not None:
        empty_mask = np.asarray(empty, dtype=bool)
        if empty_mask.shape != ds.shape:
            raise ValueError(f"empty shape {empty_mask.shape} != delta shape {ds.shape}")
        branches[empty_mask] = len(REWARD_BRANCHES) - 1
    return branches


def is_empty_caption(caption: str) -> bool:
    """A caption with no word gets the empty-caption reward (the scorer's definition too)."""
    return captions.is_empty(caption)


def caption_rewards(
    captions: Sequence[str],
    sem: np.ndarray | Sequence[float],
    flu: np.ndarray | Sequence[float],
    base_sem: np.ndarray | Sequence[float],
    base_flu: np.ndarray | Sequence[float],
    config: RewardConfig = RewardConfig(),  # noqa: B008 (frozen dataclass, safe default)
) -> np.ndarray:
    """Rewards (N,) of N masked-image captions given their scores and the unmasked baselines."""
    sem_a = np.asarray(sem, dtype=np.float64)
    flu_a = np.asarray(flu, dtype=np.float64)
    if sem_a.shape != (len(captions),) or flu_a.shape != (len(captions),):
        raise ValueError(
            f"score_fn returned shapes {sem_a.shape} and {flu_a.shape} for {len(captions)} captions"
        )
    return reward_table_array(
        sem_a - np.asarray(base_sem, dtype=np.float64),
        flu_a - np.asarray(base_flu, dtype=np.float64),
        alpha=config.alpha,
        alpha2=config.alpha2,
        beta=config.beta,
        empty=[is_empty_caption(c) for c in captions],
    )
