"""Seeded poison-id selection and its JSON file."""

from __future__ import annotations

import json
import random

import pytest

from srd.attacks.poison import load_poison_ids, save_poison_ids, select_poison_ids
from srd.errors import SRDError


def test_count_sorted_subset() -> None:
    ids = list(range(1000, 1257))
    chosen = select_poison_ids(ids, 0.1, seed=0)
    assert len(chosen) == int(257 * 0.1) == 25
    assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)
    assert set(chosen) <= set(ids)
    assert select_poison_ids(ids, 1.0, seed=0) == ids
    # 25,015 captions at 10 % gives the reference's 2,501
    assert len(select_poison_ids(range(25015), 0.1, seed=3)) == 2501


def test_stable_across_calls_and_order() -> None:
    ids = list(range(500))
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    a = select_poison_ids(ids, 0.2, seed=42)
    assert a == select_poison_ids(ids, 0.2, seed=42)
    assert a == select_poison_ids(shuffled, 0.2, seed=42)
    assert a == select_poison_ids(tuple(reversed(ids)), 0.2, seed=42)
    assert a != select_poison_ids(ids, 0.2, seed=43)


def test_matches_random_sample_on_sorted_ids() -> None:
    ids = [9, 3, 7, 1, 5, 11, 2]
    assert select_poison_ids(ids, 0.5, seed=7) == sorted(random.Random(7).sample(sorted(ids), 3))


@pytest.mark.parametrize("rate", [0, 1.5, -1, float("nan"), "x"])
def test_bad_rate(rate: float) -> None:
    with pytest.raises(SRDError, match="--poison_rate"):
        select_poison_ids([1, 2, 3], rate, seed=0)


def test_empty_or_duplicate_candidates() -> None:
    with pytest.raises(SRDError, match="empty"):
        select_poison_ids([], 0.1, seed=0)
    with pytest.raises(SRDError, match="duplicate"):
        select_poison_ids([1, 2, 2], 0.5, seed=0)


def test_save_load_round_trip(tmp_path) -> None:
    ids = select_poison_ids(range(100), 0.1, seed=5)
    meta = {"attack": "badnet", "poison_rate": 0.1, "seed": 5, "num_candidates": 100}
    path = tmp_path / "run" / "poison_ids.json"
    save_poison_ids(path, ids, meta)
    assert load_poison_ids(path) == (ids, meta)
    assert not list(path.parent.glob(".*.tmp"))  # atomic write leaves no temp file


def test_load_errors(tmp_path) -> None:
    with pytest.raises(SRDError, match="missing.json"):
        load_poison_ids(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SRDError, match="broken.json"):
        load_poison_ids(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(SRDError, match="wrong.json"):
        load_poison_ids(wrong)
    path = tmp_path / "ids.json"
    save_poison_ids(path, [1, 2], {})
    data = json.loads(path.read_text())
    data["ids"] = ["1", 2]
    path.write_text(json.dumps(data))
    with pytest.raises(SRDError, match="ids.json"):
        load_poison_ids(path)
