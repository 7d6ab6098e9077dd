"""Evaluate one diffusion policy checkpoint with every solver at several step counts (score vs NFE).

See configs/sweep.yaml. Prints the table (normalized score ± se and NFE per solver and steps) and
where sweep.csv, sweep.json and the TensorBoard logs are.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cleandiff_rl.evaluation import format_table, sweep_checkpoint
from cleandiff_rl.training import register_configs
from cleandiff_rl.utils.cli import user_errors

register_configs()  # the checkpoint_name resolver of the run folder


def run_sweep(cfg: DictConfig) -> list[dict]:
    """Load `cfg.checkpoint` and sweep it; tables in `cfg.run_dir`, TensorBoard in `cfg.run_dir`/tb."""
    return sweep_checkpoint(cfg.checkpoint, cfg.run_dir, Path(cfg.run_dir) / "tb", device=cfg.device,
                            env_id=cfg.env_id, temperature=cfg.temperature,
                            settings=OmegaConf.to_container(cfg.settings), solvers=list(cfg.solvers), steps=list(cfg.steps),
                            episodes=cfg.episodes, seed=cfg.seed)


@hydra.main(version_base="1.3", config_path="../configs", config_name="sweep")
@user_errors
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = run_sweep(cfg)
    out = Path(cfg.run_dir)
    print("\n" + format_table(rows))
    print(f"\ntables:      {out / 'sweep.csv'}, {out / 'sweep.json'}\nTensorBoard: tensorboard --logdir {out / 'tb'}")


if __name__ == "__main__":
    main()
