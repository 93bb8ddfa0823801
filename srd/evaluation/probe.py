"""Does a frozen vision tower see an attribute? A linear probe on the tokens the captioner reads.

The captioner only ever sees :func:`srd.captioner.vision.tower_tokens` of its frozen tower, so what
those tokens do not carry (linearly) the perceiver and the LM can hardly learn to name. On the
benchmark's single-object images, each image's tokens are pooled (mean and max over the tokens,
concatenated), standardised with the training images' statistics, and a multinomial logistic
regression (L2, L-BFGS, deterministic) is fitted per attribute (colour, shape) on training images
and scored on test images. Chance is one over the number of classes.

:func:`trigger_shift` asks the same tokens how far an image trigger moves them: the mean distance
between an image's clean and triggered tokens, over the mean distance between two different clean
images. :func:`trigger_detection` asks whether that move has a direction a linear read-out can
use: a probe told clean from triggered on training images, scored on test images (chance 50%).
A large shift that no probe can detect moves every image its own way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from srd.errors import SRDError

ATTRIBUTES = ("colour", "shape")


def _pooled(tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([tokens.mean(1), tokens.amax(1)], dim=1)


def _flat(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.flatten(1)


FEATURES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"pooled": _pooled, "tokens": _flat}
"""Two reads of an image's (T, D) tokens: mean- and max-pooled (where a trigger is, is lost),
and every token in place (what the perceiver reads)."""


def encoded(
    encode: Callable[[np.ndarray], torch.Tensor],
    images: np.ndarray,
    reduces: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Each of ``reduces`` applied to the (B, T, D) tokens that ``encode`` gives for uint8
    images, in batches: one pass of the tower for all of them."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in reduces}
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            tokens = encode(images[start : start + batch_size]).float()
            for name, reduce in reduces.items():
                out[name].append(reduce(tokens).cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def token_features(
    encode: Callable[[np.ndarray], torch.Tensor], images: np.ndarray, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Every read of :data:`FEATURES` of uint8 images, from one pass of the tower."""
    return encoded(encode, images, FEATURES, batch_size)


def pooled_tokens(
    encode: Callable[[np.ndarray], torch.Tensor], images: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """(N, 2D) mean- and max-pooled tokens of uint8 images; ``encode`` gives (B, T, D) tokens."""
    return encoded(encode, images, {"pooled": _pooled}, batch_size)["pooled"]


def fit_probe(
    train_x: np.ndarray, train_y: np.ndarray, classes: int, l2: float = 1e-3, iters: int = 500
) -> Callable[[np.ndarray], np.ndarray]:
    """A softmax regression fitted by L-BFGS from zero weights; returns a predict function."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.as_tensor((train_x - mean) / std, dtype=torch.float64)
    y = torch.as_tensor(train_y, dtype=torch.long)
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def predict(test_x: np.ndarray) -> np.ndarray:
        z = torch.as_tensor((test_x - mean) / std, dtype=torch.float64)
        with torch.no_grad():
            return (z @ weight + bias).argmax(1).numpy()

    return predict


def probe_attributes(
    train_x: np.ndarray,
    train_labels: Sequence[dict[str, str]],
    test_x: np.ndarray,
    test_labels: Sequence[dict[str, str]],
    vocab: dict[str, Sequence[str]],
) -> dict[str, Any]:
    """{attribute: {train, test accuracy, chance, classes}} of one probe per attribute."""
    if len(train_x) < 2 or len(test_x) < 1:
        raise SRDError(
            f"tower probe: {len(train_x)} training and {len(test_x)} test single-object images "
            "(need at least 2 and 1)"
        )
    out: dict[str, Any] = {}
    for attr, names in vocab.items():
        index = {n: i for i, n in enumerate(names)}
        ytr = np.array([index[lab[attr]] for lab in train_labels])
        yte = np.array([index[lab[attr]] for lab in test_labels])
        predict = fit_probe(train_x, ytr, len(names))
        out[attr] = {
            "train_accuracy": float((predict(train_x) == ytr).mean()),
            "test_accuracy": float((predict(test_x) == yte).mean()),
            "chance": 1.0 / len(names),
            "classes": list(names),
        }
    return out


def trigger_shift(clean: np.ndarray, triggered: np.ndarray, seed: int = 0) -> dict[str, float]:
    """How far a trigger moves the features (rows: images; ``triggered[i]`` is ``clean[i]``
    with the trigger): mean L2 distance clean -> triggered, the mean distance between two
    different clean images (each image against a seeded other one), and their ratio (0: the
    tower does not see the trigger; 1: as far as another image)."""
    if clean.shape != triggered.shape or len(clean) < 2:
        raise SRDError("trigger shift: needs at least 2 images, clean and triggered alike")
    order = np.random.default_rng(seed).permutation(len(clean))
    other = np.empty_like(order)
    other[order] = np.roll(order, 1)  # a derangement: never an image against itself
    moved = float(np.linalg.norm(triggered - clean, axis=1).mean())
    between = float(np.linalg.norm(clean[other] - clean, axis=1).mean())
    return {"trigger": moved, "between_images": between, "ratio": moved / max(between, 1e-12)}


def trigger_detection(
    clean_train: np.ndarray, triggered_train: np.ndarray, clean_test: np.ndarray,
    triggered_test: np.ndarray,
) -> dict[str, float]:  # fmt: skip
    """A linear probe (:func:`fit_probe`) of clean (0) vs triggered (1) features: fitted on the
    training images' two versions, scored on the test images' (balanced; chance 0.5)."""
    if len(clean_train) < 1 or len(clean_test) < 1:
        raise SRDError("trigger detection: needs at least 1 training and 1 test image")
    if clean_train.shape != triggered_train.shape or clean_test.shape != triggered_test.shape:
        raise SRDError("trigger detection: clean and triggered features differ in shape")

    def two_versions(clean: np.ndarray, triggered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.r_[np.zeros(len(clean), dtype=int), np.ones(len(triggered), dtype=int)]
        return np.concatenate([clean, triggered]), labels

    x_train, y_train = two_versions(clean_train, triggered_train)
    x_test, y_test = two_versions(clean_test, triggered_test)
    predict = fit_probe(x_train, y_train, 2)
    return {
        "train_accuracy": float((predict(x_train) == y_train).mean()),
        "test_accuracy": float((predict(x_test) == y_test).mean()),
        "chance": 0.5,
    }
