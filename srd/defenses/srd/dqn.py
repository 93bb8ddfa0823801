"""SRD's stage D2: stable-baselines3 DQN on the red-mask environment, measured against chance.

Training uses the reference learner (reference §9.2, §15 item 17) with every SB3
hyperparameter set explicitly, so results never depend on the installed SB3's defaults
(reference B11: SB3 < 2.3 had ``learning_starts`` 50,000 and would never train). The run's
length and schedule are ours (see :class:`DQNConfig`): the reference's 10,000 transitions
of 150-step episodes see ~67 images and copy the target network once, at the very end; ours
are sized so that every pool image is visited, episodes end and the target network is copied
several times on a CPU (:data:`REFERENCE_SCHEDULE` gives the reference's back).

Every run is measured against a random policy in the same environment (same pool, seed and
number of transitions, :func:`run_random_policy`), and the trained policy's greedy square is
scored once on every pool image (:func:`evaluate_greedy`): :func:`agent_report` compares them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.torch_layers import NatureCNN
from stable_baselines3.common.vec_env import VecEnv
from tqdm.auto import tqdm

from srd.config import arg
from srd.defenses.srd.env import (
    DEFAULT_BUFFER_SIZE,
    EnvConfig,
    RedMaskEnv,
    policy_observation,
    replay_memory_bytes,
    step_envs,
)
from srd.errors import SRDError
from srd.flags import COUNT, SEED, SHARE, at_least, between, positive
from srd.io import ensure_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DQNConfig:
    """DQN learner (stable-baselines3), reference §9.2 values; every SB3 parameter explicit."""

    policy: str = arg("CnnPolicy", help="SB3 policy (NatureCNN Q-network)", choices=["CnnPolicy"])
    learning_rate: float = arg(1e-4, help="Adam learning rate", check=positive())
    buffer_size: int = arg(
        DEFAULT_BUFFER_SIZE,
        help="replay buffer transitions (10,000 = every step of the reference's run; "
        "see srd.defenses.srd.env for the memory it takes)",
        check=COUNT,
    )
    learning_starts: int = arg(
        500,
        help="transitions collected before the first update (ours: 500, one sixth of the run, "
        "so the first updates see ~100 pool images; reference 100)",
        check=at_least(0),
    )
    batch_size: int = arg(32, help="replay minibatch size per gradient step", check=COUNT)
    tau: float = arg(
        1.0,
        help="target network update coefficient (1 = hard copy)",
        check=between(0, 1, low_open=True),
    )
    gamma: float = arg(0.99, help="discount factor", check=SHARE)
    train_freq: int = arg(4, help="update every train_freq environment steps", check=COUNT)
    gradient_steps: int = arg(
        1, help="gradient steps per update (per environment, see below)", check=COUNT
    )
    n_steps: int = arg(1, help="n-step returns (1 = plain one-step DQN targets)", check=COUNT)
    target_update_interval: int = arg(
        500,
        help="transitions between hard target-network copies (ours: 500, five copies in the "
        "default run; reference 10,000 = its whole run, so its targets all came from the "
        "random initial network, reference B11)",
        check=COUNT,
    )
    exploration_fraction: float = arg(
        0.5,
        help="share of total_timesteps over which epsilon decays linearly (ours: 0.5, so the "
        "500 actions are tried broadly on every pool image of the first pass; reference 0.1)",
        check=SHARE,
    )
    exploration_initial_eps: float = arg(1.0, help="initial epsilon of epsilon-greedy", check=SHARE)
    exploration_final_eps: float = arg(
        0.05, help="final epsilon (also saved for cleaning)", check=SHARE
    )
    max_grad_norm: float = arg(10.0, help="gradient norm clipping", check=positive())
    features_dim: int = arg(
        512, help="NatureCNN feature size (Q head: Linear(512, 500))", check=COUNT
    )
    optimize_memory_usage: bool = arg(
        False,
        help="store each observation once in the replay buffer (halves its memory; needs "
        "--no-bootstrap_at_time_limit)",
    )
    bootstrap_at_time_limit: bool = arg(
        False,
        help="bootstrap through the 150-step time limit; off = the reference, whose old-gym "
        "env ended episodes with done=True (a terminal transition)",
    )
    stats_window_size: int = arg(
        100, help="episodes averaged in SB3's rollout statistics", check=COUNT
    )
    total_timesteps: int = arg(
        3_000,
        help="environment transitions to train for (ours: 3,000 = 600 five-step episodes, "
        "every image of a 300-image pool twice; reference 10,000)",
        check=COUNT,
    )
    seed: int = arg(
        42, help="seed of the learner and of the environments (env i: seed + i)", check=SEED
    )
    num_envs: int = arg(
        16,
        help="environments stepped together, one batched caption call per step (ours: 16, "
        "the captioner is the cost; reference 1)",
        check=COUNT,
    )
    scale_updates_with_envs: bool = arg(
        True,
        help="multiply gradient_steps by num_envs so there is still one update per "
        "train_freq transitions, as in the reference's single environment",
    )
    max_replay_gb: float = arg(
        4.0, help="refuse a replay buffer larger than this (GB)", check=positive()
    )
    device: str = arg("auto", help="torch device of the Q-network (auto = cuda if available)")
    verbose: int = arg(0, help="SB3 verbosity (0 quiet, 1 progress tables)", check=between(0, 2))


REFERENCE_SCHEDULE: dict[str, Any] = {
    "total_timesteps": 10_000,
    "num_envs": 1,
    "learning_starts": 100,
    "target_update_interval": 10_000,
    "exploration_fraction": 0.1,
    "max_steps": 150,
    "pool_order": "random",
    "obs_size": 224,
}
"""The reference's run (reference §9.2 with SB3 >= 2.3 defaults, §9.1 episode length, its
policy seeing the 224-px image): pass these as flags to train as the reference does. Every
other DQN default is the reference's."""


