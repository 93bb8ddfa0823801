"""Benchmark: README command 1 on a fresh folder, then the rest of a one-attack comparison, with
each stage's wall time, the issue's summary table, the thread count and the machine's load.

    python bench/bench_chain.py                     # command 1 (one attack, badnet) + epochs
    python bench/bench_chain.py --comparison        # ... + every registry defense (run_defenses.sh)
    python bench/bench_chain.py --retrain           # command 1 trains the tiny CLIP and captioner
    python bench/bench_chain.py --attacks badnet trojvlm --keep /tmp/chain
    python bench/bench_chain.py --epochs_only       # only the cached vs uncached attack epoch,
                                                    # on this checkout's data and clean captioner

It lays out a fresh working folder (a copy of run/ and release/, links to train/ and eval/), runs
``run/run_embedded.sh`` there (setup skipped: the current interpreter's environment is used),
reads the stage lines the scripts print ("=== done: NAME (N s; total M s)"), with
``--comparison`` then runs ``run/run_defenses.sh`` on the first attack (the attack, its
evaluation and SRD's D1-D3 are command 1's, so the whole comparison is their stages plus this),
then trains the backdoor once more for two epochs with the feature cache and once without it,
and prints the second epoch's time of each (the cache fills during the first; read from
train_log.jsonl). Timings only mean something on a quiet machine: the load average is printed
at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from srd.budgets import ATTACK  # noqa: E402

DONE = re.compile(r"^((?:\[\S+\] )?)=== done: (.*) \((\d+) s; total (\d+) s\)$")
"""A stage line; a job's lines start with its name in brackets (run/common.sh)."""


def lay_out(work: Path) -> None:
    shutil.copytree(REPO / "run", work / "run")
    if (REPO / "release").is_dir():
        shutil.copytree(REPO / "release", work / "release")
    for name in ("train", "eval"):
        (work / name).symlink_to(REPO / name)


def run_script(work: Path, script: str, log_name: str, **extra: str) -> list[tuple[str, int]]:
    env = {
        **os.environ,
        "SRD_SKIP_SETUP": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }
    env.pop("SRD_T0", None)
    stages: list[tuple[str, int]] = []
    log = open(work / log_name, "w", encoding="utf-8")
    proc = subprocess.Popen(
        ["sh", script],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        match = DONE.match(line.strip())
        if match:
            name, seconds = match.group(1) + match.group(2), int(match.group(3))
            stages.append((name, seconds))
            print(f"{seconds:6d} s  {name}", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"{script} failed (exit {proc.returncode}); see {work / log_name}")
    return stages


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min)"


def stage_seconds(stages: list[tuple[str, int]], prefix: str) -> int | None:
    """The first stage whose name starts with ``prefix`` (None when the chain had none)."""
    return next((sec for name, sec in stages if name.startswith(prefix)), None)


def summary(
    chain: list[tuple[str, int]],
    chain_total: float,
    defenses: list[tuple[str, int]],
    defenses_total: float | None,
    attack: str,
) -> list[tuple[str, str]]:
    """The issue's table: command 1, the attack, one evaluation, one refine-tune, the comparison."""
    rows = [("README command 1 (setup skipped)", f"{chain_total:.0f}")]
    picks = [
        ("tiny CLIP + clean captioner (install or RETRAIN=1)", ("install", "pretrain")),
        (f"attack ({attack}, 6 epochs)", (f"backdoor training: {attack}",)),
        ("evaluation of the backdoored model", (f"evaluation: {attack}",)),
        ("one refine-tune (no_mask, 2 epochs)", ("defense: defense-no_mask-",)),
        ("its evaluation", ("evaluation: defense-no_mask-",)),
    ]
    everything = chain + defenses
    for label, prefixes in picks:
        if label.startswith("tiny CLIP"):  # every such stage (RETRAIN=1 has two)
            found = [sec for name, sec in chain if name.startswith(prefixes)]
        else:
            found = [f for f in (stage_seconds(everything, p) for p in prefixes) if f is not None]
        rows.append((label, str(sum(found)) if found else "-"))
    if defenses_total is not None:
        d1_d3 = sum(
            sec
            for name, sec in chain
            if re.match(r"D[123]b? ", name)  # the srd job's, in order
        )
        whole = (
            (stage_seconds(chain, f"backdoor training: {attack}") or 0)
            + (stage_seconds(chain, f"evaluation: {attack}") or 0)
            + d1_d3
            + defenses_total
        )
        rows.append(("whole one-attack comparison (attack, evaluation, D1-D3, defenses)",
                     f"{whole:.0f}"))  # fmt: skip
    return rows


