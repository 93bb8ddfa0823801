"""The red-mask environment of SRD (reference §9.1) for gymnasium and stable-baselines3.

One action paints one red square (:mod:`srd.geometry`: 10x10 centres x 5 sizes = 500 actions)
on the ORIGINAL pool image; masks never accumulate, and the observation shows only the current
square (reference B10). The episode is therefore a contextual bandit whose observation also
shows the previous square. Each step captions the masked image with the backdoored captioner,
scores the caption against the stored reference caption (the SFS components S_sem, S_flu) and
rewards the change against the stored baselines with the reference table
(:mod:`srd.defenses.srd.reward`).

Captioning and scoring are injected callables, batched over images:

- ``caption_fn(images: list[np.ndarray (224, 224, 3) uint8]) -> list[str]``
- ``score_fn(captions: list[str], references: list[str]) -> (sem (N,), flu (N,))``

:class:`RedMaskEnv` is the single gymnasium environment;
:class:`srd.defenses.srd.vecenv.BatchedRedMaskVecEnv` steps N of them with ONE ``caption_fn`` and
ONE ``score_fn`` call per step (both go through :func:`step_envs`, so their semantics are
identical). Our variants (:mod:`srd.defenses.srd.variants`, off by default) subtract an area cost
from the learning reward and add an occlusion-map channel to the observation.

Replay memory. SB3's DQN keeps observations and next observations as uint8 arrays of shape
(buffer_size, *obs_shape) each. At the paper's 224x224x3 input its default buffer of 1e6 would
take 301 GB. The reference trains for 10,000 steps, so a 10,000-transition buffer never drops a
transition and behaves exactly like the reference's; see :func:`replay_memory_bytes`:

================  ===========  ==========================================
obs (H, W, 3)      buffer       replay memory (obs + next obs + the rest)
================  ===========  ==========================================
224 (paper)        1,000,000    301.1 GB (SB3 default: impossible)
224 (paper)        10,000       3.01 GB
84 (default)       10,000       0.42 GB
================  ===========  ==========================================

The default observation is downscaled to 84x84 (NatureCNN's design size; the smallest 20-px
square stays ~7 px wide). Actions always act on the 224 canvas. ``obs_size=224`` gives the
paper's policy input and still fits under 4 GB, but wants a GPU: its NatureCNN has 19.2 M
parameters (36,864 features into the 512-unit layer) against 1.9 M at 84, and on a shared
2-core CPU one update (batch 32) took 0.8-1.8 s against 0.03-0.1 s at 84.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image

from srd.config import arg
from srd.defenses.srd.reward import RewardConfig, caption_rewards
from srd.defenses.srd.variants import action_count, area_costs, check_occlusion_grid, with_map
from srd.errors import SRDError
from srd.flags import COUNT, at_least, between
from srd.geometry import IMAGE_SIZE, MASK_SIZES, NUM_ACTIONS, apply_action

log = logging.getLogger(__name__)

ENV_ID = "srd/RedMask-v0"
"""gymnasium id; ``gym.make(ENV_ID, pool=..., caption_fn=..., score_fn=...)``."""

REFERENCE_MAX_STEPS = 150
"""Episode length of the reference (truncation; there is no other termination)."""

DEFAULT_MAX_STEPS = 5
"""Our episode length (not the reference's 150). Masks never accumulate, so an episode is a
run of independent tries on one image: a short episode spreads the same transitions over more
pool images (on the embedded default's 300-image pool, 3,000 transitions visit every image
twice instead of 20 images once) and lets episodes end within a CPU budget."""

POOL_ORDERS = ("shuffled", "random")
"""How ``reset`` picks the next pool image: ``shuffled`` deals every image once per pass in a
seeded random order (ours: the whole pool is seen after ``len(pool)`` episodes); ``random``
draws uniformly with replacement (the reference's ``np.random.randint``)."""

DEFAULT_OBS_SIZE = 84
"""Side of the policy's observation (the 224 canvas downscaled; 224 = the paper's input)."""

DEFAULT_BUFFER_SIZE = 10_000
"""Replay transitions: the reference's 10,000 training steps all fit, nothing is dropped."""

CaptionFn = Callable[[list[np.ndarray]], list[str]]
ScoreFn = Callable[[list[str], list[str]], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class EnvConfig:
    """Red-mask environment (reference §9.1)."""

    max_steps: int = arg(
        DEFAULT_MAX_STEPS,
        help=f"steps per episode, one pool image each (ours: {DEFAULT_MAX_STEPS}, so that episodes "
        f"end and every pool image is visited within a CPU budget; reference "
        f"{REFERENCE_MAX_STEPS}: its 10,000 steps see ~67 images)",
        check=COUNT,
    )
    pool_order: str = arg(
        "shuffled",
        help="order of the episodes' pool images: shuffled = every image once per pass, in a "
        "seeded order shared by all environments (ours); random = uniform with replacement "
        "(the reference)",
        choices=list(POOL_ORDERS),
    )
    obs_size: int = arg(
        DEFAULT_OBS_SIZE,
        help="side of the policy observation: the 224 canvas is downscaled to it (224 = paper)",
        check=between(36, 224, why="NatureCNN needs at least 36 px; the canvas is 224"),
    )
    area_cost: float = arg(
        0.0,
        help="ours (srd.defenses.srd.variants): D2's learning reward is the table's minus this "
        "times the share of the canvas the square paints (0 = the reference's reward)",
        check=at_least(0),
    )
    max_square_side: int = arg(
        MASK_SIZES[-1],
        help="ours (srd.defenses.srd.variants): the largest square side the agent may paint; "
        f"sides above it leave the action space (one of {', '.join(map(str, MASK_SIZES))}; "
        f"{MASK_SIZES[-1]} = the reference's 500 actions)",
        choices=list(MASK_SIZES),
        check=between(MASK_SIZES[0], MASK_SIZES[-1]),
    )
    occlusion_grid: int = arg(
        0,
        help="ours (srd.defenses.srd.variants): a 4th observation channel, how much the "
        "backdoored captioner's caption changes when each cell of an N x N grid is painted red "
        "(N in 2-7; 0 = the reference's RGB observation)",
        check=between(2, 7, also=(0,), why="cells of 112 down to 32 px; 0 = off"),
    )


# --------------------------------------------------------------------------------------------
# The mask pool (stage D1 output, loaded by the caller)


class PoolRecord(NamedTuple):
    """One pool entry: the surrogate-triggered image and its unmasked baselines."""

    id: str
    image: np.ndarray
    base_sem: float
    base_flu: float
    reference: str


@dataclass
class MaskPool:
    """Aligned arrays of the RL pool, one row per surrogate-triggered training image.

    ``images`` (N, 224, 224, 3) uint8; ``base_sem``/``base_flu`` (N,) float baselines of the
    backdoored captioner on the unmasked image; ``references`` N clean reference captions;
    ``ids`` N unique image ids. ``source`` names the file it came from in error messages.
    Stage D2 reads the pool as a :class:`srd.defenses.srd.pool.StreamedPool` instead (the same
    interface:
    ``len``, ``pool[i]``, ``ids``; images loaded when an episode needs them).
    """

    images: np.ndarray
    base_sem: np.ndarray
    base_flu: np.ndarray
    references: list[str]
    ids: list[str]
    source: str = "mask pool"

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.base_sem = np.asarray(self.base_sem, dtype=np.float64)
        self.base_flu = np.asarray(self.base_flu, dtype=np.float64)
        self.references = [str(r) for r in self.references]
        self.ids = [str(i) for i in self.ids]
        n = len(self.ids)
        if n == 0:
            raise SRDError(f"{self.source}: the pool is empty")
        expected = (n, IMAGE_SIZE, IMAGE_SIZE, 3)
        if self.images.shape != expected or self.images.dtype != np.uint8:
            raise SRDError(
                f"{self.source}: images must be uint8 {expected}, "
                f"got {self.images.dtype} {self.images.shape}"
            )
        for name in ("base_sem", "base_flu"):
            if getattr(self, name).shape != (n,):
                raise SRDError(
                    f"{self.source}: {name} has shape {getattr(self, name).shape}, expected ({n},)"
                )
        if len(self.references) != n:
            raise SRDError(f"{self.source}: {len(self.references)} references for {n} images")
        if len(set(self.ids)) != n:
            raise SRDError(f"{self.source}: image ids are not unique")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> PoolRecord:
        return PoolRecord(
            id=self.ids[index],
            image=self.images[index],
            base_sem=float(self.base_sem[index]),
            base_flu=float(self.base_flu[index]),
            reference=self.references[index],
        )


def captioner_caption_fn(
    captioner: Any, num_beams: int = 3, max_new_tokens: int = 20, batch_size: int = 64
) -> CaptionFn:
    """``caption_fn`` of a :class:`srd.captioner.flamingo.Captioner` (reference decoding: beams 3,
    20 tokens)."""

    def caption(images: list[np.ndarray]) -> list[str]:
        return captioner.caption(
            images, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens
        )

    return caption


def sfs_score_fn(scorer: Any) -> ScoreFn:
    """``score_fn`` of a :class:`srd.evaluation.sfs.SFSScorer`: its (S_sem, S_flu) arrays."""

    def score(captions: list[str], references: list[str]) -> tuple[np.ndarray, np.ndarray]:
        scores = scorer.score(captions, references)
        return scores.sem, scores.flu

    return score


# --------------------------------------------------------------------------------------------
# Observations and memory


def to_observation(image: np.ndarray, obs_size: int) -> np.ndarray:
    """The policy's view of a 224x224x3 uint8 canvas: (obs_size, obs_size, 3) uint8.

    Box (area-average) downscaling, so a red square keeps its share of the pixels.
    """
    if obs_size == image.shape[0] == image.shape[1]:
        return np.array(image, dtype=np.uint8, copy=True)  # never hand out a view of the pool
    small = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize(
        (obs_size, obs_size), Image.Resampling.BOX
    )
    return np.asarray(small, dtype=np.uint8)


def policy_observation(
    image: np.ndarray, obs_size: int, cell_map: np.ndarray | None = None
) -> np.ndarray:
    """What the policy sees of a canvas: :func:`to_observation`, plus the image's occlusion map
    as a fourth channel when the agent reads one (:mod:`srd.defenses.srd.variants`)."""
    return with_map(to_observation(image, obs_size), cell_map)


def observation_space(obs_size: int, channels: int = 3) -> spaces.Box:
    """RGB, or RGB + the occlusion map (4 channels, :mod:`srd.defenses.srd.variants`)."""
    return spaces.Box(low=0, high=255, shape=(obs_size, obs_size, channels), dtype=np.uint8)


def replay_memory_bytes(
    obs_shape: Sequence[int],
    buffer_size: int,
    num_envs: int = 1,
    optimize_memory_usage: bool = False,
) -> int:
    """Bytes SB3's ``ReplayBuffer`` allocates for uint8 image observations and a Discrete action.

    SB3 keeps ``buffer_size // num_envs`` rows of ``num_envs`` transitions: observations, next
    observations (omitted when ``optimize_memory_usage``), int64 actions and float32 rewards,
    dones and timeouts.
    """
    rows = max(buffer_size // num_envs, 1) * num_envs
    obs_bytes = int(np.prod(obs_shape))
    copies = 1 if optimize_memory_usage else 2
    return rows * (copies * obs_bytes + 8 + 3 * 4)


# --------------------------------------------------------------------------------------------
# The environment


def _validate_action(action: Any, num_actions: int = NUM_ACTIONS) -> int:
    value = np.asarray(action)
    if value.size != 1 or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"action must be one integer, got {action!r}")
    a = int(value.reshape(()))
    if not 0 <= a < num_actions:
        raise ValueError(f"action {a} outside [0, {num_actions})")
    return a


class RedMaskEnv(gym.Env):
    """One red square per step on a pool image; ``max_steps``-step episodes (truncated).

    Observation: (obs_size, obs_size, 3) uint8 view of the current canvas (the unmasked image
    after ``reset``, then the image with the last step's square). Action: Discrete(500).
    ``info`` of a step: action, caption, sem, flu, reward, image_id, pool_index, step.
    ``reset(options={"index": i})`` picks pool image ``i``; otherwise ``pool_order`` decides
    (``shuffled``: the next image of a seeded permutation, reshuffled after each pass;
    ``random``: uniform with replacement). A seeded reset starts a new permutation.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        pool: MaskPool,
        caption_fn: CaptionFn,
        score_fn: ScoreFn,
        reward_config: RewardConfig | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        obs_size: int = DEFAULT_OBS_SIZE,
        render_mode: str | None = None,
        pool_order: str = "shuffled",
        area_cost: float = 0.0,
        occlusion: np.ndarray | None = None,
        max_square_side: int = MASK_SIZES[-1],
    ) -> None:
        if max_steps < 1:
            raise SRDError(f"--max_steps {max_steps}: must be at least 1")
        if not 1 <= obs_size <= IMAGE_SIZE:
            raise SRDError(f"--obs_size {obs_size}: must be in [1, {IMAGE_SIZE}]")
        if pool_order not in POOL_ORDERS:
            raise SRDError(f"--pool_order {pool_order!r}: expected one of {', '.join(POOL_ORDERS)}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode {render_mode!r} not supported (use 'rgb_array')")
        self.pool = pool
        self.caption_fn = caption_fn
        self.score_fn = score_fn
        self.reward_config = reward_config or RewardConfig()
        self.max_steps = int(max_steps)
        self.obs_size = int(obs_size)
        self.render_mode = render_mode
        self.pool_order = pool_order
        self._deck: list[int] = []
        if not area_cost >= 0:
            raise SRDError(f"--area_cost {area_cost}: must be at least 0")
        self.area_cost = float(area_cost)
        self.occlusion = None if occlusion is None else np.asarray(occlusion, dtype=np.float32)
        if self.occlusion is not None:
            grid = self.occlusion.shape[-1]
            if self.occlusion.shape != (len(pool), grid, grid):
                raise SRDError(f"occlusion maps {self.occlusion.shape} for {len(pool)} pool images")
            check_occlusion_grid(grid)
        channels = 3 if self.occlusion is None else 4
        self.observation_space = observation_space(self.obs_size, channels)
        self.action_space = spaces.Discrete(action_count(max_square_side))
        self._index: int | None = None
        self._record: PoolRecord | None = None  # the episode's entry, its image loaded once
        self._steps = 0
        self._canvas: np.ndarray | None = None
        self._return = 0.0

    # The current episode's pool entry.
    @property
    def record(self) -> PoolRecord:
        if self._record is None:
            raise RuntimeError("call reset() before step()")
        return self._record

    @property
    def occlusion_map(self) -> np.ndarray | None:
        """The current pool image's occlusion map (grid, grid), or None without the variant."""
        if self.occlusion is None or self._index is None:
            return None
        return self.occlusion[self._index]

    def observe(self, canvas: np.ndarray) -> np.ndarray:
        """The policy's view of ``canvas``: RGB, plus the image's occlusion map if any."""
        return policy_observation(canvas, self.obs_size, self.occlusion_map)

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def episode_return(self) -> float:
        return self._return

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self._deck = []
        if options and "index" in options:
            index = int(options["index"])
            if not 0 <= index < len(self.pool):
                raise ValueError(f"pool index {index} outside [0, {len(self.pool)})")
        elif self.pool_order == "shuffled":
            if not self._deck:
                self._deck = [int(i) for i in self.np_random.permutation(len(self.pool))]
            index = self._deck.pop(0)
        else:
            index = int(self.np_random.integers(len(self.pool)))
        self._index = index
        self._record = self.pool[index]
        self._steps = 0
        self._return = 0.0
        self._canvas = self._record.image
        info = {"image_id": self._record.id, "pool_index": index}
        return self.observe(self._canvas), info

    def mask(self, action: Any) -> np.ndarray:
        """The current pool image with the square of ``action``: (224, 224, 3) uint8."""
        return apply_action(self.record.image, _validate_action(action, self.action_space.n))

    def finish_step(
        self,
        action: int,
        masked: np.ndarray,
        caption: str,
        sem: float,
        flu: float,
        reward: float,
        table_reward: int,
    ) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Record an evaluated step (see :func:`step_envs`) and return gymnasium's 5-tuple.

        ``reward`` is the learning reward; ``table_reward`` the reference table's (the same
        unless the area cost variant is on)."""
        record = self.record
        self._steps += 1
        self._canvas = masked
        self._return += float(reward)
        info = {
            "action": int(action),
            "caption": caption,
            "sem": float(sem),
            "flu": float(flu),
            "reward": float(reward),
            "table_reward": int(table_reward),
            "image_id": record.id,
            "pool_index": int(self._index),
            "step": self._steps,
        }
        truncated = self._steps >= self.max_steps
        return self.observe(masked), float(reward), False, truncated, info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        return step_envs([self], [action])[0]

    def render(self) -> np.ndarray | None:
        """The full-resolution current canvas (224, 224, 3) in ``rgb_array`` mode."""
        if self.render_mode != "rgb_array" or self._canvas is None:
            return None
        return np.array(self._canvas, copy=True)


def step_envs(
    envs: Sequence[RedMaskEnv], actions: Sequence[Any]
) -> list[tuple[np.ndarray, float, bool, bool, dict[str, Any]]]:
    """Step several environments with one batched caption call and one batched score call.

    All environments must share their ``caption_fn``/``score_fn``/reward config (the first
    environment's are used). Returns each environment's (obs, reward, terminated, truncated,
    info).
    """
    if len(envs) != len(actions):
        raise ValueError(f"{len(actions)} actions for {len(envs)} environments")
    lead = envs[0]
    action_ids = [_validate_action(a, lead.action_space.n) for a in actions]
    masked = [env.mask(a) for env, a in zip(envs, action_ids, strict=True)]
    records = [env.record for env in envs]
    captions = list(lead.caption_fn(masked))
    if len(captions) != len(masked):
        raise ValueError(f"caption_fn returned {len(captions)} captions for {len(masked)} images")
    sem, flu = lead.score_fn(captions, [r.reference for r in records])
    rewards = caption_rewards(
        captions,
        sem,
        flu,
        [r.base_sem for r in records],
        [r.base_flu for r in records],
        lead.reward_config,
    )
    learning = rewards - area_costs(action_ids, lead.area_cost)
    sem_a = np.asarray(sem, dtype=np.float64)
    flu_a = np.asarray(flu, dtype=np.float64)
    return [
        env.finish_step(a, m, c, s, f, float(r), int(t))
        for env, a, m, c, s, f, r, t in zip(
            envs, action_ids, masked, captions, sem_a, flu_a, learning, rewards, strict=True
        )
    ]


def register_env() -> None:
    """Register :class:`RedMaskEnv` with gymnasium under :data:`ENV_ID` (idempotent)."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="srd.defenses.srd.env:RedMaskEnv")


register_env()