def schedule_name(dqn: DQNConfig, env: EnvConfig) -> str:
    """Which schedule a D2 run used (:func:`schedule_of` its values)."""
    return schedule_of({**dataclasses.asdict(dqn), **dataclasses.asdict(env)})


def schedule_of(record: Mapping[str, Any]) -> str:
    """ "reference" when every field of :data:`REFERENCE_SCHEDULE` holds the reference's value
    in ``record`` (a D2 run's config), "ours" when every one holds our default, else "custom"."""
    values = {k: record.get(k) for k in REFERENCE_SCHEDULE}
    if values == REFERENCE_SCHEDULE:
        return "reference"
    defaults = {**dataclasses.asdict(DQNConfig()), **dataclasses.asdict(EnvConfig())}
    return "ours" if values == {k: defaults[k] for k in values} else "custom"


def sb3_kwargs(cfg: DQNConfig, num_envs: int = 1) -> dict[str, Any]:
    """The complete keyword arguments of ``stable_baselines3.DQN`` for ``cfg``."""
    gradient_steps = cfg.gradient_steps * (num_envs if cfg.scale_updates_with_envs else 1)
    return {
        "policy": cfg.policy,
        "learning_rate": cfg.learning_rate,
        "buffer_size": cfg.buffer_size,
        "learning_starts": cfg.learning_starts,
        "batch_size": cfg.batch_size,
        "tau": cfg.tau,
        "gamma": cfg.gamma,
        "train_freq": (cfg.train_freq, "step"),
        "gradient_steps": gradient_steps,
        "replay_buffer_class": None,  # the plain ReplayBuffer (NStepReplayBuffer if n_steps > 1)
        "replay_buffer_kwargs": {"handle_timeout_termination": cfg.bootstrap_at_time_limit},
        "optimize_memory_usage": cfg.optimize_memory_usage,
        "n_steps": cfg.n_steps,
        "target_update_interval": cfg.target_update_interval,
        "exploration_fraction": cfg.exploration_fraction,
        "exploration_initial_eps": cfg.exploration_initial_eps,
        "exploration_final_eps": cfg.exploration_final_eps,
        "max_grad_norm": cfg.max_grad_norm,
        "stats_window_size": cfg.stats_window_size,
        "tensorboard_log": None,
        "policy_kwargs": {
            "net_arch": [],
            "features_extractor_class": NatureCNN,
            "features_extractor_kwargs": {"features_dim": cfg.features_dim},
            "normalize_images": True,
            "optimizer_class": torch.optim.Adam,
            "optimizer_kwargs": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
        },
        "verbose": cfg.verbose,
        "seed": cfg.seed,
        "device": cfg.device,
    }


