"""Cleaned-data shards (stage D3) and their merge (stage D3b), keyed by image id.

Each process cleans one contiguous block of the items (:func:`shard_indices`) and writes one
shard into a shared folder::

    shard-00001-of-00004.json                 manifest (written last, atomically)
    shard-00001-of-00004.chunk-00000.npz      optional: ids (k,), actions (k,), images (k,224,224,3)
    shard-00001-of-00004.chunk-00001.npz

The manifest holds the run id, a config hash, shard id/count, the ids assigned to the shard,
``complete``, and a list of chunks (``file`` or null, ``ids``, ``actions``, ``rewards``,
optional ``extras``). A chunk's npz is written before the manifest that lists it, so a killed
writer leaves at most an unlisted npz that the next chunk overwrites: on resume,
:class:`ShardWriter` skips every id already in the manifest, and no id is written twice.

:func:`merge_shards` joins the shards by id and fails loudly (SRDError) on a missing or
duplicated id, an unfinished or missing shard, or shards from different runs in one folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from srd.errors import SRDError
from srd.geometry import IMAGE_SIZE, NUM_ACTIONS
from srd.io import atomic_path, ensure_dir, read_json, write_json

log = logging.getLogger(__name__)

SHARD_FORMAT = "srd-clean-shard-v1"
MERGED_FORMAT = "srd-clean-merged-v1"
CLEAN_CONFIG = "clean_config.json"
"""Written into the shard folder by D3: the cleaning run's id, config hash and config."""
_MANIFEST_RE = re.compile(r"^shard-(\d+)-of-(\d+)\.json$")


def shard_name(shard_id: int, num_shards: int) -> str:
    return f"shard-{shard_id:05d}-of-{num_shards:05d}"


def _check_shard(shard_id: int, num_shards: int) -> None:
    if num_shards < 1:
        raise SRDError(f"--num_shards {num_shards}: must be at least 1")
    if not 0 <= shard_id < num_shards:
        raise SRDError(f"--shard_id {shard_id}: must be in [0, {num_shards})")


def shard_indices(n_items: int, shard_id: int, num_shards: int) -> range:
    """Contiguous block of item indices of one shard; sizes differ by at most one."""
    _check_shard(shard_id, num_shards)
    base, extra = divmod(n_items, num_shards)
    start = shard_id * base + min(shard_id, extra)
    return range(start, start + base + (1 if shard_id < extra else 0))


