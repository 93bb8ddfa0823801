"""Diagnosis of the SRD squares: do they cover the real trigger, and where do they land?

``--squares cleaned`` (default) reads the merged cleaning manifest (``--clean_data_save``): the
square stage D3 kept for each image. ``--squares greedy`` needs no D3: it takes the policy's
(``--ppo_path``) greedy square on every triggered training image, as the defender's data holds
it (D3's first try), and as a control the same on the CLEAN versions of those images: equal
coverage on both means the squares land there whatever the trigger, not because of it. Both
report, over triggered training images (the attack run's poison ids), the share whose square
covers at least ``--threshold`` of the patch trigger, the mean covered share and the square
sides chosen, and draw a heat-map of where the squares land against the trigger box.
``--squares training`` needs no model: from D2's reward logs and agent report it gives the share
of D2's squares on the triggered images of its own pool that cover the trigger, per bin of
timesteps, for the trained and the random policy, and the greedy squares' coverage on the pool
(``<policy>.training_coverage.json`` + ``.png``; also for policies that read occlusion maps);
only a ``--pool_source data`` pool holds the real trigger (a surrogate pool stamps its own patch
on clean versions), so for a surrogate pool these are empty. Writes
``coverage.json`` + ``coverage.png`` in the manifest folder (cleaned) or
``<policy>.coverage.json`` + ``.png`` beside the policy (greedy), and prints the JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from stable_baselines3 import DQN
from tqdm.auto import tqdm

from srd.attacks.registry import Attack
from srd.attacks.trainset import PoisonPlan, TrainingImages, plan_attack
from srd.cli import run_main
from srd.config import arg, parse
from srd.data.records import DataArgs
from srd.defenses.coverage import (
    KEPT_COVERAGE_FILE,
    action_coverage,
    covering_signal,
    map_localisation,
    training_coverage,
    trigger_box,
)
from srd.defenses.srd.dqn import greedy_actions, read_reward_log
from srd.defenses.srd.figures import plot_square_heatmap, plot_training_coverage
from srd.defenses.srd.inputs import SRDArgs
from srd.defenses.srd.merge import read_merged
from srd.defenses.srd.policy import load_policy
from srd.defenses.srd.pool import read_pool_info
from srd.errors import SRDError
from srd.flags import COUNT, between
from srd.geometry import decode_action
from srd.io import read_json, write_json

log = logging.getLogger("srd_coverage")


@dataclass
class CoverageArgs:
    """Which squares to diagnose."""

    squares: str = arg(
        "cleaned",
        help="cleaned: the squares D3 kept (merged manifest); greedy: the policy's greedy "
        "square on each triggered training image (no D3 needed); training: D2's own squares "
        "on the triggered images of its pool, as training went (trained and random policy) "
        "and the greedy square on each (the agent report's), no model needed",
        choices=["cleaned", "greedy", "training"],
    )
    bin_size: int = arg(500, help="timesteps per point of the training curve", check=COUNT)
    threshold: float = arg(
        0.5,
        help="share of the trigger box a square must cover to count",
        check=between(0, 1, low_open=True),
    )
    batch_size: int = arg(64, help="images per policy call (greedy)", check=COUNT)


def greedy_squares(
    policy: DQN, load: Callable[[int], np.ndarray], ids: Sequence[int], batch_size: int
) -> dict[int, int]:
    """Image id -> the policy's greedy action on ``load(id)`` (a 224x224x3 uint8 image)."""
    actions: dict[int, int] = {}
    for start in tqdm(range(0, len(ids), batch_size), desc="greedy squares", leave=False):
        chunk = list(ids[start : start + batch_size])
        chosen = greedy_actions(policy, [load(i) for i in chunk])
        actions.update({i: int(a) for i, a in zip(chunk, chosen, strict=True)})
    return actions