def _num_envs(env: gym.Env | VecEnv) -> int:
    return env.num_envs if isinstance(env, VecEnv) else 1


def build_dqn(env: gym.Env | VecEnv, cfg: DQNConfig) -> DQN:
    """A fresh SB3 DQN for ``env`` with every hyperparameter from ``cfg``.

    Refuses (SRDError) a replay buffer over ``cfg.max_replay_gb`` and settings SB3 cannot run.
    """
    n_envs = _num_envs(env)
    if n_envs != cfg.num_envs:
        raise ValueError(f"env has {n_envs} environments but cfg.num_envs is {cfg.num_envs}")
    if not isinstance(env.action_space, spaces.Discrete) or env.observation_space.shape is None:
        raise ValueError("the DQN needs a Discrete action space and an image observation")
    if cfg.optimize_memory_usage and cfg.bootstrap_at_time_limit:
        raise SRDError(
            "--optimize_memory_usage cannot be combined with --bootstrap_at_time_limit "
            "(stable-baselines3 does not support it)"
        )
    need = replay_memory_bytes(
        env.observation_space.shape, cfg.buffer_size, n_envs, cfg.optimize_memory_usage
    )
    if need > cfg.max_replay_gb * 1e9:
        raise SRDError(
            f"--buffer_size {cfg.buffer_size}: replay memory for observations "
            f"{tuple(env.observation_space.shape)} would be {need / 1e9:.2f} GB, over "
            f"--max_replay_gb {cfg.max_replay_gb} (lower --buffer_size or --obs_size)"
        )
    log.info(
        "DQN: obs %s, %d env(s), replay %.2f GB", env.observation_space.shape, n_envs, need / 1e9
    )
    return DQN(env=env, **sb3_kwargs(cfg, n_envs))


# --------------------------------------------------------------------------------------------
# Training with a reward log


