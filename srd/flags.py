"""Ranges of the numeric command-line flags, declared on the fields they check.

A config field says what it accepts where it is declared: ``arg(32, help=..., check=COUNT)``
(:func:`srd.config.arg`). :func:`srd.config.parse` calls :func:`check_flags` on the parsed
configs, so a flag value that cannot work (``--batch_size 0``, ``--learning_rate -1``,
``--warmup_steps_ratio 2``) is refused with one line naming the flag before an entry point reads
or writes anything. Every ``int`` or ``float`` flag declares its range (a test checks it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from srd.errors import SRDError

SEED_MAX = 2**32 - 1
"""numpy seeds must fit 32 bits."""


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric flag: ``low``..``high`` (open ends optional), plus
    ``also`` (sentinels such as -1 for "all") and an optional ``multiple_of``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[float, ...] = ()
    multiple_of: int | None = None
    why: str = ""

    def allows(self, value: float) -> bool:
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return self.multiple_of is None or value % self.multiple_of == 0

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = (
                f"in {'(' if self.low_open else '['}{_num(self.low)}, "
                f"{_num(self.high)}{')' if self.high_open else ']'}"
            )
        elif self.low is not None:
            text = f"{'greater than' if self.low_open else 'at least'} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'less than' if self.high_open else 'at most'} {_num(self.high)}"
        else:
            text = "a finite number"
        if self.multiple_of is not None:
            text += f" and a multiple of {self.multiple_of}"
        if self.also:
            text = f"{' or '.join(_num(v) for v in self.also)} or {text}"
        return text + (f" ({self.why})" if self.why else "")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def at_least(n: float, why: str = "") -> Range:
    return Range(low=n, why=why)


def positive(why: str = "") -> Range:
    return Range(low=0, low_open=True, why=why)


def between(low: float, high: float, why: str = "", **kw: Any) -> Range:
    return Range(low=low, high=high, why=why, **kw)


COUNT = at_least(1)
SHARE = between(0, 1)
SEED = between(0, SEED_MAX)


def check_value(flag: str, value: Any, rule: Range) -> None:
    """SRDError ``--flag value: must be ...`` when ``value`` breaks ``rule`` (None passes)."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            check_value(flag, item, rule)
        return
    if isinstance(value, (int, float)) and not rule.allows(value):
        raise SRDError(f"--{flag} {value}: must be {rule.describe()}")


def check_flags(configs: Iterable[Any]) -> None:
    """Check every field of the config dataclass instances against what it declares: its range
    (``check``) and its ``choices`` (argparse checks those on the command line; this catches a
    config built in code)."""
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            rule = f.metadata.get("check")
            if rule is not None:
                check_value(f.name, value, rule)
            choices = f.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise SRDError(
                    f"--{f.name} {value}: expected one of {', '.join(map(str, choices))}"
                )
