"""The benchmark's training budgets: one source for the run scripts, the entry points and the
report.

``ATTACK`` is the attack's training (stage A, ``train/train_backdoor.py``'s defaults);
``REFINE`` is every refine-tune defense's, SRD's stage D4 included (the reference's own D4 budget,
20 epochs at lr 1e-4, stays the default of ``train/defend.py``). ``python -m srd.budgets`` prints
them as shell assignments (``BUDGET_ATTACK_EPOCHS=6`` ...) that ``run/common.sh`` evaluates;
an environment variable such as ``ATTACK_EPOCHS=12`` or ``EPOCHS=4`` still overrides one run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """One training budget (AdamW, warm-up then the schedule)."""

    epochs: int
    learning_rate: float
    batch_size: int = 32
    lr_scheduler: str = "cosine"
    warmup_steps_ratio: float = 0.01
    epoch_captions_per_image: int = 0
    """Caption samples an epoch draws per image (0: all five): ``--epoch_captions_per_image``."""


ATTACK = Budget(epochs=6, learning_rate=1e-3)
REFINE = Budget(epochs=2, learning_rate=1e-3)


def flag_text(value: float | int | str) -> str:
    """A value as the run scripts write it on a command line (1e-3, not 0.001)."""
    if isinstance(value, float) and 0 < value < 0.01:
        mantissa, exponent = f"{value:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return str(value)


def shell() -> str:
    """The budgets as shell assignments, for ``eval "$(python -m srd.budgets)"``."""
    lines = []
    for prefix, budget in (("BUDGET_ATTACK", ATTACK), ("BUDGET_REFINE", REFINE)):
        for name, value in dataclasses.asdict(budget).items():
            lines.append(f"{prefix}_{name.upper()}={flag_text(value)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(shell())