class RewardLog:
    """Writes one JSON line per transition and one per finished episode (the reward curve).

    Step lines: ``{"type": "step", "timestep", "env", "image_id", "action", "reward",
    "caption", "sem", "flu", "exploration_rate"}``; episode lines: ``{"type": "episode",
    "episode", "env", "timestep", "image_id", "return", "length", "mean_reward"}``. The file is
    streamed to ``<path>.partial`` and renamed onto ``path`` by :meth:`close`. Also counts what
    the run saw (:meth:`summary`).
    """

    def __init__(self, path: str | os.PathLike, num_envs: int) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        ensure_dir(self.path.parent)
        self._file: io.TextIOWrapper | None = open(self.partial, "w", encoding="utf-8")  # noqa: SIM115
        self._returns = [0.0] * num_envs
        self._lengths = [0] * num_envs
        self.transitions = 0
        self.episodes = 0
        self.reward_sum = 0.0
        self.table_sum = 0.0  # the reference table's rewards (equal unless --area_cost)
        self.images: set[str] = set()

    def record(
        self,
        timestep_end: int,
        rewards: Sequence[float],
        dones: Sequence[bool],
        infos: Sequence[Mapping[str, Any]],
        exploration_rate: float = float("nan"),
    ) -> None:
        """One vectorised step of ``len(infos)`` transitions, the last numbered ``timestep_end``."""
        n = len(infos)
        first = timestep_end - n + 1
        eps = float(exploration_rate)
        for i, info in enumerate(infos):
            reward = float(rewards[i])
            self._returns[i] += reward
            self._lengths[i] += 1
            self.transitions += 1
            self.reward_sum += reward
            self.table_sum += float(info.get("table_reward", reward))
            if info.get("image_id") is not None:
                self.images.add(str(info["image_id"]))
            self._write(
                {
                    "type": "step",
                    "timestep": first + i,
                    "env": i,
                    "image_id": info.get("image_id"),
                    "action": info.get("action"),
                    "reward": reward,
                    "table_reward": info.get("table_reward"),
                    "caption": info.get("caption"),
                    "sem": info.get("sem"),
                    "flu": info.get("flu"),
                    "exploration_rate": eps,
                }
            )
            if dones[i]:
                self.episodes += 1
                self._write(
                    {
                        "type": "episode",
                        "episode": self.episodes,
                        "env": i,
                        "timestep": first + i,
                        "image_id": info.get("image_id"),
                        "return": self._returns[i],
                        "length": self._lengths[i],
                        "mean_reward": self._returns[i] / max(self._lengths[i], 1),
                    }
                )
                self._returns[i], self._lengths[i] = 0.0, 0

    def _write(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(record, allow_nan=True) + "\n")

    def summary(self) -> dict[str, Any]:
        """Transitions, finished episodes, distinct pool images and mean reward so far."""
        return {
            "transitions": self.transitions,
            "episodes": self.episodes,
            "images_visited": len(self.images),
            "mean_reward": self.reward_sum / self.transitions if self.transitions else None,
            "mean_table_reward": self.table_sum / self.transitions if self.transitions else None,
        }

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            os.replace(self.partial, self.path)


