"""The feature cache: computed once per image version, never stale, same training results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from srd_fixtures import BIT_EXACT

from srd.captioner.args import model_signature
from srd.captioner.checkpoint import trainable_state_dict
from srd.captioner.engine import CaptionDataset, TrainArgs, train
from srd.captioner.features import FeatureCache, image_key
from srd.captioner.vision import tower_tokens
from srd.errors import SRDError


def test_image_key_changes_with_one_pixel(tiny_images) -> None:
    image = next(iter(tiny_images.values()))
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    assert image_key(image) == image_key(image.copy())
    assert image_key(image) != image_key(changed)


def test_cache_encodes_each_image_once(tiny_images) -> None:
    images = list(tiny_images.values())[:3]
    calls: list[int] = []

    def encode(batch):
        calls.append(len(batch))
        return torch.stack([torch.full((2, 3), float(im[0, 0, 0])) for im in batch])

    cache = FeatureCache(torch.nn.Linear(2, 2).requires_grad_(False))
    first = cache([images[0], images[1], images[0]], encode)  # a duplicate within the batch
    again = cache([images[1], images[2], images[0]], encode)
    assert calls == [2, 1]  # the duplicate and the second lookups were not encoded again
    assert (cache.misses, cache.hits, len(cache)) == (3, 3, 3)
    assert torch.equal(first[0], first[2]) and torch.equal(first[1], again[0])
    assert first.shape == (3, 2, 3)


def test_cache_refuses_a_trainable_or_changed_tower() -> None:
    tower = torch.nn.Linear(2, 2).requires_grad_(False)
    cache = FeatureCache(tower)
    cache.check()
    with torch.no_grad():
        tower.weight[0, 0] += 1.0
    with pytest.raises(SRDError, match="weights changed"):
        cache.check()
    tower.requires_grad_(True)
    with pytest.raises(SRDError, match="trainable"):
        FeatureCache(tower).check()


def test_cached_tokens_equal_the_tower_output(make_captioner, tiny_images) -> None:
    cap = make_captioner(seed=3)
    cap.enable_feature_cache()
    images = list(tiny_images.values())[:4]
    cached = cap.vision_inputs(images)
    with torch.no_grad():
        direct = tower_tokens(cap.model.vision_encoder, cap.pixel_values(images).flatten(0, 2))
    assert cached.shape == (4, 1, 1, *direct.shape[1:])
    assert torch.equal(cached[:, 0, 0], direct)


def test_captions_are_the_same_with_the_cache(make_captioner, tiny_images) -> None:
    images = list(tiny_images.values())[:4]
    plain = make_captioner(seed=4).caption(images, num_beams=2, max_new_tokens=6)
    cap = make_captioner(seed=4)
    cap.enable_feature_cache()
    assert cap.caption(images, num_beams=2, max_new_tokens=6) == plain


def _train(make_captioner, samples, images, root, name, cache: bool) -> dict[str, torch.Tensor]:
    cap = make_captioner(seed=21)
    args = TrainArgs(
        run_name=name,
        external_save_dir=str(root),
        batch_size=4,
        num_epochs=2,
        learning_rate=1e-3,
        seed=3,
        feature_cache=cache,
    )
    dataset = CaptionDataset(samples, lambda s: images[s.image_id])
    record = {"model_signature": model_signature(cap.args)}
    train(cap, dataset, args, record)
    assert (cap.feature_cache is not None) == cache
    return trainable_state_dict(cap.model)


@pytest.mark.skipif(not BIT_EXACT, reason="bit-exact equality is a CPU property")
def test_cached_and_uncached_training_give_the_same_weights(
    make_captioner, tiny_samples, tiny_images, tmp_path
) -> None:
    cached = _train(make_captioner, tiny_samples, tiny_images, tmp_path, "cached", True)
    plain = _train(make_captioner, tiny_samples, tiny_images, tmp_path, "plain", False)
    assert cached.keys() == plain.keys()
    for name in cached:
        assert torch.equal(cached[name], plain[name]), name


def test_frozen_resnet_tower_stays_in_eval_mode(make_captioner) -> None:
    cap = make_captioner(seed=0, vision_encoder_path="tiny-clip")
    cap.model.train()
    assert not cap.model.vision_encoder.training  # batch-norm statistics must not drift
    assert cap.model.perceiver.training
    from srd.captioner.checkpoint import set_trainable

    set_trainable(cap.model, "all")
    cap.model.train()
    assert cap.model.vision_encoder.training


def test_resnet_tower_gives_one_token_per_feature_map_cell(make_captioner, tiny_images) -> None:
    cap = make_captioner(seed=0, vision_encoder_path="tiny-clip")
    images = list(tiny_images.values())[:2]
    with torch.no_grad():
        tokens = tower_tokens(cap.model.vision_encoder, cap.pixel_values(images).flatten(0, 2))
    assert tokens.shape == (2, 7 * 7, 8 * 32)  # 224 / 32 = 7; width 8 -> 256 channels
    assert np.isfinite(tokens.numpy()).all()


def test_a_full_cache_computes_without_keeping(tiny_images) -> None:
    images = list(tiny_images.values())[:3]
    calls: list[int] = []

    def encode(batch):
        calls.append(len(batch))
        return torch.stack([torch.full((256,), float(im[0, 0, 0])) for im in batch])

    cache = FeatureCache(torch.nn.Linear(2, 2).requires_grad_(False), max_mb=2 * 1024 / 2**20)
    first = cache(images, encode)  # room for two 1-KiB entries
    again = cache(images, encode)
    assert len(cache) == 2 and cache.bytes == 2048
    assert calls == [3, 1]  # the third image is encoded each time
    assert torch.equal(first, again)
