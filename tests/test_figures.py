"""Figures of the SRD defence: the square heat-map and the reward curve against random."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from srd.defenses.srd.figures import plot_reward_curve, plot_square_heatmap, square_heat
from srd.geometry import Square


def test_square_heat_counts_the_share_of_squares_per_pixel() -> None:
    squares = [Square(0, 10, 0, 10), Square(5, 15, 5, 15)]
    heat = square_heat(squares, size=20)
    assert heat.shape == (20, 20)
    assert heat[0, 0] == 0.5 and heat[7, 7] == 1.0 and heat[12, 12] == 0.5
    assert heat[16, 16] == 0.0 and heat[0, 12] == 0.0
    assert heat.sum() == (100 + 100) / 2


def test_heatmap_and_reward_curve_write_pngs(tmp_path: Path) -> None:
    box = Square(203, 224, 203, 224)
    coverage = {"covered": 0.25, "mean_covered_share": 0.3, "threshold": 0.5}
    path = plot_square_heatmap([Square(190, 224, 190, 224), Square(0, 20, 0, 20)], box,
                               tmp_path / "heat.png", title="t", coverage=coverage)  # fmt: skip
    assert np.asarray(Image.open(path)).shape[0] > 300
    steps = [{"timestep": t, "reward": -1 - (t % 2), "exploration_rate": 1 - t / 40}
             for t in range(1, 41)]  # fmt: skip
    episodes = [{"timestep": t, "mean_reward": -1.5} for t in range(5, 41, 5)]
    random_steps = [dict(s, reward=-2) for s in steps]
    curve = plot_reward_curve(steps, episodes, tmp_path / "curve.png",
                              random_steps=random_steps, greedy_mean=-1.0)  # fmt: skip
    assert curve.stat().st_size > 10_000
