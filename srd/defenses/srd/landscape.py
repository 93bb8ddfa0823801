"""How much the reward depends on the square at all: the reward landscape of a random policy.

A random policy's transitions (:func:`srd.defenses.srd.dqn.run_random_policy`) are uniform draws
of
squares on the pool images, so they show what there is to learn. :func:`reward_structure`
splits the reward's variance by pool image, square size and square centre (eta squared, the
share of the total sum of squares between groups, with the value expected from noise alone
beside it), and gives the mean reward of each square size and two ceilings: always the best
size, and the best of the squares tried on each image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from srd.defenses.coverage import table_reward
from srd.defenses.srd.reward import (
    BRANCH_REWARDS,
    REWARD_BRANCHES,
    RewardConfig,
    is_empty_caption,
    reward_branch_array,
)
from srd.geometry import GRID, MASK_SIZES


def eta_squared(rewards: np.ndarray, groups: Sequence[Any]) -> dict[str, float | int]:
    """Share of the rewards' sum of squares between ``groups`` (aligned with ``rewards``).

    ``null`` is its expected value when the groups do not matter, (k - 1) / (n - 1) for k
    groups and n rewards, so small groups (few draws per image) are not mistaken for signal.
    """
    r = np.asarray(rewards, dtype=np.float64)
    total = float(((r - r.mean()) ** 2).sum())
    keys, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    sums = np.bincount(inverse, weights=r)
    counts = np.bincount(inverse)
    between = float((counts * (sums / counts - r.mean()) ** 2).sum())
    return {
        "eta2": between / total if total > 0 else 0.0,
        "null": (len(keys) - 1) / max(len(r) - 1, 1),
        "groups": len(keys),
    }


def _group_means(
    steps: Sequence[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], Any]
) -> dict[Any, list[float]]:
    groups: dict[Any, list[float]] = {}
    for s in steps:
        groups.setdefault(key(s), []).append(table_reward(s))
    return groups


def reward_structure(steps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The reward landscape of transitions with uniformly random squares.

    ``steps``: step records of a reward log (``image_id``, ``action``, ``reward``; the
    reference table's ``table_reward`` where the log has it, so an area cost does not count).
    Returns the mean and standard deviation of the reward, eta squared by image / size / centre
    (and by centre within each square side: how much the square's position explains), the
    mean reward per square side, the share of images on which every square tried scored the
    same, and the ceilings ``best_size_mean`` and ``best_tried_per_image_mean``.
    """
    if not steps:
        raise ValueError("no transitions")
    rewards = np.array([table_reward(s) for s in steps])
    actions = [int(s["action"]) for s in steps]
    images = [str(s["image_id"]) for s in steps]
    sizes = [MASK_SIZES[a // (GRID * GRID)] for a in actions]
    centres = [a % (GRID * GRID) for a in actions]
    by_size = _group_means(steps, lambda s: MASK_SIZES[int(s["action"]) // (GRID * GRID)])
    by_image = _group_means(steps, lambda s: str(s["image_id"]))
    size_means = {str(k): float(np.mean(v)) for k, v in sorted(by_size.items())}
    repeated = [v for v in by_image.values() if len(v) > 1]
    return {
        "transitions": len(rewards),
        "mean_reward": float(rewards.mean()),
        "std_reward": float(rewards.std()),
        "eta2_image": eta_squared(rewards, images),
        "eta2_size": eta_squared(rewards, sizes),
        "eta2_centre": eta_squared(rewards, centres),
        "eta2_centre_by_size": {
            str(side): eta_squared(
                rewards[[k for k, x in enumerate(sizes) if x == side]],
                [c for c, x in zip(centres, sizes, strict=True) if x == side],
            )
            for side in sorted(set(sizes))
        },
        "mean_reward_by_size": size_means,
        "transitions_by_size": {str(k): len(v) for k, v in sorted(by_size.items())},
        "images": len(by_image),
        "images_with_one_reward": (
            float(np.mean([len(set(v)) == 1 for v in repeated])) if repeated else None
        ),
        "best_size_mean": max(size_means.values()),
        "best_tried_per_image_mean": float(np.mean([max(v) for v in by_image.values()])),
    }


def reward_branches(
    steps: Sequence[Mapping[str, Any]],
    baselines: Mapping[str, tuple[float, float]],
    config: RewardConfig,
) -> dict[str, Any]:
    """Which rows of the reward table a reward log's transitions fall into (issue: were alpha
    and beta, set for MiniLM + GPT-2-large, ever checked against our scorers?).

    ``steps``: step records (``image_id``, ``sem``, ``flu``, ``caption``, ``reward``);
    ``baselines``: ``{image_id: (S_sem, S_flu)}`` of the unmasked pool image. Returns the
    thresholds, each row's count and share (table order, with its reward), the quantiles of
    the two changes and whether every recomputed reward equals the logged one (a check that the
    table and the log agree)."""
    if not steps:
        raise ValueError("no transitions")
    missing = sorted({str(s["image_id"]) for s in steps} - set(baselines))
    if missing:
        raise ValueError(f"no pool baseline for image {missing[0]}")
    base = np.array([baselines[str(s["image_id"])] for s in steps], dtype=np.float64)
    d_sem = np.array([float(s["sem"]) for s in steps]) - base[:, 0]
    d_flu = np.array([float(s["flu"]) for s in steps]) - base[:, 1]
    empty = [is_empty_caption(str(s.get("caption", ""))) for s in steps]
    cfg = config
    branch = reward_branch_array(d_sem, d_flu, cfg.alpha, cfg.alpha2, cfg.beta, empty)
    counts = np.bincount(branch, minlength=len(REWARD_BRANCHES))
    logged = np.array([float(s["reward"]) for s in steps])

    def quantiles(x: np.ndarray) -> dict[str, float | None]:
        finite = x[np.isfinite(x)]
        if not len(finite):
            return dict.fromkeys(("p05", "p25", "p50", "p75", "p95"))
        q = np.quantile(finite, [0.05, 0.25, 0.5, 0.75, 0.95])
        return {k: float(v) for k, v in zip(("p05", "p25", "p50", "p75", "p95"), q, strict=True)}

    return {
        "transitions": len(steps),
        "thresholds": {"alpha": cfg.alpha, "alpha2": cfg.alpha2, "beta": cfg.beta},
        "branches": [
            {"branch": name, "reward": reward, "count": int(n), "share": float(n / len(steps))}
            for (name, reward), n in zip(REWARD_BRANCHES, counts, strict=True)
        ],
        "delta_sem": quantiles(d_sem),
        "delta_flu": quantiles(d_flu),
        "non_finite_delta_flu": int((~np.isfinite(d_flu)).sum()),
        "rewards_match_log": bool(np.array_equal(BRANCH_REWARDS[branch], logged)),
    }


def policy_reward_branches(
    reward_logs: Mapping[str, Sequence[Mapping[str, Any]]],
    ids: Sequence[str],
    base_sem: Sequence[float],
    base_flu: Sequence[float],
    config: RewardConfig,
) -> dict[str, Any]:
    """:func:`reward_branches` of each named reward log (``{"training": steps, "random_policy":
    steps}``) against one pool's baselines."""
    baselines = {
        str(i): (float(s), float(f)) for i, s, f in zip(ids, base_sem, base_flu, strict=True)
    }
    return {name: reward_branches(steps, baselines, config) for name, steps in reward_logs.items()}
