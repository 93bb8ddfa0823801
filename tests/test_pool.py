"""The RL mask pool (stage D1): surrogate stamping, building, per-process shards, and stage D2's
streamed reading of them (images re-derived on demand, the env's observations unchanged)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from srd_fixtures import write_poison_ids

from srd.attacks.trainset import PoisonPlan, plan_attack
from srd.attacks.triggers import NOISE_PATCH_SIZE
from srd.data.records import ImageStore
from srd.defenses.srd.env import MaskPool
from srd.defenses.srd.inputs import training_versions
from srd.defenses.srd.pool import (
    POOL_JSON,
    build_pool_rows,
    choose_pool_ids,
    finish_pool,
    image_checksum,
    load_pool,
    read_pool_info,
    save_pool,
    shard_file,
    surrogate_image,
    write_pool_shard,
)
from srd.defenses.srd.pool_source import data_pool_rows, pool_image_fn, stream_pool
from srd.defenses.srd.vecenv import BatchedRedMaskVecEnv
from srd.errors import SRDError
from srd.io import file_digest

IDS = [5, 17, 2, 40]
SEED = 0


def clean_image(image_id: int) -> np.ndarray:
    return np.random.default_rng(image_id).integers(0, 100, (224, 224, 3), dtype=np.uint8)


def stamped(image_id: int) -> np.ndarray:
    return surrogate_image(clean_image(image_id), image_id, SEED)


def vlm(images: list[np.ndarray]) -> list[str]:
    return [f"mean {int(im.mean())}" for im in images]


def reference(images: list[np.ndarray]) -> list[str]:
    return [f"reference {int(im[0, 0, 0])}" for im in images]


def score(captions: list[str], references: list[str]) -> tuple[np.ndarray, np.ndarray]:
    sem = np.array([len(c) / 100 for c in captions])
    return sem, sem + 0.5


def rows(ids=IDS, chunk_size: int = 3):
    return build_pool_rows(ids, clean_image, vlm, reference, score, SEED, chunk_size, False)


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
    assert one == many
    assert [r.checksum for r in one] == [image_checksum(stamped(i)) for i in IDS]
    box = one[0].surrogate_box
    assert box is not None and box[1] - box[0] <= NOISE_PATCH_SIZE >= box[3] - box[2]


def test_save_load_round_trip(tmp_path) -> None:
    built = rows()
    folder = save_pool(tmp_path / "pool", built, meta={"checkpoint_path": "ckpt.pt"}, seed=SEED)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["DONE", POOL_JSON, shard_file(0, 1)])
    pool = load_pool(folder, stamped)
    assert len(pool) == len(IDS)
    by_id = {r.image_id: r for r in built}
    assert pool.ids == [str(i) for i in sorted(IDS)]  # entries in image-id order
    for k, image_id in enumerate(sorted(IDS)):
        row, record = by_id[image_id], pool[k]
        assert np.array_equal(record.image, stamped(image_id))
        assert (record.base_sem, record.base_flu) == (row.base_sem, row.base_flu)
        assert record.reference == row.reference and pool.vlm_captions[k] == row.vlm_caption
        assert pool.surrogate_boxes[k] == row.surrogate_box
    info = read_pool_info(folder)
    assert info["meta"]["checkpoint_path"] == "ckpt.pt" and info["num_images"] == 4
    assert info["surrogate"]["trigger"] == "random_noise" and info["surrogate"]["seed"] == SEED
    shard = json.loads((folder / shard_file(0, 1)).read_text())
    assert "images" not in shard and len(shard["checksums"]) == 4


def test_two_shards_hold_the_same_pool_as_one(tmp_path) -> None:
    """Two processes' shards (split as D1 splits them) read back as the one-process pool."""
    one = load_pool(save_pool(tmp_path / "one", rows(), seed=SEED, config_hash="h"), stamped)
    two = tmp_path / "two"
    ordered = sorted(IDS)
    for k, part in enumerate((ordered[:2], ordered[2:])):
        write_pool_shard(two, k, 2, rows(part), "h", "surrogate")
    finish_pool(two, 2, "h", "surrogate", seed=SEED, expected_ids=IDS)
    info = read_pool_info(two)
    assert [s["num_images"] for s in info["shards"]] == [2, 2]
    pool = load_pool(two, stamped)
    assert pool.ids == one.ids and pool.references == one.references
    assert np.array_equal(pool.base_sem, one.base_sem)
    assert np.array_equal(pool.base_flu, one.base_flu)
    assert pool.checksums == one.checksums and pool.surrogate_boxes == one.surrogate_boxes
    with pytest.raises(SRDError, match="do not hold the chosen pool ids"):
        finish_pool(two, 2, "h", "surrogate", seed=SEED, expected_ids=[*IDS, 99])