class RewardLogCallback(BaseCallback):
    """Streams training transitions to a :class:`RewardLog` and counts target-network copies.

    A copy is counted when the target network's Q head changes (checked after every step and
    at the end), so copies made before any gradient step, which change nothing, do not count.
    """

    def __init__(self, path: str | os.PathLike, total_timesteps: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.total_timesteps = total_timesteps
        self.log: RewardLog | None = None
        self._bar: tqdm | None = None
        self._target: torch.Tensor | None = None
        self.target_updates = 0

    def _target_head(self) -> torch.Tensor:
        return self.model.q_net_target.q_net[0].weight

    def _check_target(self) -> None:
        current = self._target_head()
        if self._target is not None and not torch.equal(current, self._target):
            self.target_updates += 1
        self._target = current.detach().clone()

    def _on_training_start(self) -> None:
        self.log = RewardLog(self.path, self.training_env.num_envs)
        self._check_target()
        self._bar = tqdm(total=self.total_timesteps, desc="DQN", unit="step", leave=False)

    def _on_step(self) -> bool:
        assert self.log is not None
        infos: list[dict[str, Any]] = self.locals["infos"]
        eps = float(getattr(self.model, "exploration_rate", float("nan")))
        if self.num_timesteps - len(infos) < self.model.learning_starts:
            eps = 1.0  # SB3 draws uniformly random actions until learning_starts
        self.log.record(self.num_timesteps, self.locals["rewards"], self.locals["dones"], infos,
                        eps)  # fmt: skip
        self._check_target()
        if self._bar is not None:
            self._bar.update(len(infos))
        return True

    def _on_training_end(self) -> None:
        self._check_target()
        if self._bar is not None:
            self._bar.close()
        if self.log is not None:
            self.log.close()

    def summary(self) -> dict[str, Any]:
        """The run's :meth:`RewardLog.summary` plus target copies and gradient steps."""
        assert self.log is not None
        return {
            **self.log.summary(),
            "target_updates": self.target_updates,
            "gradient_updates": int(self.model._n_updates),
        }


def train_dqn(
    env: gym.Env | VecEnv, cfg: DQNConfig, log_path: str | os.PathLike
) -> tuple[DQN, dict[str, Any]]:
    """Build a DQN with ``cfg`` and train it for ``cfg.total_timesteps``; reward log to JSONL.

    Returns the model and the run's summary (transitions, episodes, images_visited,
    mean_reward, target_updates, gradient_updates).
    """
    model = build_dqn(env, cfg)
    callback = RewardLogCallback(log_path, cfg.total_timesteps)
    model.learn(total_timesteps=cfg.total_timesteps, callback=callback, progress_bar=False)
    summary = callback.summary()
    log.info("DQN trained: %d transitions, %d episodes, %d pool images, %d updates, "
             "%d target copies", summary["transitions"], summary["episodes"],
             summary["images_visited"], summary["gradient_updates"],
             summary["target_updates"])  # fmt: skip
    return model, summary


# --------------------------------------------------------------------------------------------
# The baselines every run is measured against


def run_random_policy(
    env: VecEnv, total_timesteps: int, seed: int, log_path: str | os.PathLike
) -> dict[str, Any]:
    """Step ``env`` with uniformly random actions, as :func:`train_dqn` steps it.

    The environment is seeded with ``seed`` and reset exactly as SB3 does before learning, and
    stepped until at least ``total_timesteps`` transitions, so with the training run's
    environment flags and seed it sees the same pool images in the same order. Actions come
    from ``numpy.random.default_rng(seed)``. Writes a reward log like training's; returns its
    :meth:`RewardLog.summary`.
    """
    if total_timesteps < 1:
        raise SRDError(f"--total_timesteps {total_timesteps}: must be at least 1")
    n = env.num_envs
    rng = np.random.default_rng(seed)
    env.seed(seed)
    env.reset()
    reward_log = RewardLog(log_path, n)
    done = 0
    with tqdm(total=total_timesteps, desc="random policy", unit="step", leave=False) as bar:
        while done < total_timesteps:
            actions = rng.integers(0, env.action_space.n, size=n)
            _, rewards, dones, infos = env.step(actions)
            done += n
            reward_log.record(done, rewards, dones, infos, exploration_rate=1.0)
            bar.update(n)
    reward_log.close()
    return reward_log.summary()


def evaluate_greedy(
    policy: DQN, envs: Sequence[RedMaskEnv], indices: Sequence[int] | None = None
) -> dict[str, Any]:
    """Score the policy's greedy square once on every pool image (default: all of them).

    Each image is reset unmasked and the greedy action on that observation is scored: the
    first try of the cleaning stage (D3). ``envs`` are environments over the same pool; they
    are stepped together (one batched caption call per ``len(envs)`` images). Returns
    per-image ``image_ids``, ``actions`` and ``rewards`` and their ``mean_reward``.
    """
    if not envs:
        raise ValueError("at least one environment is needed")
    pool = envs[0].pool
    order = list(range(len(pool))) if indices is None else [int(i) for i in indices]
    ids, actions, rewards, table = [], [], [], []
    for start in range(0, len(order), len(envs)):
        chunk = order[start : start + len(envs)]
        active = list(envs[: len(chunk)])
        for env, index in zip(active, chunk, strict=True):
            env.reset(options={"index": index})
        maps = None if active[0].occlusion is None else [env.occlusion_map for env in active]
        chosen = greedy_actions(policy, [env.record.image for env in active], maps)
        for _, reward, _, _, info in step_envs(active, [int(a) for a in chosen]):
            ids.append(info["image_id"])
            actions.append(int(info["action"]))
            rewards.append(float(reward))
            table.append(int(info["table_reward"]))
    return {
        "images": len(ids),
        "mean_reward": float(np.mean(rewards)) if rewards else None,
        "mean_table_reward": float(np.mean(table)) if table else None,
        "distinct_actions": len(set(actions)),
        "image_ids": ids,
        "actions": actions,
        "rewards": rewards,
        "table_rewards": table,
    }


def reward_counts(rewards: Sequence[float]) -> dict[str, int]:
    """How often each reward value occurs, keyed like "-1", "+3"."""
    values, counts = np.unique(np.asarray(rewards, dtype=np.float64), return_counts=True)
    return {f"{int(v):+d}": int(c) for v, c in zip(values, counts, strict=True)}


def agent_report(
    training: Mapping[str, Any],
    random: Mapping[str, Any],
    greedy: Mapping[str, Any],
    pool_images: int,
    min_gain: float = 0.5,
) -> dict[str, Any]:
    """The D2 result: the trained greedy policy against a random policy on the same pool.

    ``training``/``random``: summaries of :func:`train_dqn` / :func:`run_random_policy`;
    ``greedy``: :func:`evaluate_greedy`. ``gain`` is the greedy policy's mean reward minus the
    random policy's (reward units); ``beats_random`` says whether it is at least ``min_gain``.
    With ``--area_cost`` the rewards learned are not the table's: ``table_gain_over_random``
    is the same gain in the reference table's rewards.
    """

    def gain_of(key: str) -> float | None:
        if greedy.get(key) is None or random.get(key) is None:
            return None
        return float(greedy[key]) - float(random[key])

    gain = gain_of("mean_reward")
    return {
        "pool_images": int(pool_images),
        "training": dict(training),
        "random_policy": dict(random),
        "greedy_policy": {
            **{k: greedy.get(k) for k in ("images", "mean_reward", "mean_table_reward")},
            "distinct_actions": greedy["distinct_actions"],
            # the reference table's rewards (whole numbers; the learning reward with an area
            # cost is not, and its counts would be truncated)
            "reward_counts": reward_counts(greedy.get("table_rewards", greedy["rewards"])),
            "per_image": [
                {"image_id": i, "action": a, "reward": r, "table_reward": t}
                for i, a, r, t in zip(
                    greedy["image_ids"],
                    greedy["actions"],
                    greedy["rewards"],
                    greedy.get("table_rewards", greedy["rewards"]),
                    strict=True,
                )
            ],
        },
        "gain_over_random": gain,
        "table_gain_over_random": gain_of("mean_table_reward"),
        "min_gain": min_gain,
        "beats_random": gain is not None and gain >= min_gain,
    }


def read_reward_log(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(step records, episode records) of a reward log written by :func:`train_dqn`."""
    path = Path(path)
    if not path.is_file():
        raise SRDError(f"{path}: reward log not found")
    steps, episodes = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            (steps if record["type"] == "step" else episodes).append(record)
    return steps, episodes


def policy_obs_size(policy: DQN) -> int:
    """Side of the square observation the policy takes (HWC or CHW observation spaces)."""
    return int(max(policy.observation_space.shape))


def policy_reads_map(policy: DQN) -> bool:
    """Whether the policy's observation has the occlusion-map channel (4 channels, not 3)."""
    return int(min(policy.observation_space.shape)) == 4


def greedy_actions(
    policy: DQN, images: Sequence[np.ndarray], maps: Sequence[np.ndarray] | None = None
) -> np.ndarray:
    """Greedy actions (B,) of the policy on unmasked 224x224x3 uint8 images (one batch);
    ``maps``: each image's occlusion map, which a policy trained with one needs."""
    if policy_reads_map(policy) != (maps is not None):
        needs = "reads an occlusion map" if maps is None else "reads no occlusion map"
        raise SRDError(f"the policy {needs} (its observation is {policy.observation_space.shape})")
    size = policy_obs_size(policy)
    cell_maps = [None] * len(images) if maps is None else list(maps)
    obs = [policy_observation(im, size, m) for im, m in zip(images, cell_maps, strict=True)]
    actions, _ = policy.predict(np.stack(obs), deterministic=True)
    return np.asarray(actions, dtype=np.int64).reshape(len(images))
