"""Config dataclasses become command lines.

Each entry point composes a few dataclasses (model, data, training...) whose fields carry a
one-line ``help``; :func:`parse` builds one argparse parser from them, so a flag is declared
once and documented once. Flag names are the field names (``--lm_path``), as in the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from srd.errors import SRDError
from srd.flags import Range, check_flags

T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are SRDErrors: one ``error:`` line and exit 2 through run_main."""

    def error(self, message: str) -> typing.NoReturn:
        raise SRDError(message)


def arg(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002
    check: Range | None = None,
    **kwargs: Any,
) -> Any:
    """A dataclass field with a help string (``default`` omitted means the flag is required)
    and, for a number, the range it must lie in (:class:`srd.flags.Range`, checked by
    :func:`parse` before the entry point does anything)."""
    metadata = {"help": help, **kwargs}
    if check is not None:
        metadata["check"] = check
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for ``X | None`` annotations."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_to_parser(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per field of dataclass ``cls``."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            kwargs["nargs"] = "+"
            kwargs["type"] = typing.get_args(tp)[0]
        else:
            kwargs["type"] = tp
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        group.add_argument(f"--{f.name}", **kwargs)


def parse(argv: Sequence[str] | None, *classes: type, description: str = "") -> tuple[Any, ...]:
    """Parse ``argv`` into one instance of each dataclass of ``classes`` (unique field names).

    Bad flags (unknown, malformed, or out of the range declared on the field) raise SRDError.
    """
    parser = _Parser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a prefix is an error, never silently another flag
    )
    for cls in classes:
        add_to_parser(parser, cls)
    ns = vars(parser.parse_args(argv))
    out = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in ns.items() if k in names}
        for f in dataclasses.fields(cls):
            if typing.get_origin(typing.get_type_hints(cls)[f.name]) is tuple:
                values[f.name] = tuple(values[f.name])
        out.append(cls(**values))
    check_flags(out)  # ranges of every numeric flag, before the entry point does anything
    return tuple(out)


def to_dict(*configs: Any) -> dict[str, Any]:
    """Resolved configuration of a run, for its JSON record."""
    merged: dict[str, Any] = {}
    for cfg in configs:
        merged.update(dataclasses.asdict(cfg))
    return merged
