"""The 2-D example: one diffusion model trained on a Gaussian mixture, sampled with every solver and scored by
the sliced Wasserstein-2 distance to the true mixture (`pipelines/toy2d.py` runs it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from tqdm import trange  # noqa: E402

from cleandiff_rl.diffusion import SOLVERS, DiffusionModel  # noqa: E402
from cleandiff_rl.nn import DQLMlp  # noqa: E402
from cleandiff_rl.plotting import metric_vs_nfe  # noqa: E402
from cleandiff_rl.utils import seed_everything, write_csv  # noqa: E402
from cleandiff_rl.utils.tables import format_table  # noqa: E402


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
    fig.suptitle("SW: sliced Wasserstein-2 distance to the true mixture (lower is better)", fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "samples.png", dpi=110)
    plt.close(fig)
    writer.close()
    metric_vs_nfe(rows, out_dir / "quality_vs_nfe.png", metric="sliced_wasserstein", logy=True,
                  ylabel="sliced Wasserstein-2 distance\nto the true mixture (lower is better)",
                  reference=floor, reference_label=f"a second sample of the mixture {floor:.3f}",
                  title=f"sample quality vs NFE: {cfg.model.schedule} schedule, {cfg.model.predict} prediction, "
                        f"{cfg.train.steps} updates")

    write_csv(out_dir / "results.csv", rows)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    return rows, floor


def quality_table(rows: list[dict], steps_list: list[int], floor: float) -> str:
    """The sliced Wasserstein distance per solver (rows) and steps (columns), lower is better, with its heading."""
    solvers = dict.fromkeys(r["solver"] for r in rows)
    cells = {(r["solver"], r["steps"]): r["sliced_wasserstein"] for r in rows}
    table = format_table(["solver", *(f"{s} steps" for s in steps_list)],
                         [[solver, *(f"{cells[solver, s]:.3f}" for s in steps_list)] for solver in solvers])
    return (f"sliced Wasserstein-2 distance to the true mixture (lower is better; a second sample of the "
            f"mixture itself scores {floor:.3f})\n{table}")
