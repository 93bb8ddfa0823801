"""The RL mask pool (stage D1): surrogate stamping, building, saving and loading."""

from __future__ import annotations

import json

import numpy as np
import pytest

from srd.errors import SRDError
from srd.pool import (
    POOL_IMAGES,
    POOL_JSON,
    build_pool_rows,
    choose_pool_ids,
    load_pool,
    read_pool_info,
    save_pool,
    surrogate_image,
)
from srd.rl.env import MaskPool
from srd.triggers import NOISE_PATCH_SIZE

IDS = [5, 17, 2, 40]


def clean_image(image_id: int) -> np.ndarray:
    return np.random.default_rng(image_id).integers(0, 100, (224, 224, 3), dtype=np.uint8)


def vlm(images: list[np.ndarray]) -> list[str]:
    return [f"mean {int(im.mean())}" for im in images]


def reference(images: list[np.ndarray]) -> list[str]:
    return [f"reference {int(im[0, 0, 0])}" for im in images]


def score(captions: list[str], references: list[str]) -> tuple[np.ndarray, np.ndarray]:
    sem = np.array([len(c) / 100 for c in captions])
    return sem, sem + 0.5


def rows(seed: int = 0, chunk_size: int = 3):
    return build_pool_rows(IDS, clean_image, vlm, reference, score, seed, chunk_size, False)


def test_surrogate_trigger_is_seeded_per_image_and_small() -> None:
    image = clean_image(1)
    a, b = surrogate_image(image, 7, seed=0), surrogate_image(image, 7, seed=0)
    assert np.array_equal(a, b) and not np.array_equal(a, image)
    assert not np.array_equal(a, surrogate_image(image, 8, seed=0))
    assert not np.array_equal(a, surrogate_image(image, 7, seed=1))
    changed = np.any(a != image, axis=-1)
    assert 0 < changed.sum() <= NOISE_PATCH_SIZE**2


def test_rows_do_not_depend_on_chunking() -> None:
    one, many = rows(chunk_size=1), rows(chunk_size=4)
    assert [r.image_id for r in one] == IDS
    for x, y in zip(one, many, strict=True):
        assert np.array_equal(x.image, y.image) and x.vlm_caption == y.vlm_caption
        assert (x.base_sem, x.base_flu, x.reference) == (y.base_sem, y.base_flu, y.reference)
    box = one[0].surrogate_box
    assert box is not None and box[1] - box[0] <= NOISE_PATCH_SIZE >= box[3] - box[2]


def test_save_load_round_trip(tmp_path) -> None:
    built = rows()
    folder = save_pool(tmp_path / "pool", built, meta={"checkpoint_path": "ckpt.pt"})
    pool = load_pool(folder)
    assert isinstance(pool, MaskPool) and len(pool) == len(IDS)
    by_id = {r.image_id: r for r in built}
    assert pool.ids == [str(i) for i in sorted(IDS)]  # rows are stored sorted by image id
    for k, image_id in enumerate(sorted(IDS)):
        row = by_id[image_id]
        assert np.array_equal(pool.images[k], row.image)
        assert pool.base_sem[k] == row.base_sem and pool.base_flu[k] == row.base_flu
        assert pool.references[k] == row.reference
    info = read_pool_info(folder)
    assert info["vlm_captions"] == [by_id[i].vlm_caption for i in sorted(IDS)]
    assert info["meta"]["checkpoint_path"] == "ckpt.pt"
    assert info["surrogate"]["trigger"] == "random_noise" and len(info["surrogate"]["boxes"]) == 4


def test_choose_pool_ids() -> None:
    ids = list(range(100, 130))
    assert choose_pool_ids(ids, -1, 0) == ids
    picked = choose_pool_ids(ids, 5, 0)
    assert picked == sorted(picked) and len(set(picked)) == 5 and set(picked) <= set(ids)
    assert picked == choose_pool_ids(list(reversed(ids)), 5, 0)
    assert picked != choose_pool_ids(ids, 5, 1)
    for bad in (0, 31, -2):
        with pytest.raises(SRDError, match="--pool_size"):
            choose_pool_ids(ids, bad, 0)


def test_bad_pools_name_the_file(tmp_path) -> None:
    with pytest.raises(SRDError, match="no_pool: pool folder not found"):
        load_pool(tmp_path / "no_pool")
    folder = save_pool(tmp_path / "pool", rows())

    (folder / "DONE").unlink()
    with pytest.raises(SRDError, match="unfinished"):
        load_pool(folder)
    (folder / "DONE").write_text("done\n")

    info = json.loads((folder / POOL_JSON).read_text())
    short = {**info, "references": info["references"][:-1]}
    (folder / POOL_JSON).write_text(json.dumps(short))
    with pytest.raises(SRDError, match=rf"{POOL_JSON}: 'references' has 3 entries for 4 ids"):
        load_pool(folder)

    fewer = {**info, **{k: info[k][:-1] for k in ("ids", "base_sem", "base_flu", "references",
                                                  "vlm_captions")}}  # fmt: skip
    (folder / POOL_JSON).write_text(json.dumps(fewer))
    with pytest.raises(SRDError, match=rf"{POOL_IMAGES}: holds 4 images but {POOL_JSON} lists 3"):
        load_pool(folder)

    (folder / POOL_JSON).write_text(json.dumps(info))
    (folder / POOL_IMAGES).unlink()
    with pytest.raises(SRDError, match=rf"{POOL_IMAGES}: file not found"):
        load_pool(folder)

    (folder / POOL_JSON).write_text("{not json")
    with pytest.raises(SRDError, match=rf"{POOL_JSON}: not valid JSON"):
        load_pool(folder)


def test_empty_pool_is_refused(tmp_path) -> None:
    with pytest.raises(SRDError, match="empty pool"):
        save_pool(tmp_path / "pool", [])
    assert not (tmp_path / "pool").exists()
