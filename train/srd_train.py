"""SRD stage D2: train the DQN agent on the RL pool (reference SRD_train.py, --ppo_path).

One action paints one red square (10x10 centres x 5 sizes) on a pool image; the backdoored
captioner (--checkpoint_path) captions the masked image, the SFS components are scored against
the pool's reference caption, and the reference reward table rewards the change against the
pool's baselines. stable-baselines3 DQN with every hyperparameter a flag (reference defaults:
10,000 transitions, one environment); --num_envs N steps N environments with one batched
captioning call. Writes the policy zip, a reward log (JSON lines) and a reward-curve PNG beside
it. One DQN is trained by one process (reference B12). The pool's entries are read from D1's
shards; an image is re-derived from the training image (data flags recorded by D1) when an
episode starts on it, decoded images cached up to --pool_cache_mb.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from srd.cleaning import SFSArgs, SRDArgs, load_scorer, require_files, vlm_caption_fn
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data import DEFAULT_CACHE_MB
from srd.defenses.srd_pool import stream_pool
from srd.engine import process_state
from srd.errors import SRDError
from srd.figures import plot_reward_curve
from srd.io import setup_logging, write_json
from srd.model import ModelArgs, load_captioner, model_signature
from srd.rl.agent import DQNConfig, read_reward_log, save_policy, train_dqn
from srd.rl.env import BatchedRedMaskVecEnv, EnvConfig, sfs_score_fn
from srd.rl.reward import RewardConfig
from srd.runs import remove_paths

log = logging.getLogger("srd_train")


@dataclass
class AgentRunArgs:
    """Agent run: output handling, the pool image cache."""

    overwrite: bool = arg(False, help="replace an existing policy at --ppo_path")
    pool_cache_mb: float = arg(
        DEFAULT_CACHE_MB, help="decoded pool images kept in memory, in MiB (0: none)"
    )


def main(argv: Sequence[str] | None = None) -> str:
    model_args, srd, sfs, dqn, env_cfg, reward_cfg, cfg = parse(
        argv,
        ModelArgs,
        SRDArgs,
        SFSArgs,
        DQNConfig,
        EnvConfig,
        RewardConfig,
        AgentRunArgs,
        description=__doc__,
    )
    state = process_state()
    if state.num_processes > 1:
        raise SRDError(
            f"stage D2 trains one DQN in one process; {state.num_processes} were launched "
            "(run it with plain python)"
        )
    policy_path = srd.policy_file
    if policy_path.suffix != ".zip":  # a file named as given is read as given; we write a zip
        policy_path = policy_path.with_name(policy_path.name + ".zip")
    if policy_path.exists() and not cfg.overwrite:
        raise SRDError(f"--ppo_path {policy_path}: policy exists (pass --overwrite)")
    require_files(("--checkpoint_path", model_args.checkpoint_path))
    pool = stream_pool(srd.save_data_path, cfg.pool_cache_mb)
    pool_model = pool.info["meta"].get("checkpoint_path")
    device = state.device
    captioner = load_captioner(model_args, device=device)
    scorer = load_scorer(sfs, device, model_args.trust_remote_code)
    # Logging (and its file) only once every input loaded: bad input leaves nothing behind.
    # The policy is the stage's marker: an old one goes first, so a killed --overwrite never
    # leaves it beside the new run's log, record and curve.
    remove_paths([policy_path, policy_path.with_suffix(".config.json"), srd.reward_log,
                  srd.reward_curve])  # fmt: skip
    setup_logging(policy_path.with_suffix(".log"))
    if pool_model != model_args.checkpoint_path:
        # Allowed (reference P3: a surrogate pool may transfer), but the baselines then come
        # from another captioner than the one rewarded here.
        log.warning("the pool was captioned by %s, the agent is rewarded by %s",
                    pool_model, model_args.checkpoint_path)  # fmt: skip
    env = BatchedRedMaskVecEnv(
        pool,
        vlm_caption_fn(captioner, sfs),
        sfs_score_fn(scorer),
        num_envs=dqn.num_envs,
        reward_config=reward_cfg,
        max_steps=env_cfg.max_steps,
        obs_size=env_cfg.obs_size,
        seed=dqn.seed,
    )
    log.info("D2: %d pool images, %d transitions, %d env(s)",
             len(pool), dqn.total_timesteps, dqn.num_envs)  # fmt: skip
    model = train_dqn(env, dqn, srd.reward_log)
    record = {
        "stage": "srd_train",
        **to_dict(model_args, srd, sfs, dqn, env_cfg, reward_cfg, cfg),
        "model_signature": model_signature(model_args),
        "pool_images": len(pool),
        "updates": int(model._n_updates),
    }
    write_json(policy_path.with_suffix(".config.json"), record)
    steps, episodes = read_reward_log(srd.reward_log)
    plot_reward_curve(steps, episodes, srd.reward_curve, title=f"SRD agent: {policy_path}")
    # The policy is written last: it is the stage's marker.
    save_policy(model, policy_path, dqn)
    mean = sum(s["reward"] for s in steps) / max(len(steps), 1)
    log.info("policy %s (mean reward %.3f over %d transitions)", policy_path, mean, len(steps))
    print(json.dumps({"policy": str(policy_path), "mean_reward": mean}))
    return str(policy_path)


if __name__ == "__main__":
    run_main(main)
