"""The reward landscape of a random policy: variance shares and ceilings on hand-made logs."""

from __future__ import annotations

import pytest

from srd.defenses.srd.landscape import eta_squared, reward_structure
from srd.geometry import GRID

SIZE = GRID * GRID  # actions per square size


def test_eta_squared_on_hand_made_groups() -> None:
    rewards = [1.0, 1.0, 3.0, 3.0]
    assert eta_squared(rewards, ["a", "a", "b", "b"])["eta2"] == 1.0
    assert eta_squared(rewards, ["a", "b", "a", "b"])["eta2"] == 0.0
    split = eta_squared([-1.0, -2.0, -1.0, -1.0], [0, 0, 1, 1])
    # mean -1.25; group means -1.5, -1; SS_between 2*0.0625*2 = 0.25 of SS_total 0.75
    assert split["eta2"] == pytest.approx(1 / 3)
    assert (split["null"], split["groups"]) == (pytest.approx(1 / 3), 2)
    assert eta_squared([-1.0, -1.0], ["a", "b"])["eta2"] == 0.0  # no variance at all


def test_reward_structure_separates_image_from_square() -> None:
    # Image "x" always scores -1, image "y" -2 whatever the square: all variance is the image's.
    steps = [
        {"image_id": img, "action": size * SIZE + centre, "reward": reward}
        for img, reward in (("x", -1), ("y", -2))
        for size in range(5)
        for centre in (0, 55)
    ]
    out = reward_structure(steps)
    assert out["eta2_image"]["eta2"] == pytest.approx(1.0)
    assert out["eta2_size"]["eta2"] == out["eta2_centre"]["eta2"] == 0.0
    assert out["images_with_one_reward"] == 1.0
    assert out["mean_reward_by_size"] == {str(s): -1.5 for s in (20, 40, 60, 80, 200)}
    assert out["best_tried_per_image_mean"] == -1.5 == out["mean_reward"]
    # Now the big square costs -2 and the others -1 on every image: the size explains it all.
    steps = [dict(s, reward=-2 if s["action"] >= 4 * SIZE else -1) for s in steps]
    out = reward_structure(steps)
    assert out["eta2_size"]["eta2"] == pytest.approx(1.0) and out["eta2_image"]["eta2"] == 0.0
    assert out["best_size_mean"] == -1.0 and out["mean_reward_by_size"]["200"] == -2.0
    assert out["transitions_by_size"] == {str(s): 4 for s in (20, 40, 60, 80, 200)}
    assert out["images_with_one_reward"] == 0.0
    with pytest.raises(ValueError):
        reward_structure([])
