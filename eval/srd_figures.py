"""Figures of the SRD defence: the agent's reward curve and the masks it chooses on test images.

(a) ``<out_dir>/srd_reward_<name>.png``: the reward per transition of stage D2 (moving average),
    per-episode means and epsilon, from the reward log beside --ppo_path.
(b) ``<out_dir>/srd_masks_<name>.png``: triggered test images (for an attack without an image
    trigger, Shadowcast: the test images showing its concept, as they are) with the square the
    agent chooses (greedy action) outlined, and the captions of the backdoored model before SRD
    and of the defended model after SRD on the same image, read from the two evaluation result
    files (nothing is captioned again).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from srd.attacks.registry import AttackArgs
from srd.cli import run_main
from srd.config import arg, parse
from srd.data.records import DataArgs, load_image
from srd.defenses.srd.dqn import greedy_actions, read_reward_log
from srd.defenses.srd.figures import MaskExample, plot_mask_grid, plot_reward_curve
from srd.defenses.srd.inputs import SRDArgs
from srd.defenses.srd.policy import load_policy
from srd.errors import SRDError
from srd.flags import COUNT, SEED
from srd.geometry import decode_action
from srd.io import ensure_dir, read_json, setup_logging

log = logging.getLogger("srd_figures")


@dataclass
class FigureArgs:
    """Figures: inputs and where the PNGs go."""

    before_results: str = arg(
        "result/backdoor-badnet.json", help="evaluation result of the backdoored model"
    )
    after_results: str = arg(
        "result/srd-badnet.json", help="evaluation result of the SRD-defended model"
    )
    out_dir: str = arg("img", help="folder of the PNGs")
    name: str = arg("", help="file name suffix (default: the attack name)")
    num_images: int = arg(6, help="test images in the mask figure", check=COUNT)
    seed: int = arg(0, help="seed of the choice of test images", check=SEED)


def _triggered(path: str, attack: str) -> dict[str, str]:
    result = read_json(path)
    if not isinstance(result, dict) or not isinstance(result.get("predictions"), dict):
        raise SRDError(f"{path}: not an evaluation result (no predictions)")
    if result.get("attack") != attack:
        raise SRDError(f"{path}: evaluated with attack {result.get('attack')!r}, not {attack!r}")
    triggered = result["predictions"].get("triggered")
    if not triggered:
        raise SRDError(f"{path}: no captions of triggered images")
    return triggered


def main(argv: Sequence[str] | None = None) -> list[str]:
    data, attack_args, srd, cfg = parse(
        argv, DataArgs, AttackArgs, SRDArgs, FigureArgs, description=__doc__
    )
    attack = attack_args.build()
    if attack is None:
        raise SRDError("--bd_attack_type: the mask figure needs an attack (not clean)")
    name = cfg.name or attack.name
    steps, episodes = read_reward_log(srd.reward_log)
    policy = load_policy(srd.policy_file)
    if policy.occlusion_grid:
        raise SRDError(f"--ppo_path {srd.policy_file}: the policy reads occlusion maps of the "
                       "captioner's captions, which this figure does not compute")  # fmt: skip
    before = _triggered(cfg.before_results, attack.name)
    after = _triggered(cfg.after_results, attack.name)
    shared = sorted(set(before) & set(after), key=int)
    if not shared:
        raise SRDError(f"--after_results {cfg.after_results}: no test image in common with "
                       f"--before_results {cfg.before_results}")  # fmt: skip
    count = min(cfg.num_images, len(shared))
    pick = np.random.default_rng(cfg.seed).choice(len(shared), size=count, replace=False)
    chosen = [int(shared[i]) for i in sorted(pick)]
    paths = {r.image_id: r.path for r in data.split("test")}
    missing = [i for i in chosen if i not in paths]
    if missing:
        raise SRDError(f"--coco_karpathy_json_path: test image {missing[0]} is not in the split")
    images = [attack.apply_image(load_image(paths[i])) for i in chosen]
    actions = greedy_actions(policy, images)

    shown = "triggered test images" if attack.has_image_trigger else "test images of the concept"
    setup_logging()
    out = ensure_dir(cfg.out_dir, "--out_dir")
    examples = [
        MaskExample(
            image_id=i,
            image=im,
            square=decode_action(int(a)),
            lines=[("backdoored", before[str(i)]), ("after SRD", after[str(i)])],
            highlight=attack.target,
        )
        for i, im, a in zip(chosen, images, actions, strict=True)
    ]
    masks = plot_mask_grid(
        examples,
        out / f"srd_masks_{name}.png",
        title=f"{attack.name}: {shown}, the agent's square (greedy), and captions before / after "
        "SRD",
    )
    curve = plot_reward_curve(
        steps, episodes, out / f"srd_reward_{name}.png", title=f"SRD agent reward ({name})"
    )
    log.info("wrote %s and %s", curve, masks)
    print(json.dumps({"reward_curve": str(curve), "masks": str(masks)}))
    return [str(curve), str(masks)]


if __name__ == "__main__":
    run_main(main)
