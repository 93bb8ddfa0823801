"""Shared fixtures: a tiny synthetic benchmark and a tiny, untrained OpenFlamingo captioner.

Everything is session-scoped and built on the CPU in about a second: 24/4/8 benchmark images, a
word-level tokenizer over their captions, a 2-layer Llama of width 32, the shipped ``tiny-vit``
vision config and a one-layer perceiver with 4 latents.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from srd.captioner.args import ModelArgs, with_overrides
from srd.captioner.engine import Sample
from srd.captioner.factory import build_flamingo
from srd.captioner.flamingo import Captioner
from srd.captioner.tiny import build_word_tokenizer, create_tiny_lm
from srd.data.benchmark import BenchmarkPaths, generate_benchmark
from srd.data.records import DataArgs, ImageRecord, caption_records, load_image

# The test machine's cores are shared: with several intra-op threads, the tiny models' many small
# matmuls spend most of their time waiting for each other (captioning measured 20x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _digest_cache(tmp_path_factory: pytest.TempPathFactory):
    """Folder digests (srd.io.tree_digest) cache into the session's temporary folder, not the
    user's ~/.cache (inherited by the entry points and scripts the tests start)."""
    import os

    from srd.io import DIGEST_CACHE_ENV

    before = os.environ.get(DIGEST_CACHE_ENV)
    os.environ[DIGEST_CACHE_ENV] = str(tmp_path_factory.mktemp("digest_cache"))
    yield
    if before is None:
        os.environ.pop(DIGEST_CACHE_ENV, None)
    else:
        os.environ[DIGEST_CACHE_ENV] = before


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """Entry points run in-process call ``setup_logging``, which binds a stream handler to the
    stderr of that moment (a test's capture, closed after it); put the root handlers back after
    every test so a later test's logs never go to a closed stream."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory: pytest.TempPathFactory) -> BenchmarkPaths:
    """A synthetic benchmark folder with 24 train, 4 val and 8 test images (5 captions each)."""
    root = tmp_path_factory.mktemp("tiny_benchmark")
    return generate_benchmark(root, seed=0, num_train=24, num_val=4, num_test=8)


@pytest.fixture(scope="session")
def tiny_data_args(tiny_benchmark: BenchmarkPaths) -> DataArgs:
    """The four --coco_* data flags pointing at the tiny benchmark."""
    return DataArgs(
        coco_train_image_dir_path=str(tiny_benchmark.train_image_dir),
        coco_val_image_dir_path=str(tiny_benchmark.val_image_dir),
        coco_karpathy_json_path=str(tiny_benchmark.karpathy_json),
        coco_annotations_json_path=str(tiny_benchmark.annotations_json),
    )


@pytest.fixture(scope="session")
def tiny_train_records(tiny_data_args: DataArgs) -> list[ImageRecord]:
    return tiny_data_args.split("train")


@pytest.fixture(scope="session")
def tiny_test_records(tiny_data_args: DataArgs) -> list[ImageRecord]:
    return tiny_data_args.split("test")


@pytest.fixture(scope="session")
def tiny_images(
    tiny_train_records: list[ImageRecord], tiny_test_records: list[ImageRecord]
) -> dict[int, np.ndarray]:
    """uint8 (224, 224, 3) train and test images by image id."""
    return {r.image_id: load_image(r.path) for r in tiny_train_records + tiny_test_records}


@pytest.fixture(scope="session")
def tiny_samples(tiny_train_records: list[ImageRecord]) -> list[Sample]:
    """16 training samples (the first captions by caption id)."""
    records = caption_records(tiny_train_records)[:16]
    return [Sample(r.caption_id, r.image_id, r.caption) for r in records]


@pytest.fixture(scope="session")
def tiny_lm_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_train_records: list[ImageRecord]
) -> Path:
    """A randomly initialised tiny Llama + word-level tokenizer saved as an HF folder."""
    texts = [c.caption for c in caption_records(tiny_train_records)]
    tokenizer = build_word_tokenizer(texts)
    folder = tmp_path_factory.mktemp("tiny_lm")
    return create_tiny_lm(folder, tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)


@pytest.fixture(scope="session")
def tiny_model_args(tiny_lm_dir: Path) -> ModelArgs:
    """Flags of an untrained tiny captioner (random vision tower, no checkpoint)."""
    return ModelArgs(
        vision_encoder_path="tiny-vit",
        vision_encoder_pretrained="none",
        lm_path=str(tiny_lm_dir),
        checkpoint_path="none",
        perceiver_depth=1,
        perceiver_num_latents=4,
        perceiver_heads=2,
        perceiver_dim_head=16,
    )


def open_gates(captioner: Captioner, seed: int, noise: float = 0.3) -> None:
    """Give an untrained captioner varied, image-dependent output (in place, seeded).

    A fresh Flamingo's cross-attention gates are 0 (tanh(0) = 0), so the image cannot reach the
    text and every caption is the same (here empty). Tests comparing captions would then prove
    nothing, so the gates are set to 1 and the paper-trainable weights get seeded noise.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in captioner.model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(1.0)
            elif param.requires_grad and param.dim() > 1:
                param.add_(noise * torch.randn(param.shape, generator=gen))


@pytest.fixture(scope="session")
def make_captioner(tiny_model_args: ModelArgs) -> Callable[..., Captioner]:
    """Factory: ``make_captioner(seed=0, varied=True, **flag_overrides) -> Captioner``.

    The same seed gives bitwise the same weights (the random vision tower included);
    ``varied`` applies :func:`open_gates`.
    """

    def make(seed: int = 0, varied: bool = True, **overrides: Any) -> Captioner:
        torch.manual_seed(seed)
        captioner = build_flamingo(with_overrides(tiny_model_args, **overrides))
        if varied:
            open_gates(captioner, seed + 1)
        return captioner

    return make
