"""Training engine: labels, optimiser groups, run folders, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

from srd import captions
from srd.captioner.args import model_signature
from srd.captioner.checkpoint import load_checkpoint_into, set_trainable, trainable_state_dict
from srd.captioner.engine import (
    TRAIN_LOG,
    CaptionDataset,
    Collator,
    Sample,
    TrainArgs,
    caption_labels,
    make_optimizer,
    process_state,
    train,
    trained_steps,
)
from srd.captioner.flamingo import Captioner
from srd.captioner.lm import load_tokenizer
from srd.captioner.runfiles import FINAL_WEIGHTS
from srd.captioner.sampling import CaptionsPerImage, epoch_sampler
from srd.errors import SRDError


class _Interrupted(Exception):
    """Stands in for a killed process in the middle of an epoch."""


def _dataset(
    samples: list[Sample], images: dict[int, np.ndarray], fail_after: int | None = None
) -> CaptionDataset:
    """Samples with their images; raises _Interrupted on image number ``fail_after + 1``."""
    served = 0

    def image_of(sample: Sample) -> np.ndarray:
        nonlocal served
        served += 1
        if fail_after is not None and served > fail_after:
            raise _Interrupted
        return images[sample.image_id]

    return CaptionDataset(samples, image_of)


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


# --------------------------------------------------------------------------- labels and batches


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir: Path):
    return load_tokenizer(str(tiny_lm_dir))


def test_caption_labels_keep_only_the_caption_by_hand(tokenizer) -> None:
    tok = tokenizer
    texts = [
        tok.bos_token + captions.training_text("A red circle.") + tok.eos_token,
        tok.bos_token + captions.training_text("a <image> large red circle") + tok.eos_token,
    ]
    tok.padding_side = "right"
    ids = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)["input_ids"]
    labels = caption_labels(ids, tok)

    def kept(row: int) -> list[str | None]:
        """The label of each position as a token, None where masked (-100)."""
        return [None if v == -100 else tok.convert_ids_to_tokens(v) for v in labels[row].tolist()]

    prompt = ["<|endoftext|>", "<image>", "user", ":", "a", "photo", "of", "gpt", ":", "<answer>"]
    caption = ["a", "red", "circle", ".", "<|endofchunk|>", "<|endoftext|>"]
    assert tok.convert_ids_to_tokens(ids[0]) == [*prompt, *caption, "<PAD>", "<PAD>"]
    # BOS at position 0, the prompt through <answer> and the padding are masked; the caption,
    # <|endofchunk|> and EOS (same id as BOS in the tiny tokenizer) are kept
    assert kept(0) == [None] * 10 + caption + [None, None]
    # an <image> token after <answer> is masked as well
    caption1 = ["a", "<image>", "large", "red", "circle", ".", "<|endofchunk|>", "<|endoftext|>"]
    assert tok.convert_ids_to_tokens(ids[1]) == [*prompt, *caption1]
    assert kept(1) == [None] * 10 + [t if t != "<image>" else None for t in caption1]
    assert torch.equal(labels[labels != -100], ids[labels != -100])


def test_collator_pads_right_and_masks_padding(
    tokenizer, make_captioner, tiny_images, tiny_samples
) -> None:
    cap = make_captioner(varied=False)
    short = Sample(1, tiny_samples[0].image_id, "A circle.")
    pairs = [
        (tiny_images[s.image_id], captions.training_text(s.caption))
        for s in (short, tiny_samples[1])
    ]
    batch = Collator(tokenizer, cap.pixel_values)(pairs)
    assert batch["vision_x"].shape == (2, 1, 1, 3, 64, 64)
    lang, mask, labels = batch["lang_x"], batch["attention_mask"], batch["labels"]
    assert lang.shape == mask.shape == labels.shape
    assert lang[0, 0] == tokenizer.bos_token_id
    pad = lang[0] == tokenizer.pad_token_id
    assert pad.any() and not pad[: int(mask[0].sum())].any()  # right padding
    assert (mask[0] == ~pad).all() and (labels[0][pad] == -100).all()
    assert lang[0, int(mask[0].sum()) - 1] == tokenizer.eos_token_id


# --------------------------------------------------------------------------- optimiser


def test_weight_decay_only_on_cross_attention_weights(make_captioner) -> None:
    model = make_captioner(varied=False).model
    for mode in ("paper", "all"):
        set_trainable(model, mode)
        optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = {
            g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups
        }
        decayed, plain = groups[0.1], groups[0.0]
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert decayed | plain == trainable and not decayed & plain
        linear = {
            f"{m}.weight"
            for m, mod in model.named_modules()
            if "gated_cross_attn_layer" in m and isinstance(mod, torch.nn.Linear)
        }
        # The reference's rule is by name ("norm", "bias", "*_gate" excluded). The FeedForward's
        # LayerNorm is named "ff.0", so its gain is decayed exactly as in OpenFlamingo.
        ff_norm = {n for n in trainable if n.endswith("gated_cross_attn_layer.ff.0.weight")}
        assert len(linear) == 2 * 5 and len(ff_norm) == 2
        assert decayed == linear | ff_norm, mode
        assert not any(n.endswith(("_gate", "bias")) or ".norm." in n for n in decayed)


# --------------------------------------------------------------------------- train runs


@dataclass
class Run:
    args: TrainArgs
    captioner: Captioner
    initial: dict[str, torch.Tensor]
    final: Path
    record: dict


SEED_MODEL = 11


def _train_args(root: Path, name: str, **kw) -> TrainArgs:
    base = {
        "run_name": name,
        "external_save_dir": str(root),
        "batch_size": 4,
        "num_epochs": 2,
        "learning_rate": 1e-3,
        "warmup_steps_ratio": 0.25,
        "seed": 5,
    }
    return TrainArgs(**{**base, **kw})


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def finished_run(
    run_root: Path,
    make_captioner: Callable[..., Captioner],
    tiny_samples,
    tiny_images,
    tiny_model_args,
) -> Run:
    """2 epochs, cosine with warm-up, 16 samples in batches of 4 (8 steps), uninterrupted."""
    cap = make_captioner(seed=SEED_MODEL)
    initial = trainable_state_dict(cap.model)
    record = {"stage": "test", "model_signature": model_signature(tiny_model_args)}
    args = _train_args(run_root, "full")
    final = train(cap, _dataset(tiny_samples, tiny_images), args, record)
    return Run(args, cap, initial, final, record)


def test_train_writes_the_run_folder(finished_run: Run, make_captioner, tiny_model_args) -> None:
    run_dir = finished_run.args.run_dir
    names = {p.name for p in run_dir.iterdir()}
    assert names == {
        "checkpoint_0.pt",
        "checkpoint_1.pt",
        FINAL_WEIGHTS,
        TRAIN_LOG,
        "config.json",
        "DONE",
    }
    assert finished_run.final == run_dir / FINAL_WEIGHTS
    assert json.loads((run_dir / "config.json").read_text()) == finished_run.record
    log = [json.loads(line) for line in (run_dir / TRAIN_LOG).read_text().splitlines()]
    assert [(e["epoch"], e["step"]) for e in log] == [(0, 4), (1, 8)]
    assert all(np.isfinite(e["loss"]) for e in log)
    assert log[1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at zero
    assert [(e["torch_threads"], e["processes"]) for e in log] == [(torch.get_num_threads(), 1)] * 2

    trained = trainable_state_dict(finished_run.captioner.model)
    assert any(not torch.equal(trained[k], finished_run.initial[k]) for k in trained)
    for epoch, steps in ((0, 4), (1, 8)):
        ckpt = torch.load(run_dir / f"checkpoint_{epoch}.pt", map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == epoch and ckpt["config"] == finished_run.record
        assert ckpt["model_state_dict"].keys() == trained.keys()
        assert ckpt["lr_scheduler_state_dict"]["last_epoch"] == steps
        assert {int(s["step"]) for s in ckpt["optimizer_state_dict"]["state"].values()} == {steps}
    final = torch.load(finished_run.final, map_location="cpu", weights_only=True)
    _assert_same_weights(final["model_state_dict"], trained)
    _assert_same_weights(ckpt["model_state_dict"], trained)

    # the final weights are a checkpoint the model factory accepts (signature checked)
    fresh = make_captioner(seed=SEED_MODEL + 1)
    load_checkpoint_into(
        fresh.model, finished_run.final, expected_signature=model_signature(tiny_model_args)
    )
    _assert_same_weights(trainable_state_dict(fresh.model), trained)


def test_finished_run_is_not_clobbered(
    finished_run: Run, make_captioner, tiny_samples, tiny_images
):
    final = finished_run.final
    stamp = final.stat().st_mtime_ns, final.read_bytes()
    with pytest.raises(SRDError, match="--run_name full: .* already finished .*--overwrite"):
        train(make_captioner(), _dataset(tiny_samples, tiny_images), finished_run.args, {})
    assert (final.stat().st_mtime_ns, final.read_bytes()) == stamp


def test_overwrite_starts_again(
    finished_run: Run, run_root, make_captioner, tiny_samples, tiny_images
):
    shutil.copytree(finished_run.args.run_dir, run_root / "again")
    args = _train_args(run_root, "again", num_epochs=1, overwrite=True)
    train(make_captioner(), _dataset(tiny_samples[:8], tiny_images), args, {"second": True})
    names = {p.name for p in args.run_dir.iterdir()}
    assert names == {"checkpoint_0.pt", FINAL_WEIGHTS, TRAIN_LOG, "config.json", "DONE"}
    assert len((args.run_dir / TRAIN_LOG).read_text().splitlines()) == 1
    assert json.loads((args.run_dir / "config.json").read_text()) == {"second": True}


@pytest.fixture(scope="module")
def interrupted_run(run_root: Path, make_captioner, tiny_samples, tiny_images) -> TrainArgs:
    """The same 2-epoch run as ``finished_run``, killed on the first batch of epoch 2."""
    args = _train_args(run_root, "interrupted")
    cap = make_captioner(seed=SEED_MODEL)
    with pytest.raises(_Interrupted):
        train(cap, _dataset(tiny_samples, tiny_images, fail_after=len(tiny_samples)), args, {})
    assert {p.name for p in args.run_dir.iterdir()} == {"checkpoint_0.pt", TRAIN_LOG, "config.json"}
    return args


def test_unfinished_run_needs_resume_flag(
    interrupted_run: TrainArgs, make_captioner, tiny_samples, tiny_images
):
    before = sorted(p.name for p in interrupted_run.run_dir.iterdir())
    with pytest.raises(SRDError, match="--run_name interrupted: .*--resume_from_checkpoint"):
        train(make_captioner(), _dataset(tiny_samples, tiny_images), interrupted_run, {})
    assert sorted(p.name for p in interrupted_run.run_dir.iterdir()) == before


def test_resume_matches_uninterrupted_run(
    interrupted_run: TrainArgs,
    finished_run: Run,
    run_root,
    make_captioner,
    tiny_samples,
    tiny_images,
) -> None:
    shutil.copytree(interrupted_run.run_dir, run_root / "resumed")
    args = dataclasses.replace(interrupted_run, run_name="resumed", resume_from_checkpoint=True)
    cap = make_captioner(seed=SEED_MODEL)
    train(cap, _dataset(tiny_samples, tiny_images), args, {})
    _assert_same_weights(
        trainable_state_dict(cap.model), trainable_state_dict(finished_run.captioner.model)
    )
    resumed = torch.load(args.run_dir / "checkpoint_1.pt", map_location="cpu", weights_only=True)
    full = torch.load(
        finished_run.args.run_dir / "checkpoint_1.pt", map_location="cpu", weights_only=True
    )
    assert resumed["lr_scheduler_state_dict"] == full["lr_scheduler_state_dict"]
    log = [json.loads(line) for line in (args.run_dir / TRAIN_LOG).read_text().splitlines()]
    full_log = [
        json.loads(line)
        for line in (finished_run.args.run_dir / TRAIN_LOG).read_text().splitlines()
    ]
    assert [e["epoch"] for e in log] == [0, 1]
    assert [e["loss"] for e in log] == pytest.approx([e["loss"] for e in full_log], rel=1e-6)


def test_resume_with_another_num_epochs_is_refused(
    run_root, make_captioner, tiny_samples, tiny_images
) -> None:
    """The schedule is laid out over --num_epochs, so a resume must keep the same value."""
    short = _train_args(run_root, "extended", num_epochs=1)
    train(make_captioner(seed=SEED_MODEL), _dataset(tiny_samples, tiny_images), short, {})
    (short.run_dir / "DONE").unlink()
    (short.run_dir / FINAL_WEIGHTS).unlink()
    longer = dataclasses.replace(short, num_epochs=2, resume_from_checkpoint=True)
    with pytest.raises(SRDError, match="--num_epochs 2: .*1-epoch run"):
        train(make_captioner(seed=SEED_MODEL), _dataset(tiny_samples, tiny_images), longer, {})


def test_max_steps_stops_there_with_the_schedule_laid_over_those_steps(
    run_root, make_captioner, tiny_samples, tiny_images
) -> None:
    """16 samples in batches of 4 for 2 epochs is 8 steps; --max_steps 5 stops one step into
    epoch 2, its cosine at zero there (the 8-step run's is halfway down after 4 steps), and a
    resume of the stopped run trains no further step."""
    args = _train_args(run_root, "light", max_steps=5)
    cap = make_captioner(seed=SEED_MODEL)
    train(cap, _dataset(tiny_samples, tiny_images), args, {})
    log = [json.loads(line) for line in (args.run_dir / TRAIN_LOG).read_text().splitlines()]
    assert [e["step"] for e in log] == [4, 5] and trained_steps(args.run_dir) == 5
    assert log[-1]["lr"] == pytest.approx(0.0, abs=1e-12) and 0 < log[0]["lr"] < 1e-3
    final = torch.load(args.run_dir / FINAL_WEIGHTS, map_location="cpu", weights_only=True)
    assert final["epoch"] == 1
    (args.run_dir / "DONE").unlink()
    (args.run_dir / FINAL_WEIGHTS).unlink()
    again = make_captioner(seed=SEED_MODEL)
    resumed = dataclasses.replace(args, resume_from_checkpoint=True)
    train(again, _dataset(tiny_samples, tiny_images), resumed, {})
    _assert_same_weights(trainable_state_dict(again.model), trainable_state_dict(cap.model))
    assert (args.run_dir / TRAIN_LOG).read_text().count("\n") == 2


def test_max_steps_beyond_the_epochs_is_refused_before_any_output(
    run_root, make_captioner, tiny_samples, tiny_images
) -> None:
    args = _train_args(run_root, "too-light", max_steps=9)
    with pytest.raises(SRDError, match="--max_steps 9: more than the 8 steps of --num_epochs 2"):
        train(make_captioner(seed=SEED_MODEL), _dataset(tiny_samples, tiny_images), args, {})
    assert not args.run_dir.exists()
    assert trained_steps(args.run_dir) is None


def test_data_loader_workers_only_read_files(
    finished_run: Run, run_root, make_captioner, tiny_samples, tiny_images
) -> None:
    """With --num_workers 2 the tower runs in the main process: the weights equal the
    0-worker run's, and the run's one feature cache computed each image version once (a cache
    inside the workers would leave this one empty and be thrown away every epoch)."""
    cap = make_captioner(seed=SEED_MODEL)
    args = _train_args(run_root, "workers", num_workers=2)
    train(cap, _dataset(tiny_samples, tiny_images), args, finished_run.record)
    _assert_same_weights(
        trainable_state_dict(cap.model), trainable_state_dict(finished_run.captioner.model)
    )
    images = len({s.image_id for s in tiny_samples})
    assert cap.feature_cache is not None and len(cap.feature_cache) == images
    assert cap.feature_cache.misses == images
    assert cap.feature_cache.hits == args.num_epochs * len(tiny_samples) - images


# --------------------------------------------------------------------------- captions per image


def _by_image(n_images: int, per: int) -> list[Sample]:
    return [Sample(i * per + c, i, f"caption {c}") for i in range(n_images) for c in range(per)]


def test_epoch_captions_per_image_draws_that_many_of_each_image_every_epoch() -> None:
    samples = [*_by_image(10, 5), Sample(99, 77, "an image with one caption")]
    sampler = CaptionsPerImage(samples, 2, seed=3)
    seen: set[int] = set()
    draws = []
    for epoch in range(12):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        assert len(drawn) == len(sampler) == 10 * 2 + 1
        assert len(set(drawn)) == len(drawn)  # without replacement within an epoch
        counts = np.bincount([samples[i].image_id for i in drawn])
        assert set(counts[:10]) == {2} and counts[77] == 1
        seen.update(drawn)
        draws.append(drawn)
    assert draws[0] != draws[1]  # redrawn every epoch
    sampler.set_epoch(0)
    assert list(sampler) == draws[0]  # and the same draw for the same (seed, epoch)
    assert list(CaptionsPerImage(samples, 2, seed=4)) != draws[0]
    assert seen == set(range(len(samples)))  # every caption comes round


def test_epoch_captions_per_image_below_one_is_refused() -> None:
    with pytest.raises(SRDError, match="--epoch_captions_per_image 0"):
        CaptionsPerImage(_by_image(2, 5), 0, seed=0)


def test_training_with_epoch_captions_per_image_takes_one_pass_over_the_images(
    run_root, make_captioner, tiny_samples, tiny_images
) -> None:
    """16 samples of fewer images: an epoch is one caption per image, in batches of 4."""
    images = len({s.image_id for s in tiny_samples})
    assert images < len(tiny_samples)
    args = _train_args(run_root, "per-image", epoch_captions_per_image=1, num_epochs=2)
    train(make_captioner(seed=SEED_MODEL), _dataset(tiny_samples, tiny_images), args, {})
    log = [json.loads(line) for line in (args.run_dir / TRAIN_LOG).read_text().splitlines()]
    per_epoch = -(-images // 4)
    assert [e["step"] for e in log] == [per_epoch, 2 * per_epoch]


def test_the_references_epochs_replay_one_draw_with_replacement() -> None:
    """--epoch_sampling fixed_replacement (reference B14/B21): n draws of n with replacement,
    seeded, and the same list every epoch: about 1 - 1/e of the samples ever seen."""
    args = TrainArgs(epoch_sampling="fixed_replacement", seed=3)
    sampler = epoch_sampler(_by_image(600, 5), args)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == first and len(first) == 3000
    assert 0.60 < len(set(first)) / 3000 < 0.66  # 1 - 1/e = 0.632
    assert list(epoch_sampler(_by_image(600, 5), TrainArgs(epoch_sampling="fixed_replacement",
                                                          seed=4))) != first  # fmt: skip
    assert epoch_sampler(_by_image(600, 5), TrainArgs()) is None  # ours: the loader's shuffle
    both = TrainArgs(epoch_sampling="fixed_replacement", epoch_captions_per_image=2)
    with pytest.raises(SRDError, match="only with --epoch_sampling shuffle"):
        epoch_sampler(_by_image(6, 5), both)


# --------------------------------------------------------------------------- bad input


def test_empty_dataset_is_refused() -> None:
    with pytest.raises(SRDError, match="empty dataset"):
        CaptionDataset([], lambda s: np.zeros((224, 224, 3), np.uint8))


def test_save_dir_that_cannot_be_created(
    tmp_path, make_captioner, tiny_samples, tiny_images
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = _train_args(blocker / "runs", "x", num_epochs=1)
    with pytest.raises(SRDError, match="--external_save_dir .*cannot create folder"):
        train(make_captioner(), _dataset(tiny_samples[:4], tiny_images), args, {})


def test_run_folder_taken_by_a_file(tmp_path, make_captioner, tiny_samples, tiny_images) -> None:
    """A permission-like failure that also fails as root (CI runs as root): the run folder's
    path is a regular file. One SRDError naming it; the file is left as it was."""
    (tmp_path / "x").write_text("someone's notes\n")
    args = _train_args(tmp_path, "x", num_epochs=1)
    with pytest.raises(SRDError, match="--external_save_dir .*x: cannot create folder"):
        train(make_captioner(), _dataset(tiny_samples[:4], tiny_images), args, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    assert (tmp_path / "x").read_text() == "someone's notes\n"


# --------------------------------------------------------------------------- real-mode settings


def test_save_total_limit_keeps_the_newest_checkpoints(
    run_root, make_captioner, tiny_samples, tiny_images
) -> None:
    args = _train_args(run_root, "pruned", num_epochs=3, save_total_limit=2)
    train(make_captioner(seed=SEED_MODEL), _dataset(tiny_samples, tiny_images), args, {})
    kept = sorted(p.name for p in args.run_dir.glob("checkpoint_*.pt"))
    assert kept == ["checkpoint_1.pt", "checkpoint_2.pt"]
    assert (args.run_dir / FINAL_WEIGHTS).is_file()
    with pytest.raises(SRDError, match="--save_total_limit -1"):
        train(
            make_captioner(),
            _dataset(tiny_samples, tiny_images),
            _train_args(run_root, "negative", save_total_limit=-1),
            {},
        )


def test_resume_refuses_a_checkpoint_of_other_trainable_parts(
    interrupted_run: TrainArgs, run_root, make_captioner, tiny_samples, tiny_images
) -> None:
    """Resume loads strictly: a checkpoint lacking a trainable tensor is an error, not a
    silently half-restored model."""
    shutil.copytree(interrupted_run.run_dir, run_root / "tampered")
    path = run_root / "tampered" / "checkpoint_0.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    dropped = sorted(state["model_state_dict"])[0]
    del state["model_state_dict"][dropped]
    torch.save(state, path)
    args = dataclasses.replace(interrupted_run, run_name="tampered", resume_from_checkpoint=True)
    with pytest.raises(SRDError, match=f"checkpoint_0.pt: .*1 missing.*{dropped}"):
        train(make_captioner(seed=SEED_MODEL), _dataset(tiny_samples, tiny_images), args, {})


@pytest.fixture()
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change; a real run
    sets it once per process, tests that change it start and end with a fresh one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_keeps_fp32_master_weights(
    run_root, make_captioner, tiny_samples, tiny_images, fresh_accelerate_state
) -> None:
    cap = make_captioner(seed=SEED_MODEL, mixed_precision="bf16")
    before = trainable_state_dict(cap.model)
    args = _train_args(run_root, "bf16", num_epochs=1)
    train(cap, _dataset(tiny_samples, tiny_images), args, {})
    after = trainable_state_dict(cap.model)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)
    state = torch.load(args.run_dir / "checkpoint_0.pt", map_location="cpu", weights_only=True)
    moments = [s["exp_avg"] for s in state["optimizer_state_dict"]["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    log = json.loads((args.run_dir / TRAIN_LOG).read_text().splitlines()[0])
    assert np.isfinite(log["loss"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs fp16 (and keeps its state)")
def test_fp16_on_cpu_is_refused(run_root, make_captioner, tiny_samples, tiny_images) -> None:
    data = _dataset(tiny_samples, tiny_images)
    with pytest.raises(SRDError, match="--mixed_precision fp16: needs a GPU"):
        train(make_captioner(mixed_precision="fp16"), data, _train_args(run_root, "fp16"), {})


def test_launcher_disagreement_is_refused(
    run_root, make_captioner, tiny_samples, tiny_images, monkeypatch
) -> None:
    data = _dataset(tiny_samples, tiny_images)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(SRDError, match="--mixed_precision no: the launcher asks for bf16"):
        train(make_captioner(), data, _train_args(run_root, "launcher"), {})


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch) -> None:
    """torchrun --nproc_per_node 2 on a one-GPU machine: rank 1 is told why, not "invalid
    device ordinal" from inside accelerate."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SRDError, match=r"process 1 of this machine has no GPU .*1 visible"):
        process_state()
