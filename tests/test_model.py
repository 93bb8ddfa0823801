"""Captioner factory on open_flamingo: build, train modes, captioning, checkpoints, export."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from open_flamingo.src.helpers import PerceiverResampler
from safetensors.torch import load_file, save_file

from srd import captions
from srd.captioner.args import IDENTITY_KEYS, ModelArgs, model_signature, weights_identity
from srd.captioner.checkpoint import (
    export_captioner,
    load_checkpoint_into,
    set_trainable,
    trainable_state_dict,
)
from srd.captioner.engine import Collator, make_optimizer
from srd.captioner.factory import build_flamingo, load_captioner
from srd.captioner.flamingo import Captioner, SeededSampler, SRDFlamingo
from srd.captioner.weights import read_state_dict
from srd.errors import SRDError

PAPER_PARTS = ("perceiver.", "gated_cross_attn_layer", "lang_encoder.model.embed_tokens.")


def _batch(captioner: Captioner, images: dict[int, np.ndarray], samples) -> dict[str, torch.Tensor]:
    collate = Collator(captioner.tokenizer, captioner.pixel_values)
    return collate([(images[s.image_id], captions.training_text(s.caption)) for s in samples])


def _loss(captioner: Captioner, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return captioner.model(
        vision_x=batch["vision_x"],
        lang_x=batch["lang_x"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
    ).loss


def _test_images(images: dict[int, np.ndarray], test_records, n: int = 4) -> list[np.ndarray]:
    return [images[r.image_id] for r in test_records[:n]]


def _paper_part(name: str) -> bool:
    return any(part in name for part in PAPER_PARTS)


# --------------------------------------------------------------------------- building


def test_tiny_model_builds_with_requested_sizes(make_captioner, tiny_model_args) -> None:
    cap = make_captioner(varied=False)
    model = cap.model
    assert isinstance(model, SRDFlamingo)
    assert isinstance(model.perceiver, PerceiverResampler)
    assert model.perceiver.latents.shape == (tiny_model_args.perceiver_num_latents, 128)
    assert len(model.perceiver.layers) == tiny_model_args.perceiver_depth
    assert len(model.lang_encoder.gated_cross_attn_layers) == 2  # one per LM layer
    tok = cap.tokenizer
    assert model.media_token_id == tok.convert_tokens_to_ids(captions.IMAGE_TOKEN)
    assert model.eoc_token_id == tok.convert_tokens_to_ids(captions.END_OF_CHUNK)
    assert model.lang_encoder.get_input_embeddings().num_embeddings == len(tok)
    # a fresh model starts in paper mode
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(_paper_part(n) for n in trainable)
    # --cross_attn_every_n_layers 2: only every second LM block gets one
    sparse = make_captioner(varied=False, cross_attn_every_n_layers=2).model
    assert sum(x is not None for x in sparse.lang_encoder.gated_cross_attn_layers) == 1


def test_unknown_vision_encoder_names_the_flag(tiny_model_args: ModelArgs) -> None:
    args = dataclasses.replace(tiny_model_args, vision_encoder_path="no-such-vit")
    with pytest.raises(SRDError, match="--vision_encoder_path no-such-vit"):
        build_flamingo(args)


def test_bad_lm_path_names_the_flag(tiny_model_args: ModelArgs, tmp_path: Path) -> None:
    args = dataclasses.replace(tiny_model_args, lm_path=str(tmp_path / "nothing"))
    with pytest.raises(SRDError, match="--lm_tokenizer_path|--lm_path"):
        build_flamingo(args)


# --------------------------------------------------------------------------- training modes


def test_forward_gives_finite_loss(make_captioner, tiny_images, tiny_samples) -> None:
    cap = make_captioner(varied=False)
    loss = _loss(cap, _batch(cap, tiny_images, tiny_samples[:3]))
    assert loss.ndim == 0 and torch.isfinite(loss)
    # an untrained LM is close to uniform over the vocabulary
    assert abs(loss.item() - np.log(len(cap.tokenizer))) < 1.0


def test_paper_mode_grads_only_reach_paper_parts(make_captioner, tiny_images, tiny_samples) -> None:
    cap = make_captioner()
    set_trainable(cap.model, "paper")
    _loss(cap, _batch(cap, tiny_images, tiny_samples[:3])).backward()
    with_grad = set()
    for name, p in cap.model.named_parameters():
        assert p.requires_grad == _paper_part(name), name
        if p.grad is not None and p.grad.abs().sum() > 0:
            with_grad.add(name)
        if not p.requires_grad:
            assert p.grad is None, name
    for part in PAPER_PARTS:
        assert any(part in n for n in with_grad), f"no gradient reached {part}"


def test_all_mode_grads_reach_vision_tower(make_captioner, tiny_images, tiny_samples) -> None:
    cap = make_captioner()
    set_trainable(cap.model, "all")
    _loss(cap, _batch(cap, tiny_images, tiny_samples[:3])).backward()
    vision = dict(cap.model.vision_encoder.named_parameters())
    # Flamingo reads the pre-ln_post patch tokens; the pooled projection and the final
    # LayerNorm are unused and kept frozen (DDP)
    assert not vision.pop("proj").requires_grad
    assert not any(vision.pop(k).requires_grad for k in ("ln_post.weight", "ln_post.bias"))
    for name, p in vision.items():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    blocks = [p for n, p in cap.model.named_parameters() if "decoder_layer." in n]
    assert blocks and all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks)


def test_paper_step_leaves_frozen_weights_bitwise_unchanged(
    make_captioner, tiny_images, tiny_samples
) -> None:
    cap = make_captioner()
    model = cap.model
    set_trainable(model, "paper")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    _loss(cap, _batch(cap, tiny_images, tiny_samples[:4])).backward()
    optimizer.step()
    changed = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
        elif not torch.equal(p, before[name]):
            changed.add(name)
    for part in PAPER_PARTS:
        assert any(part in n for n in changed), f"{part} did not train"


def test_unknown_trainable_mode_names_the_flag(make_captioner) -> None:
    with pytest.raises(SRDError, match="--trainable"):
        set_trainable(make_captioner(varied=False).model, "lora")


# --------------------------------------------------------------------------- captioning


def test_caption_batched_equals_one_by_one(make_captioner, tiny_images, tiny_test_records) -> None:
    cap = make_captioner()
    assert cap.model.training  # caption() switches to eval mode and back
    images = _test_images(tiny_images, tiny_test_records)
    kw = {"num_beams": 2, "max_new_tokens": 8}
    batched = cap.caption(images, batch_size=4, **kw)
    assert len(batched) == len(images) and all(isinstance(c, str) for c in batched)
    # the comparison means something only if captions are non-empty and depend on the image
    assert all(batched) and len(set(batched)) > 1, batched
    assert [cap.caption([im], **kw)[0] for im in images] == batched
    assert cap.caption(images, batch_size=3, **kw) == batched
    assert cap.model.training


def test_sampled_captions_depend_on_their_seed_not_on_the_batch(
    make_captioner, tiny_images, tiny_test_records
) -> None:
    """Sampling draws each caption from its own seed: the batch size and the batch's other
    images do not change it (the global-RNG sampler it replaced did)."""
    cap = make_captioner()
    images = _test_images(tiny_images, tiny_test_records)
    seeds = list(range(100, 100 + len(images)))
    kw = {"max_new_tokens": 8, "sample_seeds": seeds}
    sampled = cap.caption(images, batch_size=4, **kw)
    assert cap.caption(images, batch_size=3, **kw) == sampled
    torch.manual_seed(1)  # the global RNG plays no part
    reordered = cap.caption(images[::-1], batch_size=5, max_new_tokens=8, sample_seeds=seeds[::-1])
    assert reordered == sampled[::-1]
    one_by_one = [
        cap.caption([im], max_new_tokens=8, sample_seeds=[s])[0]
        for im, s in zip(images, seeds, strict=True)
    ]
    assert one_by_one == sampled
    # another seed draws other captions, and sampling is not beam search
    assert cap.caption(images, max_new_tokens=8, sample_seeds=[s + 1 for s in seeds]) != sampled
    assert sampled != cap.caption(images, num_beams=1, max_new_tokens=8)
    with pytest.raises(ValueError, match="2 sample seeds for"):
        cap.caption(images, sample_seeds=[0, 1])


def test_seeded_sampler_draws_from_the_softmax() -> None:
    """Gumbel-max: the argmax of the processed scores is a draw from softmax(scores)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    scores = probs.log().expand(4000, -1).contiguous()
    picks = SeededSampler(range(4000))(torch.zeros(4000, 1, dtype=torch.long), scores).argmax(-1)
    share = torch.bincount(picks, minlength=5).float() / 4000
    assert torch.allclose(share, probs, atol=0.025), share
    assert share[-1] == 0  # probability 0 (e.g. EOS before min_new_tokens): never drawn


