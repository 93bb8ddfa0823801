"""The agent's policy: saved and loaded without unpickling, and asked for squares (stage D3).

Policies are saved as SB3 zips with an extra ``srd_policy.json`` member (action count,
observation shape, the :class:`~srd.defenses.srd.dqn.DQNConfig`). :func:`load_policy` never
unpickles: it reads the weights with ``torch.load(weights_only=True)`` and rebuilds the network
from that JSON.

Cleaning (stage D3, reference §10 / B13) queries the policy up to 5 times with epsilon-greedy on
the unmasked image and keeps the best positive reward (:func:`choose_mask`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import DQN

from srd.defenses.srd.dqn import DQNConfig, build_dqn, greedy_actions, policy_reads_map
from srd.defenses.srd.variants import action_count, check_occlusion_grid
from srd.errors import SRDError
from srd.geometry import NUM_ACTIONS
from srd.io import atomic_path

POLICY_META = "srd_policy.json"
"""Zip member describing an SRD policy (written by :func:`save_policy`)."""

POLICY_FORMAT = "srd-dqn-policy-v1"
Q_HEAD = "q_net.q_net.0.weight"
"""State-dict key of the Q head, shape (num_actions, features_dim)."""


# --------------------------------------------------------------------------------------------
# Saving and loading policies without pickle


def save_policy(
    model: DQN,
    path: str | os.PathLike,
    cfg: DQNConfig,
    variant: Mapping[str, Any] | None = None,
    schedule: str | None = None,
) -> Path:
    """Write the SB3 zip of ``model`` plus :data:`POLICY_META`, atomically; returns the path.
    ``variant``: how the agent's training departs from the reference's (our variants, e.g.
    ``{"pool_source": "data", "area_cost": 2.0, "occlusion_grid": 4}``; D3 needs the grid);
    ``schedule``: the training schedule's name (``srd.defenses.srd.dqn.schedule_name``)."""
    path = Path(path)
    if path.suffix != ".zip":
        path = path.with_name(path.name + ".zip")  # the SB3 convention (--ppo_path without .zip)
    buffer = io.BytesIO()
    space = model.observation_space  # its sampler's state (drawn by env checks, never seeded)
    rng, space._np_random = space._np_random, None  # is pickled with it: saved without it
    try:
        model.save(buffer)
    finally:
        space._np_random = rng
    meta = {
        "format": POLICY_FORMAT,
        "num_actions": int(model.action_space.n),
        "obs_shape": [int(d) for d in model.observation_space.shape],
        "dqn_config": dataclasses.asdict(cfg),
        **({"variant": dict(variant)} if variant else {}),
        **({"schedule": schedule} if schedule else {}),
    }
    with atomic_path(path) as tmp:
        tmp.write_bytes(_reproducible_zip(buffer.getvalue(), {POLICY_META: json.dumps(meta)}))
    return path


VOLATILE_DATA = ("start_time", "ep_info_buffer", "ep_success_buffer")
"""Fields of SB3's ``data`` member that hold wall-clock times (the training's start, each
episode's end: Monitor's ``t``), so an identical training gave another file; left out."""

_ADDRESS = re.compile(r" at 0x[0-9a-f]+>")
"""The process memory address in the readable ``repr`` SB3 writes beside each pickled class
(``<function CnnPolicy.__init__ at 0x7f...>``; informational, never loaded): another process
gave other bytes. Written as `` at 0x0>``."""


