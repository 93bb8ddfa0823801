"""Ranges of the numeric command-line flags, checked in one place for every entry point.

:func:`srd.config.parse` calls :func:`check_flags` on the parsed configs, so a flag value that
cannot work (``--batch_size 0``, ``--learning_rate -1``, ``--warmup_steps_ratio 2``) is refused
with one line naming the flag before an entry point reads or writes anything. Every ``int`` or
``float`` field of an entry point's config must have a rule here (a test checks it), looked up
as ``"<Class>.<field>"`` along the class's bases first, then by the field name alone.
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

RULES: dict[str, Range] = {
    # training (srd.captioner.engine.TrainArgs and the stage subclasses)
    "TrainArgs.batch_size": COUNT,
    "num_epochs": COUNT,
    "learning_rate": positive(),
    "warmup_steps_ratio": SHARE,
    "weight_decay": at_least(0),
    "max_grad_norm": positive(),
    "seed": SEED,
    "num_workers": at_least(0),
    # model
    "cross_attn_every_n_layers": COUNT,
    "perceiver_depth": COUNT,
    "perceiver_num_latents": COUNT,
    "perceiver_heads": COUNT,
    "perceiver_dim_head": COUNT,
    "lm_hidden_size": Range(low=4, multiple_of=4, why="the tiny Llama has 4 heads"),
    "lm_layers": COUNT,
    # captioning and scoring
    "batch_size": COUNT,
    "eval_batch_size": COUNT,
    "caption_batch_size": COUNT,
    "num_beams": COUNT,
    "reference_num_beams": COUNT,
    "max_new_tokens": COUNT,
    "reference_max_new_tokens": COUNT,
    "ngram_order": COUNT,
    "num_samples": Range(low=1, also=(-1,), why="-1: all"),
    "num_images": COUNT,
    # attack overrides (None = the attack config's value)
    "AttackArgs.poison_rate": between(0, 1, low_open=True),
    "AttackArgs.alpha": SHARE,
    # benchmark
    "num_train": COUNT,
    "num_val": COUNT,
    "num_test": COUNT,
    "captions_per_image": between(3, 7),
    # SRD pool, cleaning, reward
    "pool_size": Range(low=1, also=(-1,), why="-1: all"),
    "n_tries": COUNT,
    "epsilon": SHARE,
    "shard_id": at_least(0),
    "num_shards": COUNT,
    "RewardConfig.alpha": at_least(0),
    "alpha2": at_least(0),
    "beta": at_least(0),
    # red-mask environment and DQN
    "max_steps": COUNT,
    "obs_size": between(36, 224, why="NatureCNN needs at least 36 px; the canvas is 224"),
    "DQNConfig.learning_rate": positive(),
    "DQNConfig.batch_size": COUNT,
    "DQNConfig.max_grad_norm": positive(),
    "buffer_size": COUNT,
    "learning_starts": at_least(0),
    "tau": between(0, 1, low_open=True),
    "gamma": SHARE,
    "train_freq": COUNT,
    "gradient_steps": COUNT,
    "n_steps": COUNT,
    "target_update_interval": COUNT,
    "exploration_fraction": SHARE,
    "exploration_initial_eps": SHARE,
    "exploration_final_eps": SHARE,
    "features_dim": COUNT,
    "stats_window_size": COUNT,
    "total_timesteps": COUNT,
    "num_envs": COUNT,
    "max_replay_gb": positive(),
    "verbose": between(0, 2),
    # real mode (issue 11)
    "image_cache_mb": at_least(0),
    "feature_cache_mb": at_least(0),
    "pool_cache_mb": at_least(0),
    "save_total_limit": at_least(0),
    # tiny CLIP (train/pretrain_clip.py)
    "clip_batch_size": Range(low=2, why="a contrastive batch needs two pairs"),
    "clip_epochs": COUNT,
    "clip_learning_rate": positive(),
    "clip_weight_decay": at_least(0),
    "clip_warmup_ratio": between(0, 1, high_open=True),
    "clip_shape_negatives": at_least(0),
    "clip_group_batches": at_least(0),
    "probe_train_images": COUNT,
    # defenses (srd/defenses)
    "prune_ratio": between(0, 1, high_open=True),
    "blur_alpha": SHARE,
    "blur_radius_share": between(0, 1, low_open=True),
    "blur_radius_factor": positive(),
    "spatial_scale": between(0, 1, low_open=True),
    "spatial_angle": between(-180, 180),
    # diagnosis (eval/srd_coverage.py)
    "CoverageArgs.threshold": between(0, 1, low_open=True),
}


def rule_for(cls: type, name: str) -> Range | None:
    """The rule of field ``name`` of ``cls``: class-qualified along the bases, then by name."""
    for klass in cls.__mro__:
        rule = RULES.get(f"{klass.__name__}.{name}")
        if rule is not None:
            return rule
    return RULES.get(name)


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
    """Check every numeric field of the config dataclass instances against :data:`RULES`."""
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            rule = rule_for(type(cfg), f.name)
            if rule is not None:
                check_value(f.name, getattr(cfg, f.name), rule)
