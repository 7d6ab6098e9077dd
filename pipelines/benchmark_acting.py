"""Time per action of one checkpoint for every solver x steps; prints a table, writes results.json.

A policy that acts without a solver (BC; FQL's one-step actor, 1 network call) gets one row.

For a planner this is the planning time per action: sampling all candidate plans (value gradients
or batched CFG included) and choosing one.
"""

from __future__ import annotations

import json
import statistics
from itertools import product
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cleandiff_rl.agents import load_policy
from cleandiff_rl.evaluation import CROSS_SOLVERS, network_calls
from cleandiff_rl.utils import mean_call_seconds
from cleandiff_rl.utils.cli import pipeline


@pipeline("benchmark_acting")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    policy = load_policy(cfg.checkpoint, cfg.device).with_settings(OmegaConf.to_container(cfg.settings))
    env = gym.make(policy.env_id)
    obs = np.stack([env.reset(seed=cfg.seed + i)[0] for i in range(cfg.batch)])
    env.close()
    solvers = list(CROSS_SOLVERS) if cfg.solvers == "all" else list(cfg.solvers)  # act rejects unknown names
    # a policy without a solver (BC, FQL's one-step actor) acts one way: one row
    grid = list(product(solvers, cfg.steps)) if policy.is_diffusion else [(None, None)]
    rows = []
    for solver, steps in grid:
        def act() -> None:
            policy.act(obs, solver=solver, steps=steps)
        act()  # warm-up (plans and caches)
        ms = 1000 * statistics.median(mean_call_seconds(act, cfg.min_seconds) for _ in range(cfg.repeats))
        rows.append({"solver": solver, "steps": steps, **network_calls(policy), "ms_per_action": ms})
        print(f"{solver or 'no solver':<22}{steps or '-':>4} steps  nfe {rows[-1]['nfe'] or '-':>3}  "
              f"{ms:9.3f} ms per action", flush=True)
    out = Path(cfg.run_dir) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": cfg.checkpoint, "batch": cfg.batch, "device": str(policy.device),
                               "rows": rows}, indent=1))
    print(f"{policy.name} ({policy.dataset_id}), batch {cfg.batch}, {policy.device}; results: {out}")


if __name__ == "__main__":
    main()
