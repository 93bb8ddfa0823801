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
        groups.setdefault(key(s), []).append(float(s["reward"]))
    return groups


def reward_structure(steps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The reward landscape of transitions with uniformly random squares.

    ``steps``: step records of a reward log (``image_id``, ``action``, ``reward``). Returns
    the mean and standard deviation of the reward, eta squared by image / size / centre, the
    mean reward per square side, the share of images on which every square tried scored the
    same, and the ceilings ``best_size_mean`` and ``best_tried_per_image_mean``.
    """
    if not steps:
        raise ValueError("no transitions")
    rewards = np.array([float(s["reward"]) for s in steps])
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
        "mean_reward_by_size": size_means,
        "transitions_by_size": {str(k): len(v) for k, v in sorted(by_size.items())},
        "images": len(by_image),
        "images_with_one_reward": (
            float(np.mean([len(set(v)) == 1 for v in repeated])) if repeated else None
        ),
        "best_size_mean": max(size_means.values()),
        "best_tried_per_image_mean": float(np.mean([max(v) for v in by_image.values()])),
    }