def test_untrained_model_without_open_gates_ignores_the_image(
    make_captioner, tiny_images, tiny_test_records
) -> None:
    """Why the fixtures open the gates: closed gates (tanh(0) = 0) cut the image off."""
    cap = make_captioner(varied=False)
    texts = cap.caption(_test_images(tiny_images, tiny_test_records), num_beams=1, max_new_tokens=4)
    assert len(set(texts)) == 1


# --------------------------------------------------------------------------- checkpoints


def _checkpoint(cap: Captioner, signature: dict | None = None) -> dict:
    state = trainable_state_dict(cap.model)
    return {"model_state_dict": state, "config": {"model_signature": signature or {}}}


@pytest.fixture(scope="module")
def source(make_captioner) -> Captioner:
    return make_captioner(seed=7)


@pytest.fixture()
def target(make_captioner) -> Captioner:
    return make_captioner(seed=8)


def _same_trainable(a: Captioner, b: Captioner) -> bool:
    sa, sb = trainable_state_dict(a.model), trainable_state_dict(b.model)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_wrapped_checkpoint_loads(source, target, tiny_model_args, tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    sig = model_signature(tiny_model_args)
    torch.save({**_checkpoint(source, sig), "epoch": 3}, path)
    assert not _same_trainable(source, target)
    meta = load_checkpoint_into(target.model, path, expected_signature=sig)
    assert meta["epoch"] == 3
    assert _same_trainable(source, target)


def test_raw_state_dict_loads(source, target, tmp_path) -> None:
    # a bare state dict, no metadata (open_flamingo's own layout: tests/test_official_layout.py)
    path = tmp_path / "checkpoint.pt"
    torch.save(trainable_state_dict(source.model), path)
    assert load_checkpoint_into(target.model, path, expected_signature={"x": 1}) == {}
    assert _same_trainable(source, target)


def _rejected(target: Captioner, path: Path, match: str, **kw) -> None:
    before = trainable_state_dict(target.model)
    with pytest.raises(SRDError, match=match) as info:
        load_checkpoint_into(target.model, path, **kw)
    assert str(path) in str(info.value)
    after = trainable_state_dict(target.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "partial load"


def test_checkpoint_with_unexpected_key_is_rejected(source, target, tmp_path) -> None:
    ckpt = _checkpoint(source)
    ckpt["model_state_dict"]["perceiver.extra.weight"] = torch.zeros(2)
    torch.save(ckpt, tmp_path / "extra.pt")
    _rejected(target, tmp_path / "extra.pt", "unexpected keys, e.g. perceiver.extra.weight")


def test_checkpoint_missing_a_trainable_tensor_is_rejected(source, target, tmp_path) -> None:
    ckpt = _checkpoint(source)
    name = next(k for k in ckpt["model_state_dict"] if "gated_cross_attn_layer" in k)
    del ckpt["model_state_dict"][name]
    torch.save(ckpt, tmp_path / "missing.pt")
    _rejected(target, tmp_path / "missing.pt", "1 trainable tensors missing")


def test_checkpoint_with_wrong_shape_is_rejected(source, target, tmp_path) -> None:
    ckpt = _checkpoint(source)
    ckpt["model_state_dict"]["perceiver.latents"] = torch.zeros(5, 128)
    torch.save(ckpt, tmp_path / "shape.pt")
    _rejected(target, tmp_path / "shape.pt", r"perceiver.latents has shape \(5, 128\)")


def test_checkpoint_of_another_configuration_is_rejected(
    source, target, tiny_model_args, tmp_path
) -> None:
    other = model_signature(dataclasses.replace(tiny_model_args, cross_attn_every_n_layers=2))
    torch.save(_checkpoint(source, other), tmp_path / "sig.pt")
    _rejected(
        target,
        tmp_path / "sig.pt",
        "cross_attn_every_n_layers: checkpoint 2 vs flags 1",
        expected_signature=model_signature(tiny_model_args),
    )


def test_checkpoint_made_over_another_lm_is_rejected(
    source, target, tiny_model_args, tiny_lm_dir, tmp_path
) -> None:
    """The signature records which LM weights a checkpoint was trained over (the folder's
    digest): one of the same shape with other weights is refused, naming --lm_path."""
    other_lm = tmp_path / "other_lm"
    shutil.copytree(tiny_lm_dir, other_lm)
    weights = other_lm / "model.safetensors"
    state = load_file(weights)
    save_file({k: v + 1e-3 for k, v in state.items()}, weights)
    made = model_signature(dataclasses.replace(tiny_model_args, lm_path=str(other_lm)))
    assert made["lm_weights"] != model_signature(tiny_model_args)["lm_weights"]
    torch.save(_checkpoint(source, made), tmp_path / "lm.pt")
    _rejected(
        target,
        tmp_path / "lm.pt",
        r"lm_weights: checkpoint 'sha256:.*--lm_path",
        expected_signature=model_signature(tiny_model_args),
    )


def test_checkpoint_recorded_before_the_weight_identities_still_loads(
    source, target, tiny_model_args, tmp_path
) -> None:
    """Checkpoints made before the LM and vision identities were recorded (the released clean
    captioner among them) are checked on what they do record."""
    old = {k: v for k, v in model_signature(tiny_model_args).items() if k not in IDENTITY_KEYS}
    torch.save(_checkpoint(source, old), tmp_path / "old.pt")
    load_checkpoint_into(
        target.model, tmp_path / "old.pt", expected_signature=model_signature(tiny_model_args)
    )
    assert _same_trainable(source, target)


def test_weights_identity_is_a_digest_of_local_files_and_a_name_otherwise(tmp_path) -> None:
    one = tmp_path / "a.safetensors"
    one.write_bytes(b"weights")
    assert weights_identity(str(one)).startswith("sha256:")
    assert weights_identity("openai") == "openai" and weights_identity(None) == "None"
    before = weights_identity(str(tmp_path))
    (tmp_path / "notes.txt").write_text("not weights")
    assert weights_identity(str(tmp_path)) == before
    one.write_bytes(b"other weights")
    assert weights_identity(str(tmp_path)) != before


def test_missing_and_corrupt_checkpoint_files_are_rejected(target, tmp_path) -> None:
    _rejected(target, tmp_path / "absent.pt", "--checkpoint_path .*file not found")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a torch file" * 10)
    _rejected(target, corrupt, "cannot read checkpoint")
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    _rejected(target, listed, "not a state dict")


class _Payload:
    """Any class: unpickling it would run code, which weights_only loading refuses."""


def test_checkpoint_holding_pickled_objects_is_refused(source, target, tmp_path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({**_checkpoint(source), "extra": _Payload()}, path)
    _rejected(target, path, "cannot read checkpoint")
    with pytest.raises(SRDError, match="--vision_encoder_pretrained"):
        read_state_dict(path, "--vision_encoder_pretrained")


# --------------------------------------------------------------------------- export / load


def test_export_then_load_gives_same_model_and_captions(
    make_captioner: Callable[..., Captioner], tiny_images, tiny_samples, tiny_test_records, tmp_path
) -> None:
    cap = make_captioner(seed=3)
    set_trainable(cap.model, "paper")
    optimizer = make_optimizer(cap.model, lr=1e-2, weight_decay=0.1)
    for start in (0, 4):
        _loss(cap, _batch(cap, tiny_images, tiny_samples[start : start + 4])).backward()
        optimizer.step()
        optimizer.zero_grad()
    images = _test_images(tiny_images, tiny_test_records)
    kw = {"num_beams": 2, "max_new_tokens": 8}
    expected = cap.caption(images, **kw)

    args = export_captioner(cap, tmp_path / "export")
    assert args.checkpoint_path == str(tmp_path / "export" / "checkpoint.pt")
    assert args.vision_encoder_pretrained.endswith("vision.safetensors")
    loaded = load_captioner(args)
    assert not loaded.model.training
    assert loaded.caption(images, **kw) == expected
    assert _same_trainable(cap, loaded)
    # not only the paper parts: the vision tower and LM blocks come back bitwise too
    ours, theirs = cap.model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # export left the trained model's trainable flags alone
    assert {n for n, p in cap.model.named_parameters() if p.requires_grad} == {
        n for n, p in cap.model.named_parameters() if _paper_part(n)
    }


def test_no_random_init_warning_when_the_tower_weights_come_from_a_file(tmp_path, caplog) -> None:
    """open_clip warns "Model initialized randomly" before our loader reads the weights file:
    that line is dropped when a file follows (a newcomer read it as "the model is random"),
    and kept for a tower that really is random."""
    from safetensors.torch import save_file

    from srd.captioner.vision import build_vision_encoder

    visual, _, _ = build_vision_encoder("tiny-vit", None)
    path = tmp_path / "vision.safetensors"
    save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, str(path))
    caplog.clear()
    with caplog.at_level("WARNING"):
        loaded, _, _ = build_vision_encoder("tiny-vit", str(path))
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    assert all(torch.equal(a, b) for a, b in zip(
        loaded.state_dict().values(), visual.state_dict().values(), strict=True
    ))  # fmt: skip
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_vision_encoder("tiny-vit", None)
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]