def main(argv: Sequence[str] | None = None) -> dict:
    data, srd, cfg = parse(argv, DataArgs, SRDArgs, CoverageArgs, description=__doc__)
    if srd.benign_control:
        raise SRDError("--benign_control: no image is triggered, so there is no trigger to cover")
    plan = PoisonPlan.load(srd.poison_ids_path)
    attack = plan_attack(plan, srd.poison_ids_path)
    images = TrainingImages(data.split("train"), attack, plan.ids)
    triggered = images.poisoned_images
    if cfg.squares == "training":
        return _training(srd, attack, triggered, cfg)
    if cfg.squares == "cleaned":
        merged = read_merged(srd.clean_data_save)
        actions = {int(r["id"]): int(r["action"]) for r in merged["records"]}
        out = Path(srd.clean_data_save) / KEPT_COVERAGE_FILE
    else:
        if not srd.policy_file.is_file():
            raise SRDError(f"--ppo_path {srd.policy_file}: policy file not found")
        policy = load_policy(srd.policy_file)
        if policy.occlusion_grid:
            raise SRDError(f"--ppo_path {srd.policy_file}: the policy reads occlusion maps of "
                           "the captioner's captions, which --squares greedy does not compute; "
                           "use --squares cleaned (D3's squares)")  # fmt: skip
        ids = sorted(triggered)
        actions = greedy_squares(policy, images.as_in_training_set, ids, cfg.batch_size)
        control = greedy_squares(policy, images.clean, ids, cfg.batch_size)
        out = srd.greedy_coverage
    report = {"squares": cfg.squares, **action_coverage(actions, attack, triggered, cfg.threshold)}
    if cfg.squares == "cleaned":  # D3's keep-best rule against its first try (the greedy square
        first = {  # unless the exploration draw replaced it)
            int(r["id"]): int(r["extras"]["tries"][0][0])
            for r in merged["records"]
            if r.get("extras", {}).get("tries")
        }
        if first:
            first_cover = action_coverage(first, attack, triggered, cfg.threshold)
            report["first_try"] = {
                k: first_cover[k] for k in ("covered", "mean_covered_share", "square_sides")
            }
    if cfg.squares == "greedy":
        clean = action_coverage(control, attack, triggered, cfg.threshold)
        report["clean_versions"] = {
            "covered": clean["covered"],
            "mean_covered_share": clean["mean_covered_share"],
            "same_square": float(np.mean([actions[i] == control[i] for i in ids])),
        }
    squares = [decode_action(a) for i, a in sorted(actions.items()) if i in triggered]
    if squares:
        report["figure"] = str(
            plot_square_heatmap(
                squares,
                trigger_box(attack),
                out.with_suffix(".png"),
                title=f"{cfg.squares} squares on triggered training images ({attack.name})",
                coverage=report,
            )
        )
    write_json(out, report)
    print(json.dumps(report))
    return report


def _training(srd: SRDArgs, attack: Attack, triggered: set[int], cfg: CoverageArgs) -> dict:
    """``--squares training``: D2's squares on the triggered images of its pool (reward logs
    and agent report); writes ``<policy>.training_coverage.json`` and ``.png``."""
    report = read_json(srd.agent_report)
    source = read_pool_info(srd.save_data_path).get("source", "surrogate")
    # A surrogate pool stamps its own patch on clean versions: no real trigger to cover there.
    real = triggered if source == "data" else set()
    curves, signal = {}, {}
    for label, path in (("trained", srd.reward_log), ("random", srd.random_reward_log)):
        steps, _ = read_reward_log(path)
        curves[label] = training_coverage(steps, attack, real, cfg.bin_size, cfg.threshold)
        signal[label] = covering_signal(steps, attack, real, cfg.threshold) if real else None
    pool_ids = {int(r["image_id"]) for r in report["greedy_policy"]["per_image"]}
    greedy = {int(r["image_id"]): int(r["action"]) for r in report["greedy_policy"]["per_image"]}
    out = srd.policy_file.with_suffix(".training_coverage.json")
    result = {
        "squares": "training",
        "pool_source": source,
        "pool_images": len(pool_ids),
        "triggered_pool_images": len(pool_ids & real),
        "greedy_on_pool": action_coverage(greedy, attack, real & pool_ids, cfg.threshold),
        "signal": signal,
        "occlusion_maps": map_localisation(
            (report.get("occlusion") or {}).get("maps", {}), attack, real
        ),
        "curves": curves,
    }
    if curves["trained"]:
        result["figure"] = str(
            plot_training_coverage(curves, out.with_suffix(".png"),
                                   f"D2 squares on triggered pool images ({attack.name})")
        )  # fmt: skip
    write_json(out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}))
    return result


if __name__ == "__main__":
    run_main(main)
