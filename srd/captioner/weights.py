"""Reading state dicts from safetensors or torch files, never unpickling code."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from srd.errors import SRDError
from srd.io import atomic_path


def read_state_dict(path: str | os.PathLike, flag: str) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch file (weights only, never pickle code)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raw = read_checkpoint_file(path, flag)
        return raw.get("model_state_dict", raw)
    if not path.is_file():
        raise SRDError(f"{flag} {path}: file not found")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # corrupt or foreign file
        raise SRDError(f"{flag} {path}: cannot read checkpoint ({type(exc).__name__})") from None


def read_checkpoint_file(path: Path, flag: str) -> dict[str, Any]:
    if not path.is_file():
        raise SRDError(f"{flag} {path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise SRDError(f"{flag} {path}: cannot read checkpoint ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise SRDError(f"{flag} {path}: not a state dict")
    return obj


def write_checkpoint_file(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """``torch.save(payload)`` to ``path`` atomically, through an open file: torch names the
    archive's records after a file *path* it is given (here the random temporary name), so
    saving to a path gave identical tensors another sha256 on every run; through a handle the
    records are named ``archive/...`` and identical payloads give identical bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)


def write_safetensors_file(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """safetensors of ``tensors`` (+ ``metadata``) to ``path`` atomically, its JSON header's keys
    sorted: the library writes the metadata map in an order drawn per process, so identical
    tensors with two or more metadata keys gave another sha256 on every run (and stamps refused
    an identical re-run). Sorting keeps the header's length, so the data offsets hold."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    encoded = text.encode("utf-8")
    if len(encoded) <= size:  # (always: the same JSON, reordered; padding fills the rest)
        data = data[:8] + encoded.ljust(size, b" ") + data[8 + size :]
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
