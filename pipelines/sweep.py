"""Evaluate one diffusion policy checkpoint with every solver at several step counts (score vs NFE).

See configs/sweep.yaml. Prints the table (normalized score ± se and NFE per solver and steps) and
where sweep.csv, sweep.json and the TensorBoard logs are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from cleandiff_rl.evaluation import run_sweep, sweep_table
from cleandiff_rl.training import register_configs
from cleandiff_rl.utils.cli import pipeline

register_configs()  # the checkpoint_name resolver of the run folder


@pipeline("sweep")
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = run_sweep(cfg)
    out = Path(cfg.run_dir)
    print("\n" + sweep_table(rows))
    print(f"\ntables:      {out / 'sweep.csv'}, {out / 'sweep.json'}\nTensorBoard: tensorboard --logdir {out / 'tb'}")


if __name__ == "__main__":
    main()