def config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a JSON-able config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class ShardWriter:
    """Writes one shard in chunks; re-opening it resumes where a killed run stopped.

    ``ids`` are the image ids assigned to this shard. An existing manifest must come from the
    same run (run id, config hash, shard numbering, assigned ids), otherwise SRDError.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        run_id: str,
        config_hash: str,
        shard_id: int,
        num_shards: int,
        ids: Sequence[str],
    ) -> None:
        _check_shard(shard_id, num_shards)
        assigned = [str(i) for i in ids]
        if len(set(assigned)) != len(assigned):
            raise ValueError("ids assigned to a shard must be unique")
        self.folder = ensure_dir(folder)
        self.name = shard_name(shard_id, num_shards)
        self.path = self.folder / f"{self.name}.json"
        fresh = {
            "format": SHARD_FORMAT,
            "run_id": run_id,
            "config_hash": config_hash,
            "shard_id": shard_id,
            "num_shards": num_shards,
            "assigned_ids": assigned,
            "complete": False,
            "chunks": [],
        }
        if self.path.exists():
            manifest = read_json(self.path)
            for key in ("format", "run_id", "config_hash", "shard_id", "num_shards"):
                if manifest.get(key) != fresh[key]:
                    raise SRDError(
                        f"{self.path}: written with {key}={manifest.get(key)!r}, this run has "
                        f"{fresh[key]!r} (use a new folder for a different run)"
                    )
            if manifest.get("assigned_ids") != assigned:
                raise SRDError(f"{self.path}: written for a different list of image ids")
            self.manifest: dict[str, Any] = manifest
            log.info(
                "%s: resuming, %d of %d ids done", self.path, len(self.done_ids), len(assigned)
            )
        else:
            self.manifest = fresh
            write_json(self.path, self.manifest)

    @property
    def done_ids(self) -> set[str]:
        return {i for chunk in self.manifest["chunks"] for i in chunk["ids"]}

    @property
    def pending_ids(self) -> list[str]:
        """Assigned ids not written yet, in assignment order."""
        done = self.done_ids
        return [i for i in self.manifest["assigned_ids"] if i not in done]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def write_chunk(
        self,
        ids: Sequence[str],
        actions: Sequence[int],
        rewards: Sequence[float],
        images: np.ndarray | None = None,
        extras: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Append results for ``ids`` (actions in [0, 500), rewards, optional masked images
        (k, 224, 224, 3) uint8 and JSON-able per-id extras); npz first, then the manifest."""
        ids = [str(i) for i in ids]
        k = len(ids)
        if not (len(actions) == len(rewards) == k) or (extras is not None and len(extras) != k):
            raise ValueError("ids, actions, rewards (and extras) must have the same length")
        if len(set(ids)) != k:
            raise ValueError("duplicate ids within one chunk")
        assigned = set(self.manifest["assigned_ids"])
        stray = [i for i in ids if i not in assigned]
        if stray:
            raise ValueError(f"ids not assigned to {self.name}: {stray[:5]}")
        again = sorted(set(ids) & self.done_ids)
        if again:
            raise ValueError(f"ids already written to {self.name}: {again[:5]}")
        action_list = [int(a) for a in actions]
        if any(not 0 <= a < NUM_ACTIONS for a in action_list):
            raise ValueError(f"actions must be in [0, {NUM_ACTIONS})")
        file_name = None
        if images is not None:
            images = np.asarray(images)
            if images.shape != (k, IMAGE_SIZE, IMAGE_SIZE, 3) or images.dtype != np.uint8:
                raise ValueError(f"images must be uint8 ({k}, 224, 224, 3), got {images.shape}")
            file_name = f"{self.name}.chunk-{len(self.manifest['chunks']):05d}.npz"
            with atomic_path(self.folder / file_name) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, ids=np.array(ids), actions=np.array(action_list), images=images)
        chunk: dict[str, Any] = {
            "file": file_name,
            "ids": ids,
            "actions": action_list,
            "rewards": [float(r) for r in rewards],
        }
        if extras is not None:
            chunk["extras"] = [dict(e) for e in extras]
        self.manifest["chunks"].append(chunk)
        write_json(self.path, self.manifest)

    def finish(self) -> dict[str, Any]:
        """Mark the shard complete (every assigned id written); returns the manifest."""
        pending = self.pending_ids
        if pending:
            raise ValueError(f"{self.name}: {len(pending)} ids not written yet, e.g. {pending[:3]}")
        if not self.manifest["complete"]:
            self.manifest["complete"] = True
            write_json(self.path, self.manifest)
        return self.manifest


