"""SRD stage D2: train the DQN agent on the RL pool (reference SRD_train.py, --ppo_path).

One action paints one red square (10x10 centres x 5 sizes) on a pool image; the backdoored
captioner (--checkpoint_path) captions the masked image, the SFS components are scored against
the pool's reference caption, and the reference reward table rewards the change against the
pool's baselines. stable-baselines3 DQN with every hyperparameter a flag; --num_envs N steps N
environments with one batched captioning call. The run's length and schedule are ours (short
episodes over a shuffled pool, 3,000 transitions, target copies every 500): every pool image is
visited, episodes end and the target network is copied several times in minutes on a CPU. The
reference's run is --total_timesteps 10000 --num_envs 1 --max_steps 150 --pool_order random
--learning_starts 100 --target_update_interval 10000 --exploration_fraction 0.1 --obs_size 224,
which --reference_schedule sets (recorded as the run's "schedule": reference, ours or custom).

After training, a random policy steps the same environment (same pool, seed and number of
transitions) and the trained policy's greedy square is scored once on every pool image.
Writes the policy zip and, beside it, the reward logs (JSON lines) of both policies, the
reward curve against the random policy (PNG) and agent_report.json (greedy vs random mean
reward, episodes, target-network copies, pool images visited, and how much the random
policy's reward depends on the image, the square size and its centre). One DQN is trained by one
process (reference B12). The pool's entries are read from D1's shards; an image is re-derived
from the training image (data flags recorded by D1) when an episode starts on it, decoded images
cached up to --pool_cache_mb.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from srd.captioner.args import ModelArgs, model_signature
from srd.captioner.engine import process_state
from srd.captioner.factory import load_captioner
from srd.cli import run_main
from srd.config import arg, parse, to_dict
from srd.data.records import DEFAULT_CACHE_MB
from srd.defenses.srd.dqn import (
    REFERENCE_SCHEDULE,
    DQNConfig,
    agent_report,
    evaluate_greedy,
    read_reward_log,
    run_random_policy,
    schedule_name,
    train_dqn,
)
from srd.defenses.srd.env import EnvConfig, sfs_score_fn
from srd.defenses.srd.figures import plot_reward_curve
from srd.defenses.srd.inputs import (
    SFSArgs,
    SRDArgs,
    load_scorer,
    record_reference,
    vlm_caption_fn,
)
from srd.defenses.srd.landscape import policy_reward_branches, reward_structure
from srd.defenses.srd.policy import save_policy
from srd.defenses.srd.pool_source import stream_pool
from srd.defenses.srd.reward import RewardConfig
from srd.defenses.srd.variants import agent_variant, pool_occlusion_maps
from srd.defenses.srd.vecenv import BatchedRedMaskVecEnv
from srd.errors import SRDError
from srd.flags import at_least
from srd.io import require_files, setup_logging, write_json
from srd.runs import remove_paths

log = logging.getLogger("srd_train")


@dataclass
class AgentRunArgs:
    """Agent run: output handling, the pool image cache."""

    overwrite: bool = arg(False, help="replace an existing policy at --ppo_path")
    eval_envs: int = arg(
        0,
        help="environments the random-policy baseline and the greedy scoring step in one batched "
        "caption call (0: --num_envs, the training's). Ours: random actions never read the "
        "observation and masks do not accumulate (reference B10), so more copies change which "
        "pool images the baseline draws, not what a transition can earn; a one-environment "
        "schedule's baseline then costs minutes, not an hour",
        check=at_least(0),
    )
    reference_schedule: bool = arg(
        False,
        help="train with the reference's schedule (srd.defenses.srd.dqn.REFERENCE_SCHEDULE: "
        + ", ".join(f"--{k} {v}" for k, v in REFERENCE_SCHEDULE.items())
        + "); its flags may then not be given",
    )
    pool_cache_mb: float = arg(
        DEFAULT_CACHE_MB,
        help="decoded pool images kept in memory, in MiB (0: none)",
        check=at_least(0),
    )


def with_reference_schedule(
    dqn: DQNConfig, env_cfg: EnvConfig, argv: Sequence[str]
) -> tuple[DQNConfig, EnvConfig]:
    """``dqn`` and ``env_cfg`` with :data:`REFERENCE_SCHEDULE`'s values; a flag of it given
    on the command line too is refused (one of the two would be silently dropped)."""
    given = [k for k in REFERENCE_SCHEDULE
             if any(a == f"--{k}" or a.startswith(f"--{k}=") for a in argv)]  # fmt: skip
    if given:
        raise SRDError(f"--reference_schedule sets --{given[0]}; do not pass it too")
    learner = {k: v for k, v in REFERENCE_SCHEDULE.items() if hasattr(dqn, k)}
    episodes = {k: v for k, v in REFERENCE_SCHEDULE.items() if k not in learner}
    return dataclasses.replace(dqn, **learner), dataclasses.replace(env_cfg, **episodes)


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
    if cfg.reference_schedule:
        dqn, env_cfg = with_reference_schedule(dqn, env_cfg, sys.argv[1:] if argv is None else argv)
    schedule = schedule_name(dqn, env_cfg)
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
                  srd.reward_curve, srd.random_reward_log, srd.agent_report,
                  srd.reward_branches])  # fmt: skip
    setup_logging(policy_path.with_suffix(".log"))
    if pool_model != model_args.checkpoint_path:
        # Allowed (reference P3: a surrogate pool may transfer), but the baselines then come
        # from another captioner than the one rewarded here.
        log.warning("the pool was captioned by %s, the agent is rewarded by %s",
                    pool_model, model_args.checkpoint_path)  # fmt: skip
    caption_fn, score_fn = vlm_caption_fn(captioner, sfs), sfs_score_fn(scorer)
    occlusion = None
    if env_cfg.occlusion_grid:  # our variant: where the captioner's caption reacts
        t0 = time.time()
        occlusion = pool_occlusion_maps(pool, caption_fn, env_cfg.occlusion_grid)
        occlusion_wall_s = round(time.time() - t0, 1)

    def make_env(num_envs: int = dqn.num_envs) -> BatchedRedMaskVecEnv:
        """The environment of both policies: same pool, flags and seed."""
        return BatchedRedMaskVecEnv(
            pool,
            caption_fn,
            score_fn,
            num_envs=num_envs,
            reward_config=reward_cfg,
            max_steps=env_cfg.max_steps,
            obs_size=env_cfg.obs_size,
            seed=dqn.seed,
            pool_order=env_cfg.pool_order,
            area_cost=env_cfg.area_cost,
            max_square_side=env_cfg.max_square_side,
            occlusion=occlusion,
        )

    log.info("D2: %d pool images, %d transitions, %d env(s), %d-step episodes (%s order), "
             "%d-px observation: %s schedule", len(pool), dqn.total_timesteps, dqn.num_envs,
             env_cfg.max_steps, env_cfg.pool_order, env_cfg.obs_size, schedule)  # fmt: skip
    t0 = time.time()
    model, training = train_dqn(make_env(), dqn, srd.reward_log)
    training["wall_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    eval_envs = cfg.eval_envs or dqn.num_envs
    random = run_random_policy(make_env(eval_envs), training["transitions"], dqn.seed,
                               srd.random_reward_log)  # fmt: skip
    random["wall_s"], random["num_envs"] = round(time.time() - t0, 1), eval_envs
    t0 = time.time()
    greedy_envs = make_env(eval_envs).envs  # unvectorised: evaluate_greedy resets each on one image
    greedy = evaluate_greedy(model, greedy_envs)
    greedy["wall_s"] = round(time.time() - t0, 1)
    report = {"schedule": schedule, **agent_report(training, random, greedy, len(pool))}
    report["greedy_policy"]["wall_s"] = greedy["wall_s"]
    log.info("greedy policy: mean reward %.3f on %d pool images; random policy: %.3f over %d "
             "transitions; gain %+.3f", greedy["mean_reward"], greedy["images"],
             random["mean_reward"], random["transitions"],
             report["gain_over_random"])  # fmt: skip
    record = {
        "stage": "srd_train",
        **to_dict(model_args, srd, sfs, dqn, env_cfg, reward_cfg, cfg),
        "schedule": schedule,
        "model_signature": model_signature(model_args),
        "pool_images": len(pool),
        "updates": int(model._n_updates),
    }
    record_reference(record, sfs)
    steps, episodes = read_reward_log(srd.reward_log)
    random_steps, _ = read_reward_log(srd.random_reward_log)
    # What there is to learn: how the random policy's rewards vary by image, size, centre.
    report["reward_structure"] = reward_structure(random_steps)
    # Which rows of the reward table the transitions fell into, against the thresholds used.
    logs = {"training": steps, "random_policy": random_steps}
    branches = policy_reward_branches(logs, pool.ids, pool.base_sem, pool.base_flu, reward_cfg)
    report["reward_branches"] = branches
    if occlusion is not None:
        report["occlusion"] = {
            "grid": env_cfg.occlusion_grid,
            "wall_s": occlusion_wall_s,
            "mean": float(occlusion.mean()),
            "maps": {i: m.round(4).tolist() for i, m in zip(pool.ids, occlusion, strict=True)},
        }
    write_json(srd.reward_branches, branches)
    write_json(policy_path.with_suffix(".config.json"), record)
    write_json(srd.agent_report, report)
    plot_reward_curve(steps, episodes, srd.reward_curve, title=f"SRD agent: {policy_path}",
                      random_steps=random_steps,
                      greedy_mean=greedy["mean_reward"])  # fmt: skip
    # The policy is written last: it is the stage's marker.
    save_policy(model, policy_path, dqn, agent_variant(pool.info["source"], env_cfg), schedule)
    summary = {
        "policy": str(policy_path),
        "mean_reward": training["mean_reward"],
        "greedy_mean_reward": greedy["mean_reward"],
        "random_mean_reward": random["mean_reward"],
        "gain_over_random": report["gain_over_random"],
        "episodes": training["episodes"],
        "target_updates": training["target_updates"],
        "images_visited": training["images_visited"],
        "schedule": schedule,
    }
    log.info("policy %s: %s", policy_path, summary)
    print(json.dumps(summary))
    return str(policy_path)


if __name__ == "__main__":
    run_main(main)
