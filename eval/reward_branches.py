"""Which rows of SRD's reward table an agent's transitions fell into, against its thresholds.

The reference set alpha 0.1 and beta 0.5 for MiniLM + GPT-2-large score ratios; ours are scored
by MiniLM + a word-trigram LM against a tiny reference captioner. This reads D2's two reward
logs (the trained policy's and the random policy's, beside ``--ppo_path``) and the pool's
baselines (``--save_data_path``), and gives each table row's share of the transitions, the
quantiles of delta_sem and delta_flu, and whether the recomputed rewards equal the logged ones.
Another ``--alpha``/``--alpha2``/``--beta`` shows where the same transitions would fall under
other thresholds (nothing is retrained). Writes ``<policy>.reward_branches.json`` with the
thresholds of the run (D2 writes it too) unless given others, then prints a table.

    python eval/reward_branches.py --ppo_path checkpoints_remote/srd-badnet/policy.zip \\
        --save_data_path checkpoints_remote/srd-badnet/pool
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

from srd.cli import run_main
from srd.config import parse
from srd.defenses.srd.dqn import read_reward_log
from srd.defenses.srd.inputs import SRDArgs
from srd.defenses.srd.landscape import policy_reward_branches
from srd.defenses.srd.pool import baseline_scores, read_pool_entries, read_pool_info
from srd.defenses.srd.reward import RewardConfig
from srd.io import write_json


def main(argv: Sequence[str] | None = None) -> dict:
    srd, cfg = parse(argv, SRDArgs, RewardConfig, description=__doc__)
    logs = {
        "training": read_reward_log(srd.reward_log)[0],
        "random_policy": read_reward_log(srd.random_reward_log)[0],
    }
    info = read_pool_info(srd.save_data_path)
    entries = read_pool_entries(srd.save_data_path, info)
    ids = [str(i) for i in entries["ids"]]
    base_sem, base_flu = baseline_scores(entries)
    branches = policy_reward_branches(logs, ids, base_sem, base_flu, cfg)
    if asdict(cfg) == asdict(RewardConfig()):
        write_json(srd.reward_branches, branches)
    lines = ["| row of the table | reward | training | random policy |", "|---|---|---|---|"]
    rows = zip(branches["training"]["branches"], branches["random_policy"]["branches"], strict=True)
    for trained, random in rows:
        lines.append(f"| {trained['branch']} | {trained['reward']:+d} | "
                     f"{100 * trained['share']:.1f}% | {100 * random['share']:.1f}% |")  # fmt: skip
    print("\n".join(lines))
    print(json.dumps({k: {q: v for q, v in b.items() if q != "branches"}
                      for k, b in branches.items()}, indent=1))  # fmt: skip
    return branches


if __name__ == "__main__":
    run_main(main)