def test_a_data_pool_has_no_surrogate_block(tmp_path) -> None:
    built = data_pool_rows(IDS, clean_image, vlm, reference, score, 2, False)
    folder = save_pool(tmp_path / "pool", built, source="data", seed=None)
    info = read_pool_info(folder)
    assert info["source"] == "data" and "surrogate" not in info
    assert "surrogate_boxes" not in json.loads((folder / shard_file(0, 1)).read_text())
    pool = load_pool(folder, clean_image)
    assert pool.surrogate_boxes is None and np.array_equal(pool[0].image, clean_image(2))


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


def _two_shard_pool(folder):
    ordered = sorted(IDS)
    for k, part in enumerate((ordered[:2], ordered[2:])):
        write_pool_shard(folder, k, 2, rows(part), "h", "surrogate")
    return finish_pool(folder, 2, "h", "surrogate", seed=SEED)


def test_bad_pools_name_the_folder(tmp_path) -> None:
    with pytest.raises(SRDError, match="no_pool: pool folder not found"):
        load_pool(tmp_path / "no_pool", stamped)
    good = _two_shard_pool(tmp_path / "good")

    def broken(name: str):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        return folder

    def refused(folder, *fragments: str) -> None:
        with pytest.raises(SRDError) as exc:
            load_pool(folder, stamped)
        message = str(exc.value)
        assert "\n" not in message and str(folder) in message, message
        assert all(f in message for f in fragments), message

    folder = broken("unfinished")
    (folder / "DONE").unlink()
    refused(folder, "unfinished")

    folder = broken("missing")
    (folder / shard_file(1, 2)).unlink()
    refused(folder, f"shard {shard_file(1, 2)} missing")

    folder = broken("stray")
    shutil.copy(folder / shard_file(0, 2), folder / shard_file(0, 3))
    refused(folder, f"{shard_file(0, 3)} is not one of this pool's 2 shard(s)")

    folder = broken("other_run")
    write_pool_shard(folder, 1, 2, rows(sorted(IDS)[2:]), "another", "surrogate")
    refused(folder, shard_file(1, 2), "config_hash 'another'", "another D1 run")

    folder = broken("partial")
    write_pool_shard(folder, 1, 2, rows(sorted(IDS)[3:]), "h", "surrogate")
    refused(folder, shard_file(1, 2), "holds 1 entries", "lists 2")

    folder = broken("truncated")
    text = (folder / shard_file(0, 2)).read_text()
    (folder / shard_file(0, 2)).write_text(text[: len(text) // 2])
    refused(folder, shard_file(0, 2), "not valid JSON")

    folder = broken("short_column")
    shard = json.loads((folder / shard_file(0, 2)).read_text())
    (folder / shard_file(0, 2)).write_text(json.dumps({**shard, "checksums": [1]}))
    refused(folder, "'checksums' has 1 entries for 2 ids")

    folder = broken("duplicated")
    for k in (0, 1):
        write_pool_shard(folder, k, 2, rows(sorted(IDS)[1:3]), "h", "surrogate")
    refused(folder, f"image id {sorted(IDS)[1]} is in two shards")

    folder = broken("old_format")
    info = json.loads((folder / POOL_JSON).read_text())
    (folder / POOL_JSON).write_text(json.dumps({**info, "format": "srd-mask-pool-v1"}))
    refused(folder, "not a mask pool", "--overwrite")

    # An image that is not the one D1 scored (data changed since) is refused when it is needed.
    pool = load_pool(good, lambda i: clean_image(i))
    with pytest.raises(SRDError, match=f"{good}: the image of id 2 differs"):
        pool[0]


def test_empty_pool_is_refused(tmp_path) -> None:
    with pytest.raises(SRDError, match="empty pool"):
        save_pool(tmp_path / "pool", [])
    assert not (tmp_path / "pool").exists()


# --------------------------------------------------------------------------------------------
# Stage D2 on the tiny benchmark: streamed images, the same observations as an in-memory pool


@pytest.mark.parametrize("source", ["surrogate", "data"])
def test_streamed_pool_gives_the_env_the_same_observations(
    source, tmp_path, tiny_data_args, tiny_train_records
) -> None:
    records = tiny_train_records
    ids = sorted(r.image_id for r in records)
    store = ImageStore(records)
    meta = {"checkpoint_path": "ckpt.pt"}
    if source == "surrogate":
        built = build_pool_rows(ids, store, vlm, reference, score, SEED, 5, False)

        def image_of(i: int) -> np.ndarray:
            return surrogate_image(store(i), i, SEED)
    else:
        poison = write_poison_ids(records, tmp_path / "attack")
        plan = PoisonPlan.load(poison)
        image_of = training_versions(records, plan, plan_attack(plan, poison))
        built = data_pool_rows(ids, image_of, vlm, reference, score, 5, False)
        meta |= {"poison_ids_path": str(poison), "poison_ids_sha256": file_digest(poison)}
    data = {k: v for k, v in dataclasses.asdict(tiny_data_args).items() if k != "image_cache_mb"}
    folder = save_pool(tmp_path / "pool", built, meta, source, SEED, data)

    # The pool as D2 held it before: every image in memory, in id order.
    before = MaskPool(
        images=np.stack([image_of(i) for i in ids]),
        base_sem=[r.base_sem for r in built],
        base_flu=[r.base_flu for r in built],
        references=[r.reference for r in built],
        ids=ids,
    )
    # Streamed, with a cache of about two decoded images (fewer than the environments).
    info = read_pool_info(folder)
    derive = pool_image_fn(folder, info, ids, cache_mb=0.3)
    loaded: list[int] = []

    def counting(image_id: int) -> np.ndarray:
        loaded.append(image_id)
        return derive(image_id)

    streamed = load_pool(folder, counting)
    assert loaded == [] and len(streamed) == len(ids) == 24  # nothing read up front
    assert len(stream_pool(folder, 0.3)) == 24

    def run(pool) -> list:
        env = BatchedRedMaskVecEnv(pool, vlm, score, num_envs=3, max_steps=4, obs_size=36, seed=7)
        out = [env.reset()]
        for actions in np.random.default_rng(1).integers(0, 500, (12, 3)):
            obs, rewards, dones, infos = env.step(actions)
            for info in infos:
                info.pop("episode", None)  # wall-clock time
            out.append((obs, rewards, dones, infos))
        return out

    for a, b in zip(run(before), run(streamed), strict=True):
        np.testing.assert_equal(a, b)
    assert len(loaded) == 3 + 3 * 3  # one load per episode: 3 first resets, 3 more per env

    if source == "data":  # a poison plan changed since D1 is refused, naming it
        (tmp_path / "attack" / "poison_ids.json").write_text("{}")
        with pytest.raises(SRDError, match="--poison_ids_path .*changed since stage D1"):
            stream_pool(folder, 0.3)


def test_an_independent_reference_captions_with_its_own_weights(
    make_captioner, tiny_images, tmp_path
) -> None:
    """D1-D3's ``--reference_model_dir``: the reward reference is the exported folder's captioner
    (its own LM, vision tower and trainable parts: issue 28 item 2). The older flag,
    ``--reference_checkpoint_path``, loads a checkpoint into the defended model's LM and tower,
    so another captioner's checkpoint is refused there (its recorded weights differ)."""
    from srd.captioner.checkpoint import export_captioner
    from srd.captioner.factory import load_captioner
    from srd.defenses.srd.inputs import SFSArgs, load_reference_captioner

    reference = export_captioner(make_captioner(seed=21), tmp_path / "reference")
    defended = export_captioner(make_captioner(seed=22), tmp_path / "defended")  # other tower
    images = list(tiny_images.values())[:6]
    own = load_captioner(reference).caption(images, batch_size=3, num_beams=2, max_new_tokens=6)
    assert own != load_captioner(defended).caption(
        images, batch_size=3, num_beams=2, max_new_tokens=6
    )
    sfs = SFSArgs(reference_model_dir=str(tmp_path / "reference"), reference_num_beams=2,
                  caption_batch_size=3)  # fmt: skip
    caption, name = load_reference_captioner(sfs, defended, "cpu", max_new_tokens=6)
    assert caption(images) == own and name == f"captioner:{tmp_path / 'reference'}"
    mixed = SFSArgs(reference_checkpoint_path=reference.checkpoint_path)
    with pytest.raises(SRDError, match="^--reference_checkpoint_path .*other weights"):
        load_reference_captioner(mixed, defended, "cpu", max_new_tokens=6)