def epoch_seconds(work: Path, attack: str, cache: bool) -> float:
    name = f"bench-epoch-{'cached' if cache else 'uncached'}"
    common = (work / "run" / "common.sh").read_text()
    data_flags = re.search(r'DATA_FLAGS=\$\{DATA_FLAGS:-"(.*?)"\}', common, re.S).group(1)
    model_flags = re.search(r'MODEL_FLAGS=\$\{MODEL_FLAGS:-"(.*?)"\}', common, re.S).group(1)
    embedded = "checkpoints_remote/embedded/clean"
    model_flags = model_flags.replace("$EMBEDDED", embedded)
    cmd = [
        sys.executable,
        "train/train_backdoor.py",
        *data_flags.replace("\\", " ").split(),
        *model_flags.replace("\\", " ").split(),
        "--checkpoint_path", f"{embedded}/checkpoint.pt",
        "--bd_attack_type", attack,
        "--run_name", name,
        "--num_epochs", "2",
        "--learning_rate", "1e-3",
        "--epoch_captions_per_image", str(ATTACK.epoch_captions_per_image),  # as the attack
        "--feature_cache" if cache else "--no-feature_cache",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=work, check=True, capture_output=True, text=True)
    log = (work / "checkpoints_remote" / name / "train_log.jsonl").read_text().splitlines()
    return float(json.loads(log[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=["badnet"])
    parser.add_argument("--no_srd", action="store_true", help="stop after the attacks")
    parser.add_argument(
        "--comparison",
        action="store_true",
        help="then every registry defense on the first attack (run/run_defenses.sh)",
    )
    parser.add_argument(
        "--retrain", action="store_true", help="command 1 trains the tiny CLIP and captioner"
    )
    parser.add_argument("--no_epochs", action="store_true", help="skip the epoch timing")
    parser.add_argument("--keep", default=None, help="work folder to use and keep (fresh)")
    parser.add_argument(
        "--epochs_only",
        action="store_true",
        help="skip the chain: time the attack epoch with and without the feature cache on this "
        "checkout's data/synthetic and checkpoints_remote/embedded (run command 1 first)",
    )
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="srd-chain-"))
    if work.exists() and any(work.iterdir()):
        raise SystemExit(
            f"error: --keep {work}: folder is not empty (the benchmark needs a fresh one)"
        )
    work.mkdir(parents=True, exist_ok=True)
    lay_out(work)
    import torch

    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, {load()}", flush=True)
    stages: list[tuple[str, int]] = []
    defenses: list[tuple[str, int]] = []
    total = defenses_total = None
    if args.epochs_only:
        needed = [REPO / "data" / "synthetic", REPO / "checkpoints_remote" / "embedded" / "clean"]
        missing = [str(p) for p in needed if not p.is_dir()]
        if missing:
            raise SystemExit(f"error: --epochs_only: {missing[0]} not found (run command 1 first)")
        (work / "data").symlink_to(needed[0].parent)
        (work / "checkpoints_remote").mkdir()
        (work / "checkpoints_remote" / "embedded").symlink_to(needed[1].parent)
    else:
        start = time.time()
        stages = run_script(
            work,
            "run/run_embedded.sh",
            "chain.log",
            ATTACKS=" ".join(args.attacks),
            SRD_ATTACKS="" if args.no_srd else " ".join(args.attacks),
            RETRAIN="1" if args.retrain else "0",
        )
        total = round(time.time() - start, 1)
        print(f"{int(total):6d} s  TOTAL ({len(stages)} stages, attacks: {' '.join(args.attacks)})")
        if args.comparison:
            start = time.time()
            defenses = run_script(
                work, "run/run_defenses.sh", "defenses.log", ATTACK=args.attacks[0], SEED="0"
            )
            defenses_total = round(time.time() - start, 1)
            print(f"{int(defenses_total):6d} s  TOTAL of run/run_defenses.sh", flush=True)
    epochs = {}
    if not args.no_epochs:
        cached = epoch_seconds(work, args.attacks[0], cache=True)
        uncached = epoch_seconds(work, args.attacks[0], cache=False)
        epochs = {"uncached": uncached, "cached": cached}
        print(
            f"attack epoch ({args.attacks[0]}): {uncached:.1f} s uncached, {cached:.1f} s with "
            f"the feature cache -> {uncached / cached:.1f}x"
        )
    rows = summary(stages, total, defenses, defenses_total, args.attacks[0]) if total else []
    if rows:
        print("\n| what | seconds |\n|---|---|")
        for label, seconds in rows:
            print(f"| {label} | {seconds} |")
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, {load()}")
    report = {
        "stages": stages,
        "total_seconds": total,
        "defense_stages": defenses,
        "defenses_total_seconds": defenses_total,
        "summary": rows,
        "attack_epoch_seconds": epochs,
        "work_dir": str(work),
    }
    (work / "bench_chain.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep:
        print(f"(work folder {work}; delete it when done)")


if __name__ == "__main__":
    main()