def _reproducible_zip(sb3_zip: bytes, extra: dict[str, str]) -> bytes:
    """The SB3 zip with :data:`VOLATILE_DATA` left out of ``data``, memory addresses blanked
    (:data:`_ADDRESS`), ``extra`` members added and every member dated 1980-01-01: identical
    policies give identical bytes, in any process (and sha256, which
    the stages' stamps compare). SB3 still loads it (it sets only the attributes it finds)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(sb3_zip)) as source, zipfile.ZipFile(out, "w") as target:
        members = {name: source.read(name) for name in source.namelist()}
        data = {k: v for k, v in json.loads(members["data"]).items() if k not in VOLATILE_DATA}
        members["data"] = _ADDRESS.sub(" at 0x0>", json.dumps(data, indent=4)).encode()
        for name, content in {**members, **{k: v.encode() for k, v in extra.items()}}.items():
            target.writestr(
                zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)),
                content,
                compress_type=zipfile.ZIP_DEFLATED,
            )
    return out.getvalue()


class _SpacesOnlyEnv(gym.Env):
    """Carries a loaded policy's spaces; a loaded policy predicts, it cannot be stepped."""

    def __init__(self, observation_space: spaces.Box, action_space: spaces.Discrete) -> None:
        self.observation_space = observation_space
        self.action_space = action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> Any:
        raise RuntimeError("a policy from load_policy() is for inference; build a RedMaskEnv")

    def step(self, action: Any) -> Any:
        raise RuntimeError("a policy from load_policy() is for inference; build a RedMaskEnv")


def _policy_meta(archive: zipfile.ZipFile, where: Path) -> dict[str, Any]:
    """Our metadata, or what a plain SB3 zip's readable (non-pickled) fields say."""
    if POLICY_META in archive.namelist():
        meta = json.loads(archive.read(POLICY_META))
        obs_shape = meta.get("obs_shape") if isinstance(meta, dict) else None
    else:
        meta = {"dqn_config": {}}
        try:
            obs_shape = list(json.loads(archive.read("data"))["observation_space"]["_shape"])
        except (KeyError, TypeError):
            obs_shape = None
    if (
        not isinstance(obs_shape, list)
        or len(obs_shape) != 3
        or not all(type(d) is int and d > 0 for d in obs_shape)
    ):
        raise SRDError(f"{where}: no valid observation shape (obs_shape) in the policy zip")
    if not isinstance(meta.get("dqn_config", {}), dict):
        raise SRDError(f"{where}: 'dqn_config' in the policy zip is not a JSON object")
    return {**meta, "obs_shape": obs_shape}


def load_policy(
    path: str | os.PathLike, expected_actions: int = NUM_ACTIONS, device: str = "cpu"
) -> DQN:
    """Load a DQN policy for inference, checking its action count; SRDError names the file."""
    path = Path(path)
    if (
        not path.is_file()
        and path.suffix != ".zip"
        and path.with_name(path.name + ".zip").is_file()
    ):
        path = path.with_name(path.name + ".zip")
    if not path.is_file():
        raise SRDError(f"{path}: policy file not found")
    try:
        with zipfile.ZipFile(path) as archive:
            meta = _policy_meta(archive, path)
            state = torch.load(
                io.BytesIO(archive.read("policy.pth")), map_location="cpu", weights_only=True
            )
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, RuntimeError, OSError) as exc:
        raise SRDError(f"{path}: not a stable-baselines3 DQN policy zip ({exc})") from None
    if not isinstance(state, dict) or Q_HEAD not in state:
        raise SRDError(f"{path}: not a DQN policy (no {Q_HEAD} in policy.pth)")
    num_actions = int(state[Q_HEAD].shape[0])
    variant = meta.get("variant", {})
    side = variant.get("max_square_side") if isinstance(variant, dict) else None
    if side is not None:  # our variant without the largest squares: the first actions
        expected_actions = action_count(side)
    if num_actions != expected_actions:
        raise SRDError(f"{path}: policy has {num_actions} actions, expected {expected_actions}")
    known = {f.name for f in dataclasses.fields(DQNConfig)}
    saved = {k: v for k, v in meta.get("dqn_config", {}).items() if k in known}
    cfg = dataclasses.replace(
        DQNConfig(**saved),
        buffer_size=1,  # inference only: no replay memory
        num_envs=1,
        optimize_memory_usage=False,
        features_dim=int(state[Q_HEAD].shape[1]),
        device=device,
        verbose=0,
    )
    obs_space = spaces.Box(0, 255, tuple(int(d) for d in meta["obs_shape"]), np.uint8)
    model = build_dqn(_SpacesOnlyEnv(obs_space, spaces.Discrete(num_actions)), cfg)
    try:
        model.policy.load_state_dict(state)
    except RuntimeError as exc:
        raise SRDError(f"{path}: policy weights do not fit the network ({exc})") from None
    model.policy.set_training_mode(False)
    model.exploration_rate = cfg.exploration_final_eps
    grid = variant.get("occlusion_grid", 0) if isinstance(variant, dict) else None
    if type(grid) is not int or (grid > 0) != policy_reads_map(model):
        raise SRDError(
            f"{path}: variant {variant!r} does not fit the observation {meta['obs_shape']}"
        )
    model.variant = variant  # recorded by D3, shown as the SRD row's tags
    model.schedule = meta.get("schedule")  # likewise (None: a policy saved before it was named)
    model.occlusion_grid = check_occlusion_grid(grid)  # the maps D3 computes for the policy
    return model


