"""The files of a training run folder: epoch checkpoints, final weights, and whether the folder
holds anything training computed (srd.captioner.engine writes them)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from srd.io import is_finished

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"
FINAL_WEIGHTS = "final_weights.pt"


def holds_training(run_dir: str | os.PathLike) -> bool:
    """Whether a run folder holds anything training computed (its DONE, an epoch checkpoint,
    final weights). A folder without any is what a run that failed or was killed before its
    first checkpoint left (its config, poison plan, initial LM, logs): a re-run with other
    flags replaces those instead of being refused, since nothing computed would be lost."""
    run_dir = Path(run_dir)
    return (
        is_finished(run_dir)
        or bool(checkpoint_paths(run_dir))
        or (run_dir / FINAL_WEIGHTS).exists()
    )


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Epoch checkpoints of a run, oldest first."""

    def epoch_of(p: Path) -> int:
        return int(p.stem[len(CHECKPOINT_PREFIX) :])

    found = [
        p
        for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*.pt")
        if p.stem[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=epoch_of)


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` epoch checkpoints (``keep`` 0: none deleted)."""
    if keep <= 0:
        return []
    old = checkpoint_paths(run_dir)[:-keep]
    for path in old:
        path.unlink(missing_ok=True)
        log.info("pruned %s (--save_total_limit %d)", path.name, keep)
    return old
