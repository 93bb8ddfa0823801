"""One rule for run folders: a run's identity is its resolved config.

Every stage that writes a folder follows the same order:

1. parse and check every flag and input (nothing written yet);
2. compare the resolved config with the one a saved artifact records (the run's
   ``config.json``, a poison plan, an LM init, a pool): a different config is refused with one
   line naming the differing keys, unless ``--overwrite``;
3. under ``--overwrite``, move the old folder's contents out of the way in one rename before
   the first new byte (so old and new files never mix, even when killed);
4. write the outputs, and the "finished" signal (``DONE``, the result file) last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from srd.errors import SRDError
from srd.io import path_digest, read_json

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
"""The resolved config of a run, in its folder."""

RESUME_FREE_KEYS = ("resume_from_checkpoint", "overwrite", "num_workers", "external_save_dir")
"""Keys that may differ when a run is resumed: they do not change what the run computes."""

_MISSING = "<absent>"


def _canonical(value: Any) -> Any:
    """JSON round trip, so tuples equal lists and keys are strings, as in the saved file."""
    return json.loads(json.dumps(value, default=str))


def differing_keys(
    saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()
) -> list[str]:
    """Sorted keys whose values differ between two configs (a key absent on one side differs)."""
    saved, current = _canonical(dict(saved)), _canonical(dict(current))
    skip = set(ignore)
    keys = (set(saved) | set(current)) - skip
    return sorted(k for k in keys if saved.get(k, _MISSING) != current.get(k, _MISSING))


def _short(value: Any, width: int = 32) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_difference(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: list[str], limit: int = 4
) -> str:
    """``poison_rate 0.5 -> 0.1, seed 3 -> 4`` for the first ``limit`` keys (+ how many more)."""
    saved, current = _canonical(dict(saved)), _canonical(dict(current))
    parts = [
        f"{k} {_short(saved.get(k, _MISSING))} -> {_short(current.get(k, _MISSING))}"
        for k in keys[:limit]
    ]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more: {', '.join(keys[limit:])}")
    return ", ".join(parts)


def check_same_config(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    where: str,
    what: str = "run",
    ignore: Iterable[str] = (),
) -> None:
    """SRDError naming the differing keys when ``current`` is not the config ``saved`` records."""
    keys = differing_keys(saved, current, ignore)
    if keys:
        raise SRDError(
            f"{where}: {what} was made with other settings "
            f"({describe_difference(saved, current, keys)}); pass --overwrite to redo it, "
            "or use another folder"
        )


def check_run_config(
    run_dir: str | os.PathLike,
    record: Mapping[str, Any],
    where: str,
    ignore: Iterable[str] = RESUME_FREE_KEYS,
) -> None:
    """Refuse to continue or reuse ``run_dir`` when its ``config.json`` records another config."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return
    saved = read_json(path, flag=where.split(" ", 1)[0] if where.startswith("--") else None)
    if not isinstance(saved, dict):
        raise SRDError(f"{where}: {path} is not a run config (a JSON object)")
    check_same_config(saved, record, f"{where} ({path})", "the saved run", ignore)


def input_digests(paths: Mapping[str, str | os.PathLike | None]) -> dict[str, str]:
    """``{"<name>_sha256": digest}`` of each existing file or folder of ``paths``
    (srd.io.path_digest; hub ids, ``none`` and absent paths are left out). A run records them
    in its ``config.json`` beside its flags, so resuming over changed inputs (a replaced
    checkpoint, an image overwritten in place) is refused like changed flags."""
    return {
        f"{name}_sha256": path_digest(path)
        for name, path in paths.items()
        if path is not None and Path(path).exists()
    }


def check_run_name(name: str, flag: str) -> str:
    """``name`` when it names a folder below its parent (``backdoor-badnet``,
    ``embedded/clip``); SRDError otherwise: a name is never absolute, never climbs out with
    ``..`` and has no empty or ``.`` part, so a run (and its ``--overwrite``) stays in its folder.
    """
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith(("/", "~")) or any(p in ("", ".", "..") for p in parts):
        raise SRDError(
            f"{flag} {name}: expected a name below its folder (no leading '/' or '~', no '..', "
            "'.' or empty part)"
        )
    return name


def _protected(folder: Path) -> str | None:
    """Why ``folder`` must never be cleared (None when it may be)."""
    resolved = folder.resolve()
    for keep in (Path.cwd().resolve(), Path.home().resolve()):
        if resolved == keep or resolved in keep.parents:
            return f"it holds {keep}"
    if (resolved / ".git").exists():
        return "it is a git repository"
    for child in resolved.iterdir():
        if child.is_dir() and any((child / name).exists() for name in ("DONE", CONFIG_FILE)):
            if child.name != "lm_init":
                return f"it holds another run, {child.name}"
    return None


def clear_folder(folder: str | os.PathLike, flag: str) -> None:
    """Empty ``folder`` for an ``--overwrite`` run: one rename moves the old contents aside
    (a hidden sibling), then they are deleted. A kill at any point leaves either the old
    folder whole or an empty one, never old files beside new ones."""
    folder = Path(folder)
    for stale in folder.parent.glob(f".{folder.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise SRDError(f"{flag} {folder}: not a folder")
    if not any(folder.iterdir()):
        return
    reason = _protected(folder)
    if reason:
        raise SRDError(f"{flag} {folder}: refusing to clear it for --overwrite ({reason})")
    trash = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    try:
        folder.rename(trash)
        folder.mkdir()
    except OSError as exc:
        raise SRDError(
            f"{flag} {folder}: cannot clear it for --overwrite ({exc.strerror})"
        ) from None
    shutil.rmtree(trash, ignore_errors=True)
    log.info("--overwrite: cleared %s", folder)


def remove_paths(paths: Iterable[str | os.PathLike]) -> None:
    """Delete files and folders, in the order given (put the "finished" signal first)."""
    for path in map(Path, paths):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """SRDError naming ``flag`` when the folder ``path`` could not be created or written,
    checked without creating anything (the nearest existing ancestor must be a writable
    folder), so a bad output location fails before any work."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise SRDError(f"{flag} {path}: cannot create folder ({probe} is a file)")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise SRDError(f"{flag} {path}: folder is not writable ({probe})")
