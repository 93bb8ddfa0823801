"""Helpers for the SRD stage tests: stand-in captioners/scorers, exported tiny captioners, flags.

Not a conftest: test modules import what they need (``from srd_fixtures import ...``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from conftest import open_gates  # one definition, shared with the session fixtures

from srd.attacks.registry import build_attack
from srd.attacks.trainset import POISON_FILE, PoisonPlan, plan_poison
from srd.captioner.args import ModelArgs, model_signature
from srd.captioner.checkpoint import export_captioner, trainable_state_dict
from srd.captioner.factory import load_captioner
from srd.data.records import DataArgs, ImageRecord
from srd.geometry import NUM_ACTIONS, RED, Square, decode_action

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# Stand-ins that see the red square: caption = the action whose square is painted

_SQUARE_TO_ACTION: dict[Square, int] = {}
for _a in reversed(range(NUM_ACTIONS)):
    _SQUARE_TO_ACTION[decode_action(_a)] = _a  # the smallest action wins for repeated squares

REWARD_SCORES = {3: (1.0, 1.0), 2: (1.0, 0.2), 1: (1.0, 0.05), -1: (0.0, 0.0), -2: (-1.0, 0.0)}
"""(S_sem, S_flu) giving each reward against baselines (0, 0) with the reference thresholds."""


def painted_action(image: np.ndarray) -> int | None:
    """The action whose red square is on ``image`` (None when nothing is pure red)."""
    rows, cols = np.nonzero(np.all(image == np.array(RED, np.uint8), axis=-1))
    if len(rows) == 0:
        return None
    square = Square(int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
    return _SQUARE_TO_ACTION[square]


class StandInModels:
    """Captioner + reference captioner + scorer for the cleaning loop, counting their calls.

    The caption of a masked image is ``"act <a>"``; ``rewards[a]`` decides its reward (default -1);
    an unmasked image is captioned ``"plain"`` and scores (0, 0), the baseline.
    """

    def __init__(self, rewards: dict[int, int] | None = None, crash_after: int | None = None):
        self.rewards = rewards or {}
        self.crash_after = crash_after
        self.caption_calls: list[int] = []
        self.reference_calls: list[int] = []
        self.score_calls: list[int] = []

    def caption(self, images: list[np.ndarray]) -> list[str]:
        if self.crash_after is not None and len(self.caption_calls) >= self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        self.caption_calls.append(len(images))
        out = []
        for im in images:
            a = painted_action(im)
            out.append("plain" if a is None else f"act {a}")
        return out

    def reference(self, images: list[np.ndarray]) -> list[str]:
        self.reference_calls.append(len(images))
        return ["reference"] * len(images)

    def score(self, captions: list[str], references: list[str]) -> tuple[np.ndarray, np.ndarray]:
        self.score_calls.append(len(captions))
        sem, flu = [], []
        for c in captions:
            r = -1 if c == "plain" else self.rewards.get(int(c.split()[1]), -1)
            s, f = (0.0, 0.0) if c == "plain" else REWARD_SCORES[r]
            sem.append(s)
            flu.append(f)
        return np.array(sem), np.array(flu)


class ScriptedTries:
    """A try source returning fixed actions per image id."""

    def __init__(self, actions: dict[int, list[int]]):
        self.actions = actions

    def __call__(self, ids: Sequence[int], images: Sequence[np.ndarray]) -> list[list[int]]:
        return [list(self.actions[int(i)]) for i in ids]


def gray_images(ids: Sequence[int]) -> dict[int, np.ndarray]:
    """Plain images (never pure red) by id."""
    return {i: np.full((224, 224, 3), 40 + (i * 7) % 150, np.uint8) for i in ids}


# --------------------------------------------------------------------------------------------
# Exported captioners and the attack run's files


def export_clean_and_backdoor(make_captioner, folder: Path) -> tuple[ModelArgs, Path]:
    """(flags of an exported tiny "clean" captioner, path of a "backdoored" checkpoint).

    The clean one is exported like the pretrain stage does (vision weights + LM folder +
    checkpoint.pt); the backdoored checkpoint holds other trainable weights for the same
    model, in the training engine's format (as stage A's final_weights.pt).
    """
    clean_args = export_captioner(make_captioner(seed=11), folder / "clean")
    backdoored = load_captioner(clean_args)
    open_gates(backdoored, seed=12, noise=0.2)
    path = folder / "backdoor" / "final_weights.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model_state_dict": trainable_state_dict(backdoored.model),
            "config": {"model_signature": model_signature(clean_args)},
        },
        path,
    )
    return clean_args, path


def write_poison_ids(records: list[ImageRecord], folder: Path, attack: str = "badnet") -> Path:
    """A poison_ids.json as stage A writes it (seeded BadNet plan over ``records``)."""
    plan = plan_poison(records, build_attack(attack), seed=0)
    path = folder / POISON_FILE
    folder.mkdir(parents=True, exist_ok=True)
    plan.save(path)
    return path


def load_plan(path: Path) -> PoisonPlan:
    return PoisonPlan.load(path)


def data_flags(data: DataArgs) -> list[str]:
    return [f"--{k}={v}" for k, v in dataclasses.asdict(data).items()]


def model_flags(args: ModelArgs, checkpoint: Path | str) -> list[str]:
    """Model flags of ``args`` with another checkpoint."""
    flags = []
    for key, value in dataclasses.asdict(args).items():
        if key == "checkpoint_path":
            value = checkpoint
        if value is None or isinstance(value, bool):
            continue
        flags.append(f"--{key}={value}")
    return flags


BIT_EXACT = not torch.cuda.is_available()
"""Whether two runs of the same training can be compared bit for bit: on the CPU. CUDA kernels
are not deterministic by default (seen on an H100: resumed vs uninterrupted and cached vs
uncached weights differed), so there the tests check everything else."""


def torchrun_cpu_ranks(
    args: Sequence[str], timeout: float, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ARGS`` as two CPU ranks: no rank variables inherited from
    an outer launcher, one thread per rank, and the GPUs hidden (on a one-GPU machine the second
    rank would ask for a cuda:1 that is not there); ``env`` adds variables."""
    keep = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**keep, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env},
    )  # fmt: skip


def load_script(relative: str) -> ModuleType:
    """Import an entry-point script (train/... or eval/...) as a module."""
    path = REPO / relative
    name = "srd_test_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def run_entry_point(
    script: str, argv: Sequence[str], capsys: pytest.CaptureFixture
) -> tuple[int, str, str]:
    """Run an entry point in this process as its ``__main__`` block does (``srd.cli.run_main``):
    its exit code, stdout and stderr. A fresh interpreter spends ~10 s importing torch and the
    model libraries; the kill and multi-process tests run the scripts as real processes."""
    from srd.cli import run_main

    capsys.readouterr()
    try:
        run_main(load_script(script).main, list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module that imports this fixture (autouse there).

    Small convolutions on a shared 2-core machine are much faster single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
