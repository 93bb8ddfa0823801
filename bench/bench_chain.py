"""Benchmark: the embedded chain on a fresh folder, with each stage's wall time and the total,
then one attack epoch with and without the feature cache in the same run.

    python bench/bench_chain.py                     # one attack (badnet), as README command 1
    python bench/bench_chain.py --attacks badnet trojvlm --keep /tmp/chain
    python bench/bench_chain.py --epochs_only       # only the cached vs uncached attack epoch,
                                                    # on this checkout's data and clean captioner

It lays out a fresh working folder (a copy of run/, links to train/ and eval/), runs
``run/run_embedded.sh`` there (setup skipped: the current interpreter's environment is used),
reads the stage lines the scripts print ("=== done: NAME (N s; total M s)"), then trains the
backdoor once more for two epochs with the feature cache and once without it, and prints the
second epoch's time of each (the cache fills during the first; read from train_log.jsonl).
Timings only mean something on a quiet machine.
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
DONE = re.compile(r"^((?:\[\S+\] )?)=== done: (.*) \((\d+) s; total (\d+) s\)$")
"""A stage line; a job's lines start with its name in brackets (run/common.sh)."""


def lay_out(work: Path) -> None:
    shutil.copytree(REPO / "run", work / "run")
    for name in ("train", "eval"):
        (work / name).symlink_to(REPO / name)


def run_chain(work: Path, attacks: list[str], srd: bool) -> list[tuple[str, int]]:
    env = {
        **os.environ,
        "SRD_SKIP_SETUP": "1",
        "ATTACKS": " ".join(attacks),
        "SRD_ATTACKS": " ".join(attacks) if srd else "",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("SRD_T0", None)
    stages: list[tuple[str, int]] = []
    log = open(work / "chain.log", "w", encoding="utf-8")
    proc = subprocess.Popen(
        ["sh", "run/run_embedded.sh"],
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
        raise SystemExit(f"the chain failed (exit {proc.returncode}); see {work / 'chain.log'}")
    return stages


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
        "--feature_cache" if cache else "--no-feature_cache",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=work, check=True, capture_output=True, text=True)
    log = (work / "checkpoints_remote" / name / "train_log.jsonl").read_text().splitlines()
    return float(json.loads(log[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=["badnet"])
    parser.add_argument("--no_srd", action="store_true", help="stop after the attacks")
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
    stages: list[tuple[str, int]] = []
    total = None
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
        stages = run_chain(work, args.attacks, not args.no_srd)
        total = round(time.time() - start, 1)
        print(f"{int(total):6d} s  TOTAL ({len(stages)} stages, attacks: {' '.join(args.attacks)})")
    cached = epoch_seconds(work, args.attacks[0], cache=True)
    uncached = epoch_seconds(work, args.attacks[0], cache=False)
    print(
        f"attack epoch ({args.attacks[0]}): {uncached:.1f} s uncached, {cached:.1f} s with the "
        f"feature cache -> {uncached / cached:.1f}x"
    )
    report = {
        "stages": stages,
        "total_seconds": total,
        "attack_epoch_seconds": {"uncached": uncached, "cached": cached},
        "work_dir": str(work),
    }
    (work / "bench_chain.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep:
        print(f"(work folder {work}; delete it when done)")


if __name__ == "__main__":
    main()