# --------------------------------------------------------------------------------------------
# Cleaning: choosing one mask per image (stage D3)


@dataclass(frozen=True)
class MaskChoice:
    """The mask kept for one image: its action and reward, and every try made, in order."""

    action: int
    reward: int
    tries: list[tuple[int, int]]
    evaluated: list[int]
    """Distinct actions passed to ``try_fn`` (repeats are served from the cache)."""


def draw_try_actions(
    greedy: np.ndarray,
    n_tries: int,
    epsilon: float,
    rng: np.random.Generator,
    num_actions: int = NUM_ACTIONS,
) -> np.ndarray:
    """Epsilon-greedy tries (B, n_tries): each try is random with probability ``epsilon``.

    The observation never changes between tries (masks apply to the original image), so the
    greedy action is the same for all tries of an image and only the exploration draws differ.
    """
    greedy = np.asarray(greedy, dtype=np.int64).reshape(-1, 1)
    explore = rng.random((greedy.shape[0], n_tries)) < epsilon
    random_actions = rng.integers(0, num_actions, size=(greedy.shape[0], n_tries))
    return np.where(explore, random_actions, greedy)


def select_mask(actions: Sequence[int], rewards: Mapping[int, int]) -> MaskChoice:
    """The reference's rule over tries in order (reference §10, B13).

    Keep a try whose reward beats the best so far (which starts at 0), stop at +3, and if no
    try was positive keep the last one. ``rewards`` maps each action to its reward.
    """
    if len(actions) == 0:
        raise ValueError("at least one try is needed")
    best_action, best_reward = None, 0
    tries: list[tuple[int, int]] = []
    for action in actions:
        a = int(action)
        r = int(rewards[a])
        tries.append((a, r))
        if r > best_reward:
            best_action, best_reward = a, r
        if r >= 3:
            break
    if best_action is None:
        best_action, best_reward = tries[-1]
    return MaskChoice(action=best_action, reward=best_reward, tries=tries, evaluated=[])


def choose_mask(
    policy: DQN,
    image: np.ndarray,
    try_fn: Callable[[list[int]], Sequence[int]],
    n_tries: int = 5,
    epsilon: float = 0.05,
    *,
    rng: np.random.Generator,
) -> MaskChoice:
    """One red mask for ``image`` (224x224x3 uint8): up to ``n_tries`` epsilon-greedy tries.

    ``try_fn(actions) -> rewards`` masks the image with each action, captions and scores it
    against this image's baselines. Outputs are deterministic, so each distinct action is
    evaluated once, all in one ``try_fn`` call (usually just the greedy action).
    """
    if n_tries < 1:
        raise SRDError(f"--n_tries {n_tries}: must be at least 1")
    greedy = greedy_actions(policy, [image])
    actions = [int(a) for a in draw_try_actions(greedy, n_tries, epsilon, rng)[0]]
    distinct = list(dict.fromkeys(actions))
    rewards = list(try_fn(distinct))
    if len(rewards) != len(distinct):
        raise ValueError(f"try_fn returned {len(rewards)} rewards for {len(distinct)} actions")
    choice = select_mask(actions, dict(zip(distinct, (int(r) for r in rewards), strict=True)))
    return dataclasses.replace(choice, evaluated=distinct)
