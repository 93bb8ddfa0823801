"""PAR's two light image augmentations and CleanCLIP's augmented views (image and text).

PAR (reference §1.4): with p = 1/2 add non-negative Gaussian noise ``clip(N(0, 0.2^2), 0, 1)``
to the [0, 1] image and clip; normalise with the CLIP mean/std; with p = 1/2 erase a square of
0.5-1% of the image to 0 (the dataset-mean colour after normalisation), 4 px from the border.
All randomness comes from the ``numpy`` generator passed in, so runs repeat with one seed.
"""

from __future__ import annotations

import math

import numpy as np
import open_clip
import torch
from torchvision.transforms import v2

NOISE_STD = 0.2
ERASE_SCALE = (0.005, 0.01)
ERASE_MARGIN = 4


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def par_augment(images: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised (B, 3, S, S) floats with PAR's noise and erase."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    b, _, h, w = x.shape
    noisy = torch.as_tensor(rng.random(b) < p)
    if noisy.any():
        noise = torch.as_tensor(rng.normal(0.0, NOISE_STD, size=(int(noisy.sum()), 3, h, w)))
        x[noisy] = (x[noisy] + noise.float().clamp(0, 1)).clamp(0, 1)
    x = _normalise(x)
    for i in np.flatnonzero(rng.random(b) < p):
        side = int(round(math.sqrt(rng.uniform(*ERASE_SCALE) * h * w)))
        top = int(rng.integers(ERASE_MARGIN, h - side - ERASE_MARGIN + 1))
        left = int(rng.integers(ERASE_MARGIN, w - side - ERASE_MARGIN + 1))
        x[i, :, top : top + side, left : left + side] = 0.0
    return x


def image_views(images: np.ndarray, seed: int) -> torch.Tensor:
    """CleanCLIP's image view: AutoAugment (ImageNet policy) of each uint8 image, normalised.

    torchvision draws from torch's global generator, so it is seeded here per batch.
    """
    torch.manual_seed(seed)
    policy = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2)
    out = torch.stack([policy(img) for img in x]).float() / 255.0
    return _normalise(out)


def text_view(caption: str, rng: np.random.Generator, p_delete: float = 0.1) -> str:
    """CleanCLIP's text view (EDA-style): drop each word with ``p_delete``, then swap two words."""
    words = caption.split()
    kept = [w for w in words if rng.random() >= p_delete] or words[:1]
    if len(kept) > 1:
        i, j = rng.choice(len(kept), size=2, replace=False)
        kept[i], kept[j] = kept[j], kept[i]
    return " ".join(kept)
