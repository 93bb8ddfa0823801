"""Diagnosis of stage D3: does the chosen red square cover the real trigger?"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from srd.attacks.registry import Attack
from srd.attacks.triggers import resolve_position
from srd.geometry import (
    GRID,
    IMAGE_SIZE,
    MASK_SIZES,
    Square,
    decode_action,
)

log = logging.getLogger(__name__)

KEPT_COVERAGE_FILE = "coverage.json"
"""``eval/srd_coverage.py``'s result for the squares D3 kept, in the cleaning shard folder."""


# --------------------------------------------------------------------------------------------
# Diagnosis: does the chosen square cover the real trigger?
def trigger_box(attack: Attack) -> Square | None:
    """The rows/cols the attack's patch trigger occupies on the canvas (None: no patch)."""
    if attack.trigger is None or attack.trigger.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
        return None  # no trigger (Shadowcast) or a whole-image pattern (Blended)
    h, w = attack.trigger.shape[:2]
    row, col = resolve_position(attack.config.position, (h, w), (IMAGE_SIZE, IMAGE_SIZE))
    return Square(top=row, bottom=row + h, left=col, right=col + w)


def covered_share(square: Square, box: Square) -> float:
    """Share of ``box``'s pixels inside ``square``."""
    rows = max(0, min(square.bottom, box.bottom) - max(square.top, box.top))
    cols = max(0, min(square.right, box.right) - max(square.left, box.left))
    return rows * cols / ((box.bottom - box.top) * (box.right - box.left))


def trigger_coverage(
    merged: dict[str, Any], attack: Attack, triggered_ids: set[int], threshold: float = 0.5
) -> dict[str, Any]:
    """How often the cleaning stage's square covers the real trigger on triggered images.

    See :func:`action_coverage`; the squares are the merged cleaning records' actions.
    """
    actions = {int(r["id"]): int(r["action"]) for r in merged["records"]}
    return action_coverage(actions, attack, triggered_ids, threshold)


def action_coverage(
    actions: Mapping[int, int], attack: Attack, triggered_ids: set[int], threshold: float = 0.5
) -> dict[str, Any]:
    """How often the square of ``actions`` (image id -> action) covers the real trigger.

    Returns the share of triggered images (those of ``triggered_ids`` with an action) whose
    square covers at least ``threshold`` of the patch, the mean covered share, and the nominal
    square sides chosen (all images). ``None`` shares for attacks without a patch trigger.
    """
    box = trigger_box(attack)
    shares = []
    sizes: dict[str, int] = {}
    for image_id, action in actions.items():
        square = decode_action(int(action))
        side = str(MASK_SIZES[int(action) // (GRID * GRID)])  # nominal side, before clipping
        sizes[side] = sizes.get(side, 0) + 1
        if box is not None and int(image_id) in triggered_ids:
            shares.append(covered_share(square, box))
    return {
        "attack": attack.name,
        "trigger_box": list(box) if box else None,
        "num_triggered_images": len(triggered_ids),
        "num_triggered_with_square": len(shares),
        "covered": float(np.mean(np.array(shares) >= threshold)) if shares else None,
        "mean_covered_share": float(np.mean(shares)) if shares else None,
        "threshold": threshold,
        "square_sides": dict(sorted(sizes.items(), key=lambda kv: int(kv[0]))),
    }


def table_reward(step: Mapping[str, Any]) -> float:
    """The reference table's reward of a reward-log step record (its ``table_reward``; logs
    written before the area-cost variant have only ``reward``, which was the table's)."""
    table = step.get("table_reward")
    return float(step["reward"] if table is None else table)


def training_coverage(
    steps: Sequence[Mapping[str, Any]],
    attack: Attack,
    triggered_ids: set[int],
    bin_size: int = 500,
    threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Coverage as training went: D2's transitions (reward-log step records with ``timestep``,
    ``image_id``, ``action``) cut into bins of ``bin_size`` timesteps; for each bin, the
    transitions on triggered pool images, the share of them whose square covers at least
    ``threshold`` of the trigger, and their mean table reward. Empty without a patch trigger."""
    box = trigger_box(attack)
    if box is None:
        return []
    bins: dict[int, list[tuple[float, float]]] = {}
    for step in steps:
        if int(step["image_id"]) not in triggered_ids:
            continue
        share = covered_share(decode_action(int(step["action"])), box)
        bins.setdefault((int(step["timestep"]) - 1) // bin_size, []).append(
            (share, table_reward(step))
        )
    return [
        {
            "timesteps": [k * bin_size + 1, (k + 1) * bin_size],
            "transitions_on_triggered": len(rows),
            "covered": float(np.mean([s >= threshold for s, _ in rows])),
            "mean_table_reward": float(np.mean([r for _, r in rows])),
        }
        for k, rows in sorted(bins.items())
    ]


def covering_signal(
    steps: Sequence[Mapping[str, Any]],
    attack: Attack,
    triggered_ids: set[int],
    threshold: float = 0.5,
) -> dict[str, Any] | None:
    """What D2's reward says about covering the trigger: over the transitions on triggered
    pool images, how many squares covered it and their mean table reward against the others'
    (None without a patch trigger). A large gap on few transitions is a sparse signal."""
    box = trigger_box(attack)
    if box is None:
        return None
    rows = [
        (
            covered_share(decode_action(int(s["action"])), box) >= threshold,
            table_reward(s),
        )
        for s in steps
        if int(s["image_id"]) in triggered_ids
    ]
    covering = [r for c, r in rows if c]
    others = [r for c, r in rows if not c]
    return {
        "transitions": len(steps),
        "on_triggered_images": len(rows),
        "covering": len(covering),
        "mean_table_reward_covering": float(np.mean(covering)) if covering else None,
        "mean_table_reward_not_covering": float(np.mean(others)) if others else None,
    }


def map_localisation(
    maps: Mapping[str, Any], attack: Attack, triggered_ids: set[int]
) -> dict[str, Any] | None:
    """Does an occlusion map (srd.defenses.srd.variants; image id -> grid x grid values) point
    at the trigger? For triggered and for clean images: the share whose largest cell is the one
    holding the trigger box's centre, the mean value of that cell and of the other cells
    (None without a patch trigger)."""
    box = trigger_box(attack)
    if box is None or not maps:
        return None
    grid = len(next(iter(maps.values())))
    centre = ((box.top + box.bottom) / 2, (box.left + box.right) / 2)
    cell = int(centre[0] * grid // IMAGE_SIZE) * grid + int(centre[1] * grid // IMAGE_SIZE)

    def summary(ids: list[str]) -> dict[str, Any]:
        values = [np.asarray(maps[i], dtype=np.float64).ravel() for i in ids]
        return {
            "images": len(ids),
            "largest_is_trigger_cell": (
                float(np.mean([int(np.argmax(v)) == cell for v in values])) if values else None
            ),
            "trigger_cell_mean": float(np.mean([v[cell] for v in values])) if values else None,
            "other_cells_mean": (
                float(np.mean([np.delete(v, cell).mean() for v in values])) if values else None
            ),
        }

    triggered = [i for i in maps if int(i) in triggered_ids]
    return {
        "grid": grid,
        "trigger_cell": cell,
        "triggered": summary(triggered),
        "clean": summary([i for i in maps if int(i) not in triggered_ids]),
    }
