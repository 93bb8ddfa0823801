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
    finished = False
    try:
        main(argv)
        finished = True
    except SRDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        end_process_group(wait_for_others=finished)


def light_main(call: Callable[[], int | None]) -> int:
    """Exit code of a light command (``python -m srd.stamp``, ``srd.defenses``, ``srd.soda``):
    ``call``'s own code (None: 0), or 2 after one ``error: ...`` line on bad input. Unlike
    ``run_main`` it never imports torch (no process group to end), and it hands on the code."""
    try:
        return call() or 0
    except SRDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def end_process_group(wait_for_others: bool = True) -> None:
    """Leave the torch.distributed group, if one was started, before the interpreter exits.

    Two gloo ranks that exit with their group still alive can abort in the C++ teardown
    ("terminate called without an active exception") after all their work is written. After a
    normal finish a barrier first makes sure no rank leaves while another still talks to it; after
    an error there is no barrier (the other ranks may never reach it).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if wait_for_others:
                dist.barrier()
        finally:
            dist.destroy_process_group()
