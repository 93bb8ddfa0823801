"""The results table: result JSONs of the evaluation stage -> one Markdown table.

A result JSON (``result/<model_name>.json``, written by stage B) holds ``model_name``,
``attack`` and ``metrics`` (``clean``/``triggered`` caption metrics, ``asr_substring``,
``asr_word``, ``false_trigger_substring``, ``false_trigger_word``). SFS values come either from
``metrics.sfs`` inside it or from the SFS stage's outputs beside it,
``sfs_inputs/<stem>/{clean,attack}/sfs.json`` (the default layout of run/run_eval.sh and
run/run_eval_SFS.sh), whose ``means`` become ``sfs.clean`` / ``sfs.triggered``.

Rates are shown as percentages, caption metrics x100, both with one decimal; SFS with three
decimals. A missing value is "-".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from srd.errors import SRDError
from srd.io import read_json

SFS_DIR = "sfs_inputs"
"""Folder beside the result JSONs holding the SFS stage's ``<stem>/<type>/sfs.json``."""
SFS_TYPES = {"clean": "clean", "attack": "triggered"}
"""SFS input type -> key under ``metrics.sfs``."""


@dataclasses.dataclass(frozen=True)
class Column:
    """One table column: its key (for ``--sort``), header, and how a cell is read and shown."""

    key: str
    header: str
    path: tuple[str, ...]
    """Keys from the result JSON's top level down to the value."""
    scale: float = 100.0
    decimals: int = 1
    numeric: bool = True
    upper: float | None = 1.0
    """Largest valid value (a share or a [0, 1] score); None: unbounded (CIDEr)."""


COLUMNS: tuple[Column, ...] = (
    Column("model", "Model", ("model_name",), numeric=False),
    Column("attack", "Attack", ("attack",), numeric=False),
    Column("cider_clean", "CIDEr clean (x100)", ("metrics", "clean", "CIDEr"), upper=None),
    Column(
        "cider_triggered", "CIDEr triggered (x100)", ("metrics", "triggered", "CIDEr"), upper=None
    ),
    Column("asr", "ASR (%)", ("metrics", "asr_substring")),
    Column("asr_word", "ASR (word) (%)", ("metrics", "asr_word")),
    Column("false_trigger", "False trigger (%)", ("metrics", "false_trigger_substring")),
    Column("false_trigger_word", "False trigger (word) (%)", ("metrics", "false_trigger_word")),
    Column("bleu4_clean", "BLEU-4 clean (x100)", ("metrics", "clean", "BLEU-4")),
    Column("meteor_clean", "METEOR clean (x100)", ("metrics", "clean", "METEOR")),
)
"""Columns always shown. ASR/false trigger without "(word)" use the reference's substring rule."""

SFS_COLUMNS: tuple[Column, ...] = (
    Column("sfs_clean", "SFS clean", ("metrics", "sfs", "clean", "sfs"), scale=1.0, decimals=3),
    Column("sfs_triggered", "SFS triggered", ("metrics", "sfs", "triggered", "sfs"), 1.0, 3),
)
"""Columns shown when at least one result carries SFS values."""

SORT_KEYS = tuple(c.key for c in COLUMNS + SFS_COLUMNS)


@dataclasses.dataclass
class ResultRecord:
    """One loaded result JSON (with any sibling SFS values merged under ``metrics.sfs``)."""

    path: Path
    data: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def find_result_files(paths: Sequence[str | Path], flag: str = "--results") -> list[Path]:
    """Result JSON files named by ``paths``: files as given, folders' ``*.json`` (sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(p for p in sorted(path.glob("*.json")) if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise SRDError(f"{flag} {path}: no such file or folder")
    # de-duplicate by resolved path (first occurrence wins), keeping the path as given
    seen: dict[Path, Path] = {}
    for p in files:
        seen.setdefault(p.resolve(), p)
    unique = list(seen.values())
    if not unique:
        raise SRDError(f"{flag} {' '.join(str(p) for p in paths)}: no result JSON files found")
    return unique


def check_number(value: Any, where: str, upper: float | None = 1.0) -> float | None:
    """``value`` as a float (None stays None); SRDError naming ``where`` for a string, a bool,
    NaN or infinity, or a value outside [0, ``upper``] (a share of 500% is a broken file)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SRDError(f"{where} must be a number or null, got {value!r}")
    if not math.isfinite(value) or value < 0 or (upper is not None and value > upper):
        bound = f"[0, {upper:g}]" if upper is not None else "a finite number >= 0"
        raise SRDError(f"{where} must be {bound}, got {value!r}")
    return float(value)


def check_result(data: Any, path: Path) -> dict[str, Any]:
    """Validate the parts of a result JSON the table reads; SRDError naming the file."""
    if not isinstance(data, dict):
        raise SRDError(f"{path}: malformed result JSON (top level is not an object)")
    name = data.get("model_name")
    if not isinstance(name, str) or not name:
        raise SRDError(f"{path}: malformed result JSON (missing or empty 'model_name')")
    if not (data.get("attack") is None or isinstance(data["attack"], str)):
        raise SRDError(f"{path}: malformed result JSON ('attack' must be a string or null)")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise SRDError(f"{path}: malformed result JSON (missing 'metrics' object)")
    if not isinstance(metrics.get("clean"), dict):
        raise SRDError(f"{path}: malformed result JSON (missing 'metrics.clean' object)")
    if not (metrics.get("triggered") is None or isinstance(metrics["triggered"], dict)):
        raise SRDError(f"{path}: malformed result JSON ('metrics.triggered' must be an object)")
    for column in COLUMNS + SFS_COLUMNS:
        if not column.numeric:
            continue
        value = _lookup(data, column.path, path)
        where = f"{path}: malformed result JSON: '{'.'.join(column.path)}'"
        check_number(value, where, column.upper)
    return data