def write_shard(
    folder: str | os.PathLike,
    run_id: str,
    config_hash: str,
    shard_id: int,
    num_shards: int,
    ids: Sequence[str],
    actions: Sequence[int],
    rewards: Sequence[float],
    images: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write a whole shard at once (resuming a partial one: written ids are skipped)."""
    writer = ShardWriter(folder, run_id, config_hash, shard_id, num_shards, ids)
    todo = set(writer.pending_ids)
    keep = [n for n, i in enumerate(ids) if str(i) in todo]
    if keep:
        writer.write_chunk(
            [ids[n] for n in keep],
            [actions[n] for n in keep],
            [rewards[n] for n in keep],
            None if images is None else np.asarray(images)[keep],
        )
    return writer.finish()


def _read_manifests(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    if not folder.is_dir():
        raise SRDError(f"{folder}: shard folder not found")
    paths = sorted(p for p in folder.iterdir() if _MANIFEST_RE.match(p.name))
    if not paths:
        raise SRDError(f"{folder}: no shard manifests (shard-*-of-*.json)")
    out = []
    for path in paths:
        manifest = read_json(path)
        if not isinstance(manifest, dict) or manifest.get("format") != SHARD_FORMAT:
            raise SRDError(f"{path}: not an SRD shard manifest")
        out.append((path, manifest))
    return out


def shard_sets(folder: str | os.PathLike) -> dict[int, bool]:
    """{shard count: whether all shards of that count are present and finished} for the shard
    manifests in ``folder`` (empty when there are none), so a stage can tell a run already
    cleaned with another process count from an unfinished one."""
    folder = Path(folder)
    if not folder.is_dir() or not any(_MANIFEST_RE.match(p.name) for p in folder.iterdir()):
        return {}
    finished: dict[int, set[int]] = {}
    for _, m in _read_manifests(folder):
        finished.setdefault(int(m["num_shards"]), set())
        if m.get("complete"):
            finished[int(m["num_shards"])].add(int(m["shard_id"]))
    return {n: done == set(range(n)) for n, done in finished.items()}


def merge_shards(
    folder: str | os.PathLike,
    expected_ids: Sequence[str],
    output: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Join a folder's shards by image id, checking that every expected id appears once.

    Returns (and writes to ``output`` when given) ``{"format", "run_id", "config_hash",
    "num_shards", "num_items", "records": [{"id", "action", "reward", "shard_id", "file",
    "row", ["extras"]}]}`` in ``expected_ids`` order; ``file``/``row`` locate the masked image
    (``file`` relative to ``folder``; null when the shards hold actions only).
    """
    folder = Path(folder)
    expected = [str(i) for i in expected_ids]
    if len(set(expected)) != len(expected):
        raise ValueError("expected_ids must be unique")
    manifests = _read_manifests(folder)

    runs = sorted({(m["run_id"], m["config_hash"], m["num_shards"]) for _, m in manifests})
    if len(runs) > 1:
        listed = "; ".join(f"run {r!r} config {h} ({n} shards)" for r, h, n in runs)
        raise SRDError(f"{folder}: shards from different runs in one folder: {listed}")
    run_id, cfg_hash, num_shards = runs[0]
    present = {m["shard_id"] for _, m in manifests}
    missing_shards = sorted(set(range(num_shards)) - present)
    if missing_shards:
        raise SRDError(f"{folder}: missing shard(s) {missing_shards} of {num_shards}")
    for path, m in manifests:
        if not m.get("complete"):
            raise SRDError(f"{path}: shard not finished (re-run that shard to resume it)")

    by_id: dict[str, dict[str, Any]] = {}
    for _, m in manifests:
        for chunk in m["chunks"]:
            for row, image_id in enumerate(chunk["ids"]):
                if image_id in by_id:
                    first = by_id[image_id]["shard_id"]
                    raise SRDError(
                        f"{folder}: image id {image_id!r} appears twice "
                        f"(shards {first} and {m['shard_id']})"
                    )
                record = {
                    "id": image_id,
                    "action": int(chunk["actions"][row]),
                    "reward": chunk["rewards"][row],
                    "shard_id": m["shard_id"],
                    "file": chunk["file"],
                    "row": row if chunk["file"] else None,
                }
                if "extras" in chunk:
                    record["extras"] = chunk["extras"][row]
                by_id[image_id] = record
    missing = [i for i in expected if i not in by_id]
    if missing:
        raise SRDError(
            f"{folder}: {len(missing)} expected image id(s) missing from the shards, "
            f"e.g. {missing[:5]}"
        )
    unexpected = sorted(set(by_id) - set(expected))
    if unexpected:
        raise SRDError(
            f"{folder}: {len(unexpected)} image id(s) in the shards were not expected, "
            f"e.g. {unexpected[:5]}"
        )
    merged = {
        "format": MERGED_FORMAT,
        "run_id": run_id,
        "config_hash": cfg_hash,
        "num_shards": num_shards,
        "num_items": len(expected),
        "records": [by_id[i] for i in expected],
    }
    if output is not None:
        write_json(output, merged)
    log.info("merged %d shards of run %s: %d ids", num_shards, run_id, len(expected))
    return merged


def iter_masked_images(
    folder: str | os.PathLike, merged: Mapping[str, Any]
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (id, masked image (224, 224, 3) uint8) of a merged manifest, one npz at a time."""
    folder = Path(folder)
    by_file: dict[str, list[dict[str, Any]]] = {}
    for record in merged["records"]:
        if record["file"] is None:
            raise SRDError(f"{folder}: shard of id {record['id']!r} stores no images")
        by_file.setdefault(record["file"], []).append(record)
    for name, records in by_file.items():
        path = folder / name
        if not path.is_file():
            raise SRDError(f"{path}: shard chunk file missing")
        with np.load(path, allow_pickle=False) as data:
            ids, images = data["ids"], data["images"]
            for record in records:
                if str(ids[record["row"]]) != record["id"]:
                    raise SRDError(f"{path}: row {record['row']} is not id {record['id']!r}")
                yield record["id"], np.array(images[record["row"]])
