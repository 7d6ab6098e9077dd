"""Sampling and training speed of the diffusion core; prints tables and writes results.json.

The overhead ratio is sample time / (NFE x the time of one bare network forward at the same batch):
1.0 means the sampler adds nothing to the network calls it makes.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cleandiff_rl.diffusion import SOLVERS, DiffusionModel
from cleandiff_rl.nn import DQLMlp, JannerUNet1d
from cleandiff_rl.utils import mean_call_seconds, seed_everything
from cleandiff_rl.utils.cli import pipeline


def time_sampling(name: str, model: DiffusionModel, prior: torch.Tensor, condition: torch.Tensor | None,
                  cfg: DictConfig, solvers: list[str], repeats: int) -> list[dict]:
    """Rows of (solver, steps, nfe, ms per sample() call, overhead ratio) for one model and batch.

    Forward and sample() blocks alternate, and the ratio is the median of per-repeat ratios, so a
    change in machine load between measurements does not bias it.
    """
    net = model.model_ema["diffusion"]
    t = model.time_tensor(model.schedule.t_max, prior.shape[0])

    def forward():
        with torch.no_grad():
            net(prior, t, condition)

    rows = []
    for solver in tqdm(solvers, desc=name, leave=False):
        for steps in cfg.steps:
            def sample():
                return model.sample(prior, solver=solver, steps=steps, condition_cfg=condition)

            nfe = sample()[1]["nfe"]  # also warms the plan and time-tensor caches
            forward()
            samples = [(mean_call_seconds(forward, cfg.min_seconds), mean_call_seconds(sample, cfg.min_seconds))
                       for _ in range(repeats)]
            rows.append({"setting": name, "solver": solver, "steps": steps, "nfe": nfe,
                         "ms": 1e3 * statistics.median(s for _, s in samples),
                         "forward_ms": 1e3 * statistics.median(f for f, _ in samples),
                         "overhead_ratio": statistics.median(s / (nfe * f) for f, s in samples)})
    return rows


def training_steps_per_second(model: DiffusionModel, x0: torch.Tensor, condition: torch.Tensor | None,
                              steps: int) -> float:
    model.update(x0, condition)
    start = time.perf_counter()
    for _ in range(steps):
        model.update(x0, condition)
    return steps / (time.perf_counter() - start)


def print_table(rows: list[dict], key: str, fmt: str, title: str) -> None:
    steps = sorted({r["steps"] for r in rows})
    print(f"\n{title}\n{'solver':22s}" + "".join(f"{s:>9d}" for s in steps))
    for solver in dict.fromkeys(r["solver"] for r in rows):
        cells = {r["steps"]: r[key] for r in rows if r["solver"] == solver}
        print(f"{solver:22s}" + "".join(format(cells[s], fmt).rjust(9) for s in steps))


@pipeline("benchmark_sampling")
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    solvers = list(SOLVERS) if cfg.solvers == "all" else list(cfg.solvers)
    device = torch.device(cfg.device)

    mlp = DiffusionModel(DQLMlp(cfg.mlp.x_dim, cond_dim=cfg.mlp.cond_dim), time="continuous", device=device)
    unet = DiffusionModel(JannerUNet1d(cfg.unet.x_dim, model_dim=cfg.unet.model_dim, dim_mults=tuple(cfg.unet.dim_mults)),
                          time="continuous", device=device)
    rows = []
    for batch in cfg.mlp.batches:
        prior = torch.zeros(batch, cfg.mlp.x_dim, device=device)
        rows += time_sampling(f"mlp_b{batch}", mlp, prior, torch.randn(batch, cfg.mlp.cond_dim, device=device), cfg,
                              solvers, cfg.mlp.repeats)
    prior = torch.zeros(cfg.unet.batch, cfg.unet.horizon, cfg.unet.x_dim, device=device)
    rows += time_sampling(f"unet_b{cfg.unet.batch}", unet, prior, None, cfg, solvers, cfg.unet.repeats)

    training = {
        f"mlp_b{cfg.mlp.train_batch}": training_steps_per_second(
            mlp, torch.randn(cfg.mlp.train_batch, cfg.mlp.x_dim, device=device),
            torch.randn(cfg.mlp.train_batch, cfg.mlp.cond_dim, device=device), cfg.train_steps),
        f"unet_b{cfg.unet.train_batch}": training_steps_per_second(
            unet, torch.randn(cfg.unet.train_batch, cfg.unet.horizon, cfg.unet.x_dim, device=device), None,
            cfg.train_steps),
    }

    writer = SummaryWriter(str(out_dir / "tb"))
    for r in rows:
        writer.add_scalar(f"{r['setting']}/ms/{r['solver']}", r["ms"], r["steps"])
        writer.add_scalar(f"{r['setting']}/overhead_ratio/{r['solver']}", r["overhead_ratio"], r["steps"])
    writer.close()
    (out_dir / "results.json").write_text(json.dumps({"sampling": rows, "training_steps_per_s": training}, indent=1))

    print(f"device {device}, torch threads {torch.get_num_threads()}")
    for setting in dict.fromkeys(r["setting"] for r in rows):
        sub = [r for r in rows if r["setting"] == setting]
        forward_ms = statistics.median(r["forward_ms"] for r in sub)
        print_table(sub, "ms", ".2f", f"[{setting}] ms per sample() call (one forward: {forward_ms:.3f} ms)")
        print_table(sub, "overhead_ratio", ".3f", f"[{setting}] overhead ratio = time / (NFE x forward)")
    print("\ntraining steps/s: " + ", ".join(f"{k} {v:.1f}" for k, v in training.items()))
    print(f"results: {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
