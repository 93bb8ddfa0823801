"""Atomic file output and run folders.

Every file a stage writes goes through a temporary file in the same folder followed by
``os.replace``, so a killed process never leaves a half-written result behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from srd.errors import SRDError

DONE_MARKER = "DONE"
"""File written last in a finished run folder."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except (OSError, RuntimeError) as exc:  # torch's writer raises RuntimeError
            if _disk_full(exc, path.parent):
                raise SRDError(
                    f"{path}: no space left on device (nothing was written; free space on "
                    f"{path.parent} and run again)"
                ) from None
            raise
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for want of space (ENOSPC, or a library's own error
    while the folder's file system has under 1 MiB free)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, flag: str | None = None) -> Any:
    """Read a JSON file, turning a missing or malformed file into an SRDError naming it."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if not path.is_file():
        raise SRDError(f"{where}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SRDError(f"{where}: not valid JSON ({exc})") from None


def ensure_dir(path: str | os.PathLike, flag: str | None = None) -> Path:
    """Create a folder (and parents) and check it is writable; SRDError otherwise."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SRDError(f"{where}: cannot create folder ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise SRDError(f"{where}: folder is not writable")
    return path


def is_finished(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / DONE_MARKER).is_file()


def mark_finished(run_dir: str | os.PathLike) -> None:
    write_text(Path(run_dir) / DONE_MARKER, "done\n")


def prepare_run_dir(
    run_dir: str | os.PathLike, overwrite: bool = False, flag: str | None = None
) -> Path:
    """Create a run folder; refuse to reuse a finished one unless ``overwrite``."""
    run_dir = ensure_dir(run_dir, flag)
    if is_finished(run_dir) and not overwrite:
        raise SRDError(
            f"{flag + ' ' if flag else ''}{run_dir}: run already finished "
            "(pass --overwrite to redo it)"
        )
    if overwrite and is_finished(run_dir):
        (run_dir / DONE_MARKER).unlink()
    return run_dir


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to ``log_file`` (appending, so resumed runs keep history)."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        ensure_dir(Path(log_file).parent)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (streamed), to pin the exact inputs of a run."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_HELD: dict[Path, list] = {}
"""Writer locks this process holds: lock file -> [open file, depth] (re-entrant)."""


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike, flag: str) -> Iterator[None]:
    """Hold the one-writer lock of an output (a run folder, a result file) while the block
    runs: a second process that tries to write the same output meanwhile gets SRDError naming
    ``flag`` instead of mixing or replacing the first one's files. An advisory ``flock`` on
    ``.<name>.lock`` beside ``target`` (never inside it: ``--overwrite`` moves a run folder
    aside); the kernel releases it when the holder dies, so a killed run leaves no stale lock.
    Re-entrant within a process (an entry point and the engine it calls)."""
    import fcntl

    target = Path(target)
    lock = ensure_dir(target.parent).resolve() / f".{target.name}.lock"
    held = _HELD.get(lock)
    if held is None:
        handle = open(lock, "a")  # noqa: SIM115 (held until the block ends)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise SRDError(
                f"{flag} {target}: another process is writing it now ({lock.name} is locked); "
                "wait for it to finish, or use another name"
            ) from None
        held = _HELD[lock] = [handle, 0]
    held[1] += 1
    try:
        yield
    finally:
        held[1] -= 1
        if held[1] == 0:
            del _HELD[lock]
            held[0].close()  # releases the lock


DIGEST_CACHE_ENV = "SRD_CACHE_DIR"
"""Where folder digests keep their per-file cache (default ``~/.cache/srd``)."""


def tree_digest(folder: str | os.PathLike) -> str:
    """sha256 over every file below ``folder``: each file's path relative to it and its sha256,
    in sorted order (hidden files, e.g. a write in progress, are left out). A file's sha256 is
    cached by (size, mtime, inode) in one JSON per folder under ``$SRD_CACHE_DIR`` (default
    ``~/.cache/srd/digests``), so a re-run re-reads only files that changed: 3,000 images cost a
    few stat calls each, not their bytes. An unwritable cache only costs the re-reading."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise SRDError(f"{folder}: not a folder")
    root = Path(os.environ.get(DIGEST_CACHE_ENV) or Path.home() / ".cache" / "srd")
    cache_file = root / "digests" / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:32]}.json"
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        cached = {}
    files: dict[str, list] = {}
    for top, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            path = Path(top) / name
            info = path.stat()
            rel = path.relative_to(folder).as_posix()
            key = [info.st_size, info.st_mtime_ns, info.st_ino]
            old = cached.get(rel)
            same = isinstance(old, list) and len(old) == 4 and old[:3] == key
            files[rel] = old if same else [*key, file_digest(path)]
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + bytes.fromhex(files[rel][3]))
    if files != cached:
        try:
            write_json(cache_file, {"folder": str(folder), "files": files})
        except (OSError, SRDError) as exc:
            logging.getLogger(__name__).debug("folder digest cache not written: %s", exc)
    return digest.hexdigest()


def path_digest(path: str | os.PathLike) -> str:
    """sha256 of a file (:func:`file_digest`) or of a folder (:func:`tree_digest`)."""
    return tree_digest(path) if Path(path).is_dir() else file_digest(path)


def require_files(*flag_paths: tuple[str, str | os.PathLike | None]) -> None:
    """SRDError naming the flag of the first (flag, path) whose file is missing; paths that are
    None or 'none' are skipped. Run before loading models, so bad input fails in a second."""
    for flag, path in flag_paths:
        if path is None or str(path).lower() in ("", "none"):
            continue
        if not Path(path).is_file():
            raise SRDError(f"{flag} {path}: file not found")
