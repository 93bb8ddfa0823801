"""Figures of the SRD defence: the agent's reward curve and the masks it chooses.

matplotlib with the non-interactive Agg backend, so figures render on servers and in CI. Each
function writes one PNG atomically and returns its path.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from srd.geometry import IMAGE_SIZE, Square  # noqa: E402
from srd.io import atomic_path  # noqa: E402

CAPTION_WIDTH = 34
"""Characters per line of the captions under each image."""


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values (shorter at the start): shape (N,)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return x
    csum = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, len(x) + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def plot_reward_curve(
    steps: Sequence[dict],
    episodes: Sequence[dict],
    path: str | os.PathLike,
    title: str = "",
    random_steps: Sequence[dict] | None = None,
    greedy_mean: float | None = None,
) -> Path:
    """Reward per transition (moving average), per-episode mean reward, and epsilon.

    ``steps``/``episodes`` are the records of :func:`srd.defenses.srd.dqn.read_reward_log`. With
    ``random_steps`` (a random policy's step records in the same environment) its moving
    average and overall mean are drawn too; ``greedy_mean`` (the trained policy's greedy mean
    reward over the pool) is drawn as a line.
    """
    if not steps:
        raise ValueError("no transitions to plot")
    t = np.array([s["timestep"] for s in steps], dtype=np.float64)
    r = np.array([s["reward"] for s in steps], dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t, r = t[order], r[order]
    window = max(1, len(r) // 40)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(t, moving_average(r, window), color="tab:blue", lw=1.8,
            label=f"reward, mean of last {window} transitions")  # fmt: skip
    if episodes:
        et = [e["timestep"] for e in episodes]
        em = [e["mean_reward"] for e in episodes]
        ax.plot(et, em, "o", color="tab:orange", ms=3, alpha=0.35, label="episode mean reward")
    if random_steps:
        rt = np.array([s["timestep"] for s in random_steps], dtype=np.float64)
        rr = np.array([s["reward"] for s in random_steps], dtype=np.float64)
        ro = np.argsort(rt, kind="stable")
        ax.plot(rt[ro], moving_average(rr[ro], window), color="tab:red", lw=1.0, alpha=0.7,
                label=f"random policy, same env and seed (mean of last {window})")  # fmt: skip
        ax.axhline(float(rr.mean()), color="tab:red", ls="--", lw=1.2,
                   label=f"random policy mean {rr.mean():.2f}")  # fmt: skip
    if greedy_mean is not None:
        ax.axhline(greedy_mean, color="tab:green", ls="--", lw=1.5,
                   label=f"trained greedy policy, pool mean {greedy_mean:.2f}")  # fmt: skip
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("environment transitions")
    ax.set_ylabel("reward (reference table: -2 ... +3)")
    eps = np.array([s.get("exploration_rate", np.nan) for s in steps], dtype=np.float64)[order]
    if np.isfinite(eps).any():
        ax2 = ax.twinx()
        ax2.plot(t, eps, "--", color="grey", lw=1, label="epsilon")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("exploration rate epsilon", color="grey")
        lines = ax.get_legend_handles_labels()
        extra = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + extra[0], lines[1] + extra[1], loc="best", fontsize=8)
    else:
        ax.legend(loc="best", fontsize=8)
    counts = {v: int((r == v).sum()) for v in sorted(set(r.tolist()))}
    share = ", ".join(f"{int(v):+d}: {100 * c / len(r):.0f}%" for v, c in counts.items())
    ax.set_title((title + "\n" if title else "") + f"rewards over all transitions: {share}",
                 fontsize=10)  # fmt: skip
    return _save(fig, path)


@dataclass
class MaskExample:
    """One panel: an image (224, 224, 3) uint8, the chosen square, and captions to show."""

    image_id: int | str
    image: np.ndarray
    square: Square
    lines: list[tuple[str, str]]
    """(label, caption) pairs printed under the image, e.g. ("backdoored", "...")."""
    highlight: str | None = None
    """A word (the attack target) marked with ** in the captions when present."""


def _caption_text(lines: Sequence[tuple[str, str]], highlight: str | None) -> str:
    out = []
    for label, caption in lines:
        text = caption or "(empty)"
        if highlight and highlight.lower() in text.lower():
            label += " [target]"
        out.append(textwrap.fill(f"{label}: {text}", CAPTION_WIDTH))
    return "\n".join(out)


def plot_mask_grid(
    examples: Sequence[MaskExample],
    path: str | os.PathLike,
    title: str = "",
    columns: int = 3,
) -> Path:
    """A grid of images with the chosen red square outlined (and lightly filled, so what it
    covers stays visible) and captions underneath."""
    if not examples:
        raise ValueError("no examples to plot")
    columns = min(columns, len(examples))
    rows = (len(examples) + columns - 1) // columns
    texts = [_caption_text(ex.lines, ex.highlight) for ex in examples]
    text_height = 0.15 * max(t.count("\n") + 1 for t in texts) + 0.45  # inches under an image
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.9 * columns, (3.9 + text_height) * rows), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, ex, text in zip(axes.flat, examples, texts, strict=False):
        ax.imshow(ex.image, interpolation="nearest")
        sq = ex.square
        ax.add_patch(Rectangle((sq.left - 0.5, sq.top - 0.5), sq.right - sq.left,
                               sq.bottom - sq.top, facecolor=(1, 0, 0, 0.25),
                               edgecolor="red", lw=2.5))  # fmt: skip
        ax.add_patch(Rectangle((sq.left - 0.5, sq.top - 0.5), sq.right - sq.left,
                               sq.bottom - sq.top, fill=False, edgecolor="white", lw=0.8,
                               ls="--"))  # fmt: skip
        ax.set_title(f"image {ex.image_id}", fontsize=9)
        ax.text(0.0, -0.03, text, transform=ax.transAxes,
                va="top", ha="left", fontsize=8, family="monospace")  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(hspace=text_height / 3.9, wspace=0.08)
    return _save(fig, path)


def square_heat(squares: Sequence[Square], size: int = IMAGE_SIZE) -> np.ndarray:
    """Share of ``squares`` covering each pixel of the canvas: (size, size) float in [0, 1]."""
    if not squares:
        raise ValueError("no squares")
    diff = np.zeros((size + 1, size + 1), dtype=np.float64)
    for sq in squares:
        diff[sq.top, sq.left] += 1
        diff[sq.top, sq.right] -= 1
        diff[sq.bottom, sq.left] -= 1
        diff[sq.bottom, sq.right] += 1
    return np.cumsum(np.cumsum(diff, axis=0), axis=1)[:size, :size] / len(squares)


def plot_square_heatmap(
    squares: Sequence[Square],
    box: Square | None,
    path: str | os.PathLike,
    title: str = "",
    coverage: dict | None = None,
) -> Path:
    """Where the squares land on the 224 canvas: the share of images whose square covers each
    pixel, with the real trigger's box outlined (``box``; None: no patch trigger) and, with
    ``coverage`` (:func:`srd.defenses.coverage.action_coverage`), the coverage numbers
    underneath."""
    heat = square_heat(squares)
    fig, ax = plt.subplots(figsize=(5.6, 5.4))
    shown = ax.imshow(heat, cmap="magma", vmin=0, vmax=max(float(heat.max()), 1e-9),
                      interpolation="nearest")  # fmt: skip
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04,
                 label="share of images whose square covers the pixel")  # fmt: skip
    if box is not None:
        ax.add_patch(Rectangle((box.left - 0.5, box.top - 0.5), box.right - box.left,
                               box.bottom - box.top, fill=False, edgecolor="cyan", lw=2,
                               label="trigger box"))  # fmt: skip
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("column (px)")
    ax.set_ylabel("row (px)")
    lines = [f"{len(squares)} images"]
    if coverage and coverage.get("covered") is not None:
        lines.append(
            f"square covers >= {100 * coverage['threshold']:.0f}% of the trigger box on "
            f"{100 * coverage['covered']:.1f}% of triggered images "
            f"(mean covered share {100 * coverage['mean_covered_share']:.1f}%)"
        )
    ax.set_title((title + "\n" if title else "") + "\n".join(lines), fontsize=9)
    return _save(fig, path)


def plot_training_coverage(
    curves: dict[str, Sequence[dict]], path: str | os.PathLike, title: str
) -> Path:
    """Share of transitions on triggered pool images whose square covers the trigger, per bin
    of timesteps (:func:`srd.defenses.coverage.training_coverage`), one line per policy."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, bins in curves.items():
        x = [np.mean(b["timesteps"]) for b in bins]
        ax.plot(x, [b["covered"] for b in bins], marker="o", label=label)
    ax.set_xlabel("D2 timestep")
    ax.set_ylabel("squares covering the trigger")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)
