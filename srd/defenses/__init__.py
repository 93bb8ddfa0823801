"""Backdoor defenses behind one interface, selected by name (``--defense``).

Importing the package registers every defense: ``none``; the refine-tune defenses ``srd``,
``no_mask``, ``clean_finetune``, ``random_squares``, ``oracle_square``, ``fine_pruning``,
``par``, ``light_clean_ft`` and the response-level ``ppl_filter`` and ``byorn``; the data-free
edit ``clp``; the test-time purifications ``blur``, ``spatial`` and ``token_prune``. Each
declares its own flags (its ``Args``); ``python -m srd.defenses --list`` prints them. See
:mod:`srd.defenses.registry`.
"""

from srd.defenses import clp, par, pruning, purify, refine, relabel, tokens  # noqa: F401
from srd.defenses.registry import (
    DEFENSES,
    DefenderData,
    Defense,
    DefenseArgs,
    DefenseName,
    build_defense,
    chosen_defense,
    register_defense,
)
from srd.defenses.srd import defense  # noqa: F401  (registers srd)

__all__ = [
    "DEFENSES",
    "DefenderData",
    "Defense",
    "DefenseArgs",
    "DefenseName",
    "build_defense",
    "chosen_defense",
    "register_defense",
]
