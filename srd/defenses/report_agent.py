"""The report's section on SRD's agent: for every SRD cleaning run among the results, D2's
agent report (greedy policy against a random one) and how often its squares cover the trigger."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from srd.defenses.coverage import KEPT_COVERAGE_FILE
from srd.defenses.srd.dqn import schedule_of
from srd.defenses.srd.inputs import SRDArgs
from srd.defenses.srd.merge import read_merged
from srd.errors import SRDError
from srd.io import atomic_path, file_digest, read_json, write_json


def _maybe_json(path: Path) -> dict[str, Any] | None:
    return read_json(path, flag="--results") if path.is_file() else None


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}"


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _copy_figure(src: Any, dest: Path) -> Path | None:
    if not src or not Path(src).is_file():
        return None
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest


SUMMARY_FORMAT = "srd-agent-summary-v1"
"""A cleaning run's agent row as the report read it, saved beside its figures in ``img_dir``."""


def _summary_from_run(folder: str, r: Any, stem: str, img_dir: Path) -> dict[str, Any]:
    """The row's facts from the cleaning run's own files; its figures copied into ``img_dir``."""
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
    schedule = agent.get("schedule")  # (agent reports written before it: from D2's config)
    d2_config = used and schedule is None and _maybe_json(policy.with_suffix(".config.json"))
    schedule = schedule_of(d2_config) if d2_config else schedule
    figures = []
    for src, name in (
        (srd.reward_curve, "rewards"),
        (greedy.get("figure"), "greedy_squares"),
        (kept.get("figure"), "kept_squares"),
    ):
        fig = _copy_figure(src, img_dir / f"{stem}_{name}.png")
        figures += [fig.name] if fig else []
    return {
        "format": SUMMARY_FORMAT,
        "policy": config.get("policy"),
        "schedule": schedule,
        "images_visited": train.get("images_visited"),
        "pool_images": agent.get("pool_images"),
        "target_updates": train.get("target_updates"),
        "greedy_mean_reward": (agent.get("greedy_policy") or {}).get("mean_reward"),
        "random_mean_reward": rand.get("mean_reward"),
        "gain_over_random": agent.get("gain_over_random"),
        "greedy_covered": greedy.get("covered"),
        "kept_covered": kept.get("covered"),
        "figures": figures,
    }


def agent_summary(folder: str, r: Any, img_dir: str | Path) -> dict[str, Any]:
    """The agent row of the cleaning run ``folder`` (``r``: a result that used it): read from the
    run's files when they are here, and then saved as ``img_dir/agent_<run>.json`` beside its
    figures; where the run is not (a fresh clone of a released report), read from that file, so
    a report can be written again from its results and its image folder alone."""
    stem = "agent_" + "_".join(Path(folder).parts[-2:])
    saved = Path(img_dir) / f"{stem}.json"
    if (Path(folder) / "merged.json").is_file():
        summary = _summary_from_run(folder, r, stem, Path(img_dir))
        write_json(saved, summary)
        return summary
    if saved.is_file():
        summary = read_json(saved, flag="--img_dir")
        if isinstance(summary, dict) and summary.get("format") == SUMMARY_FORMAT:
            return summary
        raise SRDError(f"--img_dir {saved}: not an agent summary")
    raise SRDError(
        f"--results {r.path}: SRD cleaning run {folder} not found, nor its saved summary {saved}"
    )


def agent_section(results: list[Any], img_dir: str | Path) -> tuple[str, list[Path]]:
    """What SRD's agent did, for every distinct SRD cleaning run in the results: its mean reward
    against a random policy on the pool (D2's ``agent_report.json``), and how often its squares
    cover half of the real trigger, greedy on the triggered training images and as kept by D3
    (``eval/srd_coverage.py``), by :func:`agent_summary`. Returns the Markdown (empty without
    SRD results) and the figures (in ``img_dir``)."""
    runs: dict[str, Any] = {}  # (``results``: srd.defenses.report.DefenseResult)
    for r in results:
        folder = r.record.get("clean_data_save") if r.record.get("name") == "srd" else None
        if folder:
            runs.setdefault(str(folder), r)
    if not runs:
        return "", []
    rows, figures = [], []
    for folder, r in sorted(runs.items(), key=lambda kv: (kv[1].attack, str(kv[1].seed))):
        a = agent_summary(folder, r, img_dir)
        reward = "-"
        if a.get("gain_over_random") is not None:
            reward = (
                f"{a['greedy_mean_reward']:.3f} / {a['random_mean_reward']:.3f} "
                f"({a['gain_over_random']:+.3f})"
            )
        rows.append(
            f"| {r.attack} | {r.seed} | {a.get('policy')} | {a.get('schedule') or '-'} | "
            f"{folder} | {_dash(a.get('images_visited'))}/{_dash(a.get('pool_images'))} | "
            f"{_dash(a.get('target_updates'))} | {reward} | {_pct(a.get('greedy_covered'))} | "
            f"{_pct(a.get('kept_covered'))} |"
        )
        figures += [Path(img_dir) / name for name in a["figures"]]
    head = (
        "| Attack | Seed | Policy | Agent schedule | Cleaning run | Pool images visited "
        "| Target-network updates "
        "| Mean reward, greedy agent / random policy (gain) | Greedy squares covering half the "
        "trigger (%) | Kept squares covering half the trigger (%) |\n" + "|---" * 10 + "|\n"
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
