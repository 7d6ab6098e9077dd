"""Train one diffusion model on a 2-D Gaussian mixture and sample it with every solver.

Outputs (in the Hydra run dir): samples.png (the true mixture, then rows: solvers, columns: steps),
results.csv/json (sliced Wasserstein distance to the true distribution per solver and NFE),
TensorBoard logs (`train/loss`, and `quality/<solver>` against NFE). The same model can be any
schedule and prediction, e.g. flow matching: `model.schedule=flow model.predict=v`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from tqdm import trange  # noqa: E402

from cleandiff_rl.diffusion import SOLVERS, DiffusionModel  # noqa: E402
from cleandiff_rl.nn import DQLMlp  # noqa: E402
from cleandiff_rl.utils import seed_everything, write_csv  # noqa: E402
from cleandiff_rl.utils.cli import user_errors


def mixture(n: int, modes: int, radius: float, std: float, generator: torch.Generator) -> torch.Tensor:
    """n points from `modes` Gaussians evenly spaced on a circle."""
    k = torch.randint(modes, (n,), generator=generator)
    angle = 2 * math.pi * k / modes
    centers = radius * torch.stack([angle.cos(), angle.sin()], -1)
    return centers + std * torch.randn(n, 2, generator=generator)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int, generator: torch.Generator) -> float:
    """SW_2 between two equal-size point clouds over random directions."""
    directions = torch.randn(x.shape[1], projections, generator=generator)
    directions /= directions.norm(dim=0, keepdim=True)
    px, _ = (x @ directions).sort(0)
    py, _ = (y @ directions).sort(0)
    return ((px - py) ** 2).mean().sqrt().item()


def run(cfg: DictConfig, out_dir: Path) -> tuple[list[dict], float]:
    """Train, then sample with every solver; returns the table rows and the metric's noise floor (the
    distance between two independent samples of the true mixture)."""
    generator = seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    d = cfg.data
    model = DiffusionModel(
        DQLMlp(2, emb_dim=cfg.model.emb_dim, hidden_dim=cfg.model.hidden_dim),
        time=cfg.model.time, schedule=cfg.model.schedule, diffusion_steps=cfg.model.diffusion_steps,
        predict=cfg.model.predict, ema_rate=cfg.model.ema_rate, lr=cfg.train.lr, device=cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)  # a bad model setting failed above, before any output
    writer = SummaryWriter(str(out_dir / "tb"))

    for step in (bar := trange(cfg.train.steps, desc="train")):
        x0 = mixture(cfg.train.batch_size, d.modes, d.radius, d.std, generator).to(model.device)
        metrics = model.update(x0)
        if step % cfg.train.log_every == 0:
            writer.add_scalar("train/loss", metrics["loss"], step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")

    solvers = list(SOLVERS) if cfg.sample.solvers == "all" else list(cfg.sample.solvers)
    steps_list = list(cfg.sample.steps)
    truth = mixture(d.n_eval, d.modes, d.radius, d.std, generator)
    floor = sliced_wasserstein(mixture(d.n_eval, d.modes, d.radius, d.std, generator), truth,
                               cfg.sample.projections, generator)
    fig, axes = plt.subplots(len(solvers) + 1, len(steps_list),
                             figsize=(1.6 * len(steps_list), 1.6 * (len(solvers) + 1)), squeeze=False)
    for ax in axes[0]:
        ax.axis("off")
    axes[0][0].axis("on")
    axes[0][0].scatter(*truth.T, s=0.3, alpha=0.5, color="black")
    axes[0][0].set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), xticks=[], yticks=[])
    axes[0][0].set_title(f"true mixture  SW {floor:.2f}", fontsize=6)
    rows = []
    for i, solver in enumerate(solvers, start=1):
        for j, steps in enumerate(steps_list):
            x, log = model.sample(torch.zeros(d.n_eval, 2), solver=solver, steps=steps,
                                  step_schedule=cfg.sample.step_schedule, generator=generator)
            x = x.cpu()
            finite = bool(torch.isfinite(x).all())
            sw = sliced_wasserstein(x, truth, cfg.sample.projections, generator) if finite else float("nan")
            rows.append({"solver": solver, "steps": steps, "nfe": log["nfe"], "sliced_wasserstein": sw})
            writer.add_scalar(f"quality/{solver}", sw, log["nfe"])
            ax = axes[i][j]
            ax.scatter(*x.clamp(-4, 4).T, s=0.3, alpha=0.5)
            ax.set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), xticks=[], yticks=[])
            ax.set_title(f"NFE {log['nfe']}  SW {sw:.2f}", fontsize=6)
            if j == 0:
                ax.set_ylabel(solver, fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "samples.png", dpi=110)
    plt.close(fig)
    writer.close()

    write_csv(out_dir / "results.csv", rows)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    return rows, floor


def print_table(rows: list[dict], steps_list: list[int], floor: float) -> None:
    """Sliced Wasserstein distance per solver (rows) and steps (columns); lower is better."""
    print(f"\nsliced Wasserstein-2 distance to the true mixture (lower is better; a second sample of the "
          f"mixture itself scores {floor:.3f})")
    print(f"{'solver':22s}" + "".join(f"{f'{s} steps':>11s}" for s in steps_list))
    for solver in dict.fromkeys(r["solver"] for r in rows):
        cells = {r["steps"]: r["sliced_wasserstein"] for r in rows if r["solver"] == solver}
        print(f"{solver:22s}" + "".join(f"{cells[s]:11.3f}" for s in steps_list))


@hydra.main(version_base="1.3", config_path="../configs", config_name="toy2d")
@user_errors
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.run_dir)
    rows, floor = run(cfg, out_dir)
    print_table(rows, list(cfg.sample.steps), floor)
    print(f"\nsamples: {out_dir / 'samples.png'}\ntable: {out_dir / 'results.csv'}\n"
          f"TensorBoard: tensorboard --logdir {out_dir / 'tb'}")


if __name__ == "__main__":
    main()
