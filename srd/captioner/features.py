"""Frozen work done once: a cache of vision-tower features keyed by image content.

In every stage after pretraining (attack, refine-tune, evaluation, SRD pool and cleaning) the
vision tower is frozen, so the patch tokens of one image version (clean, triggered, masked) are
the same for its five captions and for every epoch. :class:`FeatureCache` computes them once.

It can never serve stale features: the key is a hash of the image's bytes (a trigger or a red
square changes the key), and the cache is bound to one tower by a fingerprint of the tower's
weights and class taken when the cache is made; :meth:`FeatureCache.check` refuses to serve a
tower whose fingerprint changed (or that is trainable, which would make features go stale
during training).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from srd.errors import SRDError

log = logging.getLogger(__name__)


def image_key(image: np.ndarray) -> bytes:
    """Content key of a uint8 image: shape + bytes hashed (blake2b, 16 bytes)."""
    arr = np.ascontiguousarray(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(str((arr.shape, arr.dtype.str)).encode())
    h.update(arr.data)
    return h.digest()


def tower_fingerprint(tower: torch.nn.Module) -> str:
    """Hash of a module's class, parameter and buffer values (changes when any weight does)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tower).__qualname__.encode())
    for name, tensor in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """``cache(images, encode) -> (B, N, D)`` features of uint8 images, computed once each.

    ``encode(images) -> (B, N, D)`` runs the tower on the images the cache has not seen (in one
    batch, in the order given), so the first pass over a data set costs what the uncached pass
    costs and every later pass only a lookup. At most ``max_mb`` MiB of features are kept (at
    COCO scale a ViT-L-14's tokens are 1 MiB per image); images beyond it are encoded each time.
    """

    def __init__(self, tower: torch.nn.Module, max_mb: float = float("inf")):
        self.tower = tower
        self.fingerprint = tower_fingerprint(tower)
        self.max_bytes = max_mb * 2**20
        self.bytes = 0
        self._store: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def check(self) -> None:
        """SRDError unless the tower is frozen and its weights are those the cache was made for."""
        if any(p.requires_grad for p in self.tower.parameters()):
            raise SRDError("feature cache: the vision tower is trainable; features would go stale")
        if tower_fingerprint(self.tower) != self.fingerprint:
            raise SRDError("feature cache: the vision tower's weights changed since it was made")

    def __call__(
        self,
        images: Sequence[np.ndarray],
        encode: Callable[[Sequence[np.ndarray]], torch.Tensor],
    ) -> torch.Tensor:
        keys = [image_key(im) for im in images]
        missing = [i for i, k in enumerate(dict.fromkeys(keys)) if k not in self._store]
        unique = list(dict.fromkeys(keys))
        fresh: dict[bytes, torch.Tensor] = {}
        if missing:
            computed = encode([images[keys.index(unique[i])] for i in missing]).detach().cpu()
            for row, i in enumerate(missing):
                fresh[unique[i]] = computed[row].clone()
                size = computed[row].numel() * computed.element_size()
                if self.bytes + size <= self.max_bytes:  # full: computed, not kept
                    self._store[unique[i]] = fresh[unique[i]]
                    self.bytes += size
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([self._store[k] if k in self._store else fresh[k] for k in keys])
