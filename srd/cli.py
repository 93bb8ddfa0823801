"""Shared command-line plumbing: turning SRDError into a one-line error and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from srd.errors import SRDError

EXIT_BAD_INPUT = 2


def run_main(
    main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None
) -> None:
    """Run an entry point's ``main``; print ``error: ...`` and exit 2 on bad input."""
    try:
        main(argv)
    except SRDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
