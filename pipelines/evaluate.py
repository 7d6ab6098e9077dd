"""Evaluate one saved policy in MuJoCo and print its return and normalized score (mean ± se).

See configs/evaluate.yaml. Writes run_dir/evaluation.json (the result, with the checkpoint path).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from cleandiff_rl.agents import load_policy
from cleandiff_rl.evaluation import evaluate
from cleandiff_rl.utils import atomic_write
from cleandiff_rl.training import register_configs
from cleandiff_rl.utils.cli import user_errors

register_configs()  # the checkpoint_name resolver of the run folder


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
@user_errors
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy = load_policy(cfg.checkpoint, cfg.device, temperature=cfg.temperature, threads=None)
    result = evaluate(policy, cfg.env_id, episodes=cfg.episodes, seed=cfg.seed, solver=cfg.solver, steps=cfg.steps,
                      progress=True)

    sampling = ""
    if policy.is_diffusion:
        sampling = f", solver {result['solver']}, {result['steps']} steps (nfe {result['nfe']})"
        if result["temperature"] is not None:
            sampling += f", temperature {result['temperature']:g}"
    print(f"{policy.name} policy (trained on {policy.dataset_id}, {policy.updates} updates) from {cfg.checkpoint}")
    print(f"{result['env_id']}, {result['episodes']} episodes{sampling}")
    print(f"return           {result['return_mean']:.1f} ± {result['return_se']:.1f}")
    if result["score_mean"] is not None:
        print(f"normalized score {result['score_mean']:.1f} ± {result['score_se']:.1f}")
    print(f"episode length   {result['length_mean']:.0f}")
    print(f"time per action  {result['time_per_action_ms']:.2f} ms (one batched call for all running episodes)")

    out = atomic_write(Path(cfg.run_dir) / "evaluation.json",
                       lambda f: json.dump({"checkpoint": str(cfg.checkpoint), **result}, f, indent=1))
    print(f"result: {out}")


if __name__ == "__main__":
    main()
