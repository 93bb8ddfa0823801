"""N red-mask environments stepped together for stable-baselines3 (stage D2's training env).

:class:`BatchedRedMaskVecEnv` steps N :class:`srd.defenses.srd.env.RedMaskEnv` with ONE
``caption_fn`` and ONE ``score_fn`` call per step (:func:`srd.defenses.srd.env.step_envs`, the
single environment's step too, so their semantics are identical).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnv,
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
)

from srd.defenses.srd.env import (
    DEFAULT_MAX_STEPS,
    DEFAULT_OBS_SIZE,
    CaptionFn,
    MaskPool,
    RedMaskEnv,
    ScoreFn,
    step_envs,
)
from srd.defenses.srd.reward import RewardConfig
from srd.errors import SRDError
from srd.geometry import MASK_SIZES


class BatchedRedMaskVecEnv(VecEnv):
    """N :class:`RedMaskEnv` stepped together: one caption call and one score call per step.

    Follows SB3's VecEnv conventions: finished episodes reset automatically, with the last
    observation in ``info["terminal_observation"]``, ``info["TimeLimit.truncated"]`` and
    Monitor-style ``info["episode"] = {"r", "l", "t"}``. ``seed(s)`` (or ``seed=s``) makes
    environment i reset with seed s + i at the next ``reset()``.

    Pool images: with ``pool_order="random"`` each environment draws its own (exactly like N
    single environments reset with those seeds); with ``"shuffled"`` the N environments are
    dealt images from ONE shared permutation of the pool (seeded by ``seed(s)``, reshuffled
    after each pass), so every image is visited once in the first ``len(pool)`` episodes of
    all environments together.
    """

    def __init__(
        self,
        pool: MaskPool,
        caption_fn: CaptionFn,
        score_fn: ScoreFn,
        num_envs: int = 1,
        reward_config: RewardConfig | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        obs_size: int = DEFAULT_OBS_SIZE,
        seed: int | None = None,
        pool_order: str = "shuffled",
        area_cost: float = 0.0,
        occlusion: np.ndarray | None = None,
        max_square_side: int = MASK_SIZES[-1],
    ) -> None:
        if num_envs < 1:
            raise SRDError(f"--num_envs {num_envs}: must be at least 1")
        options = {"max_steps": max_steps, "obs_size": obs_size, "pool_order": pool_order,
                   "area_cost": area_cost, "occlusion": occlusion,
                   "max_square_side": max_square_side}  # fmt: skip
        self.envs = [
            RedMaskEnv(pool, caption_fn, score_fn, reward_config, **options)
            for _ in range(num_envs)
        ]
        super().__init__(num_envs, self.envs[0].observation_space, self.envs[0].action_space)
        self.pool_order = pool_order
        self._deck_rng = np.random.default_rng()
        self._deck: list[int] = []
        self._actions: np.ndarray | None = None
        self._t_start = time.time()
        if seed is not None:
            self.seed(seed)

    def seed(self, seed: int | None = None) -> Sequence[None | int]:
        seeds = super().seed(seed)
        self._deck_rng = np.random.default_rng(seeds[0])
        self._deck = []
        return seeds

    def _next_options(self, options: dict[str, Any] | None) -> dict[str, Any] | None:
        """``options`` for an environment's reset: the next shared-deck image when shuffled."""
        if self.pool_order != "shuffled" or (options and "index" in options):
            return options
        if not self._deck:
            self._deck = [int(i) for i in self._deck_rng.permutation(len(self.envs[0].pool))]
        return {**(options or {}), "index": self._deck.pop(0)}

    def reset(self) -> VecEnvObs:
        obs = []
        for i, env in enumerate(self.envs):
            options = self._next_options(self._options[i] or None)
            o, self.reset_infos[i] = env.reset(seed=self._seeds[i], options=options)
            obs.append(o)
        self._reset_seeds()
        self._reset_options()
        return np.stack(obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_async() must come before step_wait()")
        results = step_envs(self.envs, list(self._actions))
        self._actions = None
        obs, infos = [], []
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        dones = np.zeros(self.num_envs, dtype=bool)
        for i, (env, (o, r, terminated, truncated, info)) in enumerate(
            zip(self.envs, results, strict=True)
        ):
            rewards[i] = r
            dones[i] = terminated or truncated
            info["TimeLimit.truncated"] = truncated and not terminated
            if dones[i]:
                info["terminal_observation"] = o
                info["episode"] = {
                    "r": env.episode_return,
                    "l": env.steps,
                    "t": round(time.time() - self._t_start, 6),
                }
                o, self.reset_infos[i] = env.reset(options=self._next_options(None))
            obs.append(o)
            infos.append(info)
        return np.stack(obs), rewards, dones, infos

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def _targets(self, indices: VecEnvIndices) -> list[RedMaskEnv]:
        return [self.envs[i] for i in self._get_indices(indices)]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(env, attr_name) for env in self._targets(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        for env in self._targets(indices):
            setattr(env, attr_name, value)

    def env_method(
        self,
        method_name: str,
        *method_args: Any,
        indices: VecEnvIndices = None,
        **method_kwargs: Any,
    ) -> list[Any]:
        return [
            getattr(env, method_name)(*method_args, **method_kwargs)
            for env in self._targets(indices)
        ]

    def env_is_wrapped(
        self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None
    ) -> list[bool]:
        return [False for _ in self._targets(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [env.render() for env in self.envs]
