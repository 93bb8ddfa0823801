"""The report's section on SRD's agent: for every SRD cleaning run among the results, D2's
agent report (greedy policy against a random one) and how often its squares cover the trigger."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from srd.defenses.coverage import KEPT_COVERAGE_FILE
from srd.defenses.srd.inputs import SRDArgs
from srd.defenses.srd.merge import read_merged
from srd.errors import SRDError
from srd.io import atomic_path, file_digest, read_json


def _maybe_json(path: Path) -> dict[str, Any] | None:
    return read_json(path, flag="--results") if path.is_file() else None


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}"


def _copy_figure(src: Any, dest: Path) -> Path | None:
    if not src or not Path(src).is_file():
        return None
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest


def agent_section(results: list[Any], img_dir: str | Path) -> tuple[str, list[Path]]:
    """What SRD's agent did, for every distinct SRD cleaning run in the results: its mean reward
    against a random policy on the pool (D2's ``agent_report.json``), and how often its squares
    cover half of the real trigger, greedy on the triggered training images and as kept by D3
    (``eval/srd_coverage.py``). Their figures are copied into ``img_dir``. Returns the Markdown
    (empty without SRD results) and the figures."""
    runs: dict[str, Any] = {}  # (``results``: srd.defenses.report.DefenseResult)
    for r in results:
        folder = r.record.get("clean_data_save") if r.record.get("name") == "srd" else None
        if folder:
            runs.setdefault(str(folder), r)
    if not runs:
        return "", []
    rows, figures = [], []
    for folder, r in sorted(runs.items(), key=lambda kv: (kv[1].attack, str(kv[1].seed))):
        config = read_merged(folder)["clean_config"]["config"]
        srd = SRDArgs(ppo_path=config["ppo_path"])  # the files D2 wrote beside the policy
        policy = srd.policy_file
        used = config.get("policy") == "dqn"  # a random-policy run has no agent
        if used and policy.is_file() and file_digest(policy) != config.get("policy_sha256"):
            raise SRDError(
                f"--results {r.path}: the policy {policy} changed after the cleaning run "
                f"{folder} used it; its agent report no longer describes those squares"
            )
        agent = (used and _maybe_json(srd.agent_report)) or {}
        greedy = (used and _maybe_json(srd.greedy_coverage)) or {}
        kept = _maybe_json(Path(folder) / KEPT_COVERAGE_FILE) or {}
        train, rand = agent.get("training") or {}, agent.get("random_policy") or {}
        reward = "-"
        if agent.get("gain_over_random") is not None:
            reward = (
                f"{agent['greedy_policy']['mean_reward']:.3f} / {rand['mean_reward']:.3f} "
                f"({agent['gain_over_random']:+.3f})"
            )
        rows.append(
            f"| {r.attack} | {r.seed} | {config.get('policy')} | {folder} | "
            f"{train.get('images_visited', '-')}/{agent.get('pool_images', '-')} | "
            f"{train.get('target_updates', '-')} | {reward} | {_pct(greedy.get('covered'))} | "
            f"{_pct(kept.get('covered'))} |"
        )
        stem = "agent_" + "_".join(Path(folder).parts[-2:])
        for src, name in (
            (srd.reward_curve, "rewards"),
            (greedy.get("figure"), "greedy_squares"),
            (kept.get("figure"), "kept_squares"),
        ):
            fig = _copy_figure(src, Path(img_dir) / f"{stem}_{name}.png")
            figures += [fig] if fig else []
    head = (
        "| Attack | Seed | Policy | Cleaning run | Pool images visited | Target-network updates "
        "| Mean reward, greedy agent / random policy (gain) | Greedy squares covering half the "
        "trigger (%) | Kept squares covering half the trigger (%) |\n" + "|---" * 9 + "|\n"
    )
    text = (
        "## SRD's agent\n\nFrom D2's `policy.agent_report.json` (the trained policy's greedy "
        "square on every pool image against a random policy in the same environment) and "
        "`eval/srd_coverage.py` (share of triggered training images whose square covers at "
        "least half of the real trigger box; '-': not run or no patch trigger).\n\n"
        + head
        + "\n".join(rows)
        + "\n"
    )
    return text, figures
