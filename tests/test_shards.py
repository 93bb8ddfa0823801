"""Cleaned-data shards: partitioning, resumable writing, and a merge that fails loudly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from srd.defenses.srd.shards import (
    ShardWriter,
    config_hash,
    iter_masked_images,
    merge_shards,
    shard_indices,
    write_shard,
)
from srd.errors import SRDError
from srd.geometry import IMAGE_SIZE, apply_action

IDS = [f"{100 + k}.jpg" for k in range(11)]
RUN = "run-a"
HASH = config_hash({"policy": "p.zip", "n_tries": 5})


def base_image(image_id: str) -> np.ndarray:
    seed = int(image_id.split(".")[0])
    return np.random.default_rng(seed).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def clean(image_id: str) -> tuple[int, float, np.ndarray]:
    """Stand-in for the policy: a deterministic action per id and its masked image."""
    action = int(image_id.split(".")[0]) * 7 % 500
    return action, float(action % 5 - 2), apply_action(base_image(image_id), action)


class Crash(Exception):
    pass


def run_shard(
    folder: Path, shard_id: int, num_shards: int, chunk: int = 2, crash_after: int | None = None
) -> list[str]:
    """A D3 worker: cleans its pending ids in chunks; returns the ids it processed."""
    mine = [IDS[i] for i in shard_indices(len(IDS), shard_id, num_shards)]
    writer = ShardWriter(folder, RUN, HASH, shard_id, num_shards, mine)
    processed: list[str] = []
    pending = writer.pending_ids
    for start in range(0, len(pending), chunk):
        if crash_after is not None and start >= crash_after:
            raise Crash
        ids = pending[start : start + chunk]
        results = [clean(i) for i in ids]
        processed.extend(ids)
        writer.write_chunk(
            ids, [r[0] for r in results], [r[1] for r in results], np.stack([r[2] for r in results])
        )
    writer.finish()
    return processed


def test_shard_indices_partition_the_items() -> None:
    for n, k in [(11, 3), (3, 5), (0, 2), (10, 1)]:
        blocks = [shard_indices(n, s, k) for s in range(k)]
        assert [i for b in blocks for i in b] == list(range(n))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(SRDError, match="--shard_id 3"):
        shard_indices(10, 3, 3)
    with pytest.raises(SRDError, match="--num_shards 0"):
        shard_indices(10, 0, 0)


def test_merge_joins_by_id_and_loads_the_images(tmp_path: Path) -> None:
    for s in (2, 0, 1):  # order of completion does not matter
        run_shard(tmp_path, s, 3)
    expected = list(reversed(IDS))
    merged = merge_shards(tmp_path, expected, output=tmp_path / "merged.json")
    assert (tmp_path / "merged.json").is_file()
    assert merged["run_id"] == RUN and merged["config_hash"] == HASH
    assert [r["id"] for r in merged["records"]] == expected
    for record in merged["records"]:
        action, reward, _ = clean(record["id"])
        assert (record["action"], record["reward"]) == (action, reward)
    images = dict(iter_masked_images(tmp_path, merged))
    assert sorted(images) == sorted(IDS)
    for image_id, image in images.items():
        np.testing.assert_array_equal(image, clean(image_id)[2])


def test_merge_detects_a_missing_id(tmp_path: Path) -> None:
    for s in range(3):
        run_shard(tmp_path, s, 3)
    with pytest.raises(SRDError, match=r"1 expected image id\(s\) missing.*999.jpg"):
        merge_shards(tmp_path, IDS + ["999.jpg"])
    with pytest.raises(SRDError, match="not expected.*110.jpg"):
        merge_shards(tmp_path, IDS[:-1])


def test_merge_detects_a_missing_or_unfinished_shard(tmp_path: Path) -> None:
    run_shard(tmp_path, 0, 3)
    run_shard(tmp_path, 2, 3)
    with pytest.raises(SRDError, match=r"missing shard\(s\) \[1\] of 3"):
        merge_shards(tmp_path, IDS)
    with pytest.raises(Crash):
        run_shard(tmp_path, 1, 3, crash_after=2)
    with pytest.raises(SRDError, match="shard-00001-of-00003.json: shard not finished"):
        merge_shards(tmp_path, IDS)


def test_merge_detects_a_duplicated_id(tmp_path: Path) -> None:
    # Two shards of the same run that both cleaned "104.jpg" (e.g. a wrong id split).
    a, b = IDS[:5], IDS[4:]
    for shard_id, ids in ((0, a), (1, b)):
        results = [clean(i) for i in ids]
        write_shard(
            tmp_path, RUN, HASH, shard_id, 2, ids, [r[0] for r in results], [0.0] * len(ids)
        )
    with pytest.raises(SRDError, match=r"'104.jpg' appears twice \(shards 0 and 1\)"):
        merge_shards(tmp_path, IDS)


def test_merge_detects_mixed_runs(tmp_path: Path) -> None:
    run_shard(tmp_path, 0, 2)
    run_shard(tmp_path, 1, 2)
    ids = [IDS[i] for i in shard_indices(len(IDS), 1, 2)]
    other = tmp_path / "other"
    write_shard(other, "run-b", HASH, 1, 2, ids, [1] * len(ids), [0.0] * len(ids))
    (other / "shard-00001-of-00002.json").replace(tmp_path / "shard-00001-of-00002.json")
    with pytest.raises(SRDError, match="different runs.*run-a.*run-b"):
        merge_shards(tmp_path, IDS)


def test_merge_detects_a_config_change_and_other_shard_counts(tmp_path: Path) -> None:
    run_shard(tmp_path, 0, 1)
    ids = IDS[:3]
    write_shard(tmp_path, RUN, "other-hash", 0, 2, ids, [1, 2, 3], [0.0, 0.0, 0.0])
    with pytest.raises(SRDError, match="different runs"):
        merge_shards(tmp_path, IDS)


def test_interrupted_writer_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    for s in range(2):
        run_shard(reference, s, 2)

    resumed = tmp_path / "resumed"
    with pytest.raises(Crash):
        run_shard(resumed, 0, 2, chunk=2, crash_after=4)  # killed after two chunks (4 ids)
    # A kill between a chunk's npz and its manifest update leaves an unlisted npz behind.
    (resumed / "shard-00000-of-00002.chunk-00002.npz").write_bytes(b"half-written")
    again = run_shard(resumed, 0, 2, chunk=2)
    mine = [IDS[i] for i in shard_indices(len(IDS), 0, 2)]
    assert again == mine[4:]  # only the unfinished ids are redone
    run_shard(resumed, 1, 2)

    merged = merge_shards(resumed, IDS)
    expected = merge_shards(reference, IDS)
    assert [r["id"] for r in merged["records"]] == IDS
    assert [(r["action"], r["reward"]) for r in merged["records"]] == [
        (r["action"], r["reward"]) for r in expected["records"]
    ]
    images = dict(iter_masked_images(resumed, merged))
    for image_id in IDS:
        np.testing.assert_array_equal(images[image_id], clean(image_id)[2])
    # Re-running a finished shard does nothing.
    assert run_shard(resumed, 0, 2) == []


def test_writer_refuses_another_run_and_repeated_ids(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, RUN, HASH, 0, 1, IDS[:3])
    writer.write_chunk(IDS[:1], [1], [0.0])
    with pytest.raises(ValueError, match="already written"):
        writer.write_chunk(IDS[:2], [1, 2], [0.0, 0.0])
    with pytest.raises(ValueError, match="not assigned"):
        writer.write_chunk(["nope"], [1], [0.0])
    with pytest.raises(SRDError, match="run_id='run-a'.*'run-b'"):
        ShardWriter(tmp_path, "run-b", HASH, 0, 1, IDS[:3])
    with pytest.raises(SRDError, match="different list of image ids"):
        ShardWriter(tmp_path, RUN, HASH, 0, 1, IDS[:4])


def test_actions_only_shards_merge_without_images(tmp_path: Path) -> None:
    write_shard(tmp_path, RUN, HASH, 0, 1, IDS, [3] * len(IDS), [1.0] * len(IDS))
    merged = merge_shards(tmp_path, IDS)
    assert {r["file"] for r in merged["records"]} == {None}
    with pytest.raises(SRDError, match="stores no images"):
        next(iter_masked_images(tmp_path, merged))


def test_merge_of_an_empty_folder_fails(tmp_path: Path) -> None:
    with pytest.raises(SRDError, match="no shard manifests"):
        merge_shards(tmp_path, IDS)
    with pytest.raises(SRDError, match="shard folder not found"):
        merge_shards(tmp_path / "absent", IDS)


def test_config_hash_ignores_key_order() -> None:
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
