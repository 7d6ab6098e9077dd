"""Train one diffusion model on a 2-D Gaussian mixture and sample it with every solver.

Outputs (in run_dir): samples.png (the true mixture, then rows: solvers, columns: steps; each panel's SW is
its sliced Wasserstein-2 distance to the true mixture, lower is better), quality_vs_nfe.png (that distance
against NFE, one line per solver), results.csv/json (the distance per solver and NFE), TensorBoard logs
(`train/loss`, and `quality/<solver>` against NFE). The same model can be any
schedule and prediction, e.g. flow matching: `model.schedule=flow model.predict=v`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cleandiff_rl.toy2d import quality_table, run
from cleandiff_rl.utils.cli import pipeline


@pipeline("toy2d")
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.run_dir)
    rows, floor = run(cfg, out_dir)
    print("\n" + quality_table(rows, list(cfg.sample.steps), floor))
    print(f"\nsamples: {out_dir / 'samples.png'}\nquality vs NFE: {out_dir / 'quality_vs_nfe.png'}\n"
          f"table: {out_dir / 'results.csv'}\n"
          f"TensorBoard: tensorboard --logdir {out_dir / 'tb'}")


if __name__ == "__main__":
    main()