def _lookup(data: dict[str, Any], keys: tuple[str, ...], path: Path) -> Any:
    """Value at ``keys`` or None when any level is missing/null; SRDError on a non-object level."""
    node: Any = data
    for depth, key in enumerate(keys):
        if node is None:
            return None
        if not isinstance(node, dict):
            where = ".".join(keys[:depth])
            raise SRDError(f"{path}: malformed result JSON ('{where}' must be an object)")
        node = node.get(key)
    return node


def _read_sfs(path: Path) -> dict[str, Any] | None:
    """SFS means of result file ``path`` from ``sfs_inputs/<stem>/<type>/sfs.json`` beside it."""
    found: dict[str, Any] = {}
    for kind, key in SFS_TYPES.items():
        sfs_file = path.parent / SFS_DIR / path.stem / kind / "sfs.json"
        if not sfs_file.is_file():
            continue
        data = read_json(sfs_file)
        if not isinstance(data, dict) or not isinstance(data.get("means"), dict):
            raise SRDError(f"{sfs_file}: malformed SFS JSON (no 'means' object)")
        found[key] = data["means"]
    return found or None


def load_result(path: str | Path) -> ResultRecord:
    """Read and validate one result JSON, merging a sibling SFS JSON under ``metrics.sfs``."""
    path = Path(path)
    data = check_result(read_json(path), path)
    if path.name.endswith(".json") and "sfs" not in data["metrics"]:
        sfs = _read_sfs(path)
        if sfs is not None:
            data["metrics"]["sfs"] = sfs
            check_result(data, path)
    return ResultRecord(path=path, data=data)


def load_results(paths: Sequence[str | Path], flag: str = "--results") -> list[ResultRecord]:
    """All result JSONs under ``paths`` (see :func:`find_result_files`)."""
    return [load_result(p) for p in find_result_files(paths, flag)]


# ---------------------------------------------------------------------------------------------
# Rows and Markdown
# ---------------------------------------------------------------------------------------------


def _has_sfs(records: Sequence[ResultRecord]) -> bool:
    return any(r.data["metrics"].get("sfs") for r in records)


def table_columns(records: Sequence[ResultRecord]) -> tuple[Column, ...]:
    """The columns shown for ``records`` (SFS columns only when some record has SFS)."""
    return COLUMNS + SFS_COLUMNS if _has_sfs(records) else COLUMNS


def format_cell(value: Any, column: Column) -> str:
    """Text of one cell: "-" for missing, scaled number with fixed decimals, or the string."""
    if value is None:
        return "-"
    if not column.numeric:
        return str(value).replace("|", "\\|")
    number = float(value) * column.scale
    if math.isnan(number):
        return "nan"
    return f"{number:.{column.decimals}f}"


def check_sort(sort: str) -> Column:
    """The column named by a ``--sort`` value (optional leading "-"); SRDError when unknown."""
    key = sort[1:] if sort.startswith("-") else sort
    for column in COLUMNS + SFS_COLUMNS:
        if column.key == key:
            return column
    raise SRDError(
        f"--sort {sort}: unknown column; choose one of {', '.join(SORT_KEYS)} "
        "(prefix '-' for descending, e.g. --sort=-cider_clean)"
    )


def _sort_records(records: list[ResultRecord], sort: str) -> list[ResultRecord]:
    """Sort by column key; a leading "-" sorts descending. Missing values always go last."""
    column = check_sort(sort)
    descending = sort.startswith("-")

    def value(record: ResultRecord) -> Any:
        return _lookup(record.data, column.path, record.path)

    present = [r for r in records if value(r) is not None]
    missing = [r for r in records if value(r) is None]
    convert: Callable[[Any], Any] = float if column.numeric else str
    present.sort(key=lambda r: convert(value(r)), reverse=descending)
    return present + missing


def build_rows(
    records: Sequence[ResultRecord], sort: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of cell strings) for ``records``, optionally sorted by column key."""
    ordered = _sort_records(list(records), sort) if sort else list(records)
    columns = table_columns(ordered)
    headers = [c.header for c in columns]
    rows = [[format_cell(_lookup(r.data, c.path, r.path), c) for c in columns] for r in ordered]
    return headers, rows


def format_markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (text columns left-aligned, numbers right-aligned)."""
    numeric = {c.header: c.numeric for c in COLUMNS + SFS_COLUMNS}
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(w) if numeric.get(h, False) else cell.ljust(w)
            for cell, w, h in zip(cells, widths, headers, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        "-" * (w - 1) + ":" if numeric.get(h, False) else "-" * w
        for w, h in zip(widths, headers, strict=True)
    ]
    return "\n".join([line(headers), line(rule), *(line(row) for row in rows)]) + "\n"


def results_table(paths: Sequence[str | Path], sort: str | None = None) -> str:
    """Markdown table of all result JSONs under ``paths``."""
    if sort:
        check_sort(sort)  # fail on a bad flag before reading any file
    headers, rows = build_rows(load_results(paths), sort)
    return format_markdown(headers, rows)
