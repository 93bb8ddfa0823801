"""Stage D3b merges the cleaning shards (:func:`combine_clean_data`, nothing missing or
duplicated); stage D4 turns the merged actions back into masked images by image id
(:func:`masked_training_actions`, reference B15: one masked image per image id, captions kept)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from srd.data.records import ImageRecord
from srd.defenses.srd.shards import CLEAN_CONFIG, MERGED_FORMAT, merge_shards
from srd.errors import SRDError
from srd.io import file_digest, read_json, write_json

log = logging.getLogger(__name__)


MERGED_FILE = "merged.json"
"""Written into the shard folder by D3b: one record (action, reward, ...) per image id."""


# --------------------------------------------------------------------------------------------
# Merging (D3b) and use (D4)
def combine_clean_data(folder: str | os.PathLike, expected_ids: Sequence[int]) -> dict[str, Any]:
    """Merge the shards of ``folder`` into ``folder/merged.json`` (every expected id once).

    The merged record carries the cleaning run's config (``clean_config.json``), so D4 can check
    it refines on the same poisoned data.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SRDError(f"--clean_data_save {folder}: shard folder not found (run stage D3 first)")
    merged = merge_shards(folder, [str(i) for i in expected_ids])
    config_path = folder / CLEAN_CONFIG
    run = read_json(config_path, flag="--clean_data_save")
    if not isinstance(run, dict) or run.get("config_hash") != merged["config_hash"]:
        raise SRDError(f"--clean_data_save {config_path}: does not describe the shards' run")
    merged["clean_config"] = run
    rewards = np.array([r["reward"] for r in merged["records"]], dtype=np.float64)
    merged["reward_counts"] = {
        str(int(v)): int((rewards == v).sum()) for v in sorted(set(rewards.tolist()))
    }
    write_json(folder / MERGED_FILE, merged)
    log.info("merged %d images into %s", len(merged["records"]), folder / MERGED_FILE)
    return merged


def read_merged(folder: str | os.PathLike) -> dict[str, Any]:
    """``merged.json`` of a shard folder; SRDError naming the file when absent or malformed."""
    path = Path(folder) / MERGED_FILE
    if not path.is_file():
        raise SRDError(
            f"--clean_data_save {path}: file not found (run train/combine_data.py after D3)"
        )
    merged = read_json(path, flag="--clean_data_save")
    if not isinstance(merged, dict) or merged.get("format") != MERGED_FORMAT:
        raise SRDError(f"--clean_data_save {path}: not a merged cleaning manifest")
    return merged


def check_cleaning_run(
    merged: Mapping[str, Any],
    checkpoint: str,
    poison_ids_path: str,
    benign_control: bool,
    source: str = "merged manifest",
) -> None:
    """SRDError unless the cleaning run (D1-D3b) behind ``merged`` was made with this model
    (``checkpoint``), this poisoned data (``poison_ids_path``) and the same ``--benign_control``:
    a refine-tune on squares chosen for another model or data would run without a word."""
    config = merged.get("clean_config", {}).get("config", {})
    if config.get("poison_ids_sha256") != file_digest(poison_ids_path):
        raise SRDError(
            f"{source}: cleaned from other poisoned data than --poison_ids_path {poison_ids_path}"
        )
    made_with = config.get("checkpoint_sha256")
    if made_with is not None and made_with != file_digest(checkpoint):
        raise SRDError(
            f"{source}: made with {config.get('checkpoint_path')}, not --checkpoint_path "
            f"{checkpoint}"
        )
    if bool(config.get("benign_control", False)) != benign_control:
        made = "as" if config.get("benign_control") else "not as"
        raise SRDError(
            f"{source}: made {made} the benign control; pass the same --benign_control to D4"
        )


def masked_training_actions(
    records: Sequence[ImageRecord], merged: Mapping[str, Any], source: str = "merged manifest"
) -> dict[int, int]:
    """{image id: kept red-mask action} for every training image, checked to cover them all."""
    actions = {int(r["id"]): int(r["action"]) for r in merged["records"]}
    wanted = {r.image_id for r in records}
    if set(actions) != wanted:
        missing = sorted(wanted - set(actions))
        extra = sorted(set(actions) - wanted)
        raise SRDError(
            f"{source}: does not cover the training images ({len(missing)} missing, "
            f"{len(extra)} unknown, e.g. {(missing or extra)[:3]})"
        )
    return actions
