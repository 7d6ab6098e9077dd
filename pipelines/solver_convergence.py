"""Print each solver's measured accuracy and convergence order on the exact Gaussian score.

ODE solvers: mean |x - x_end| at each step count, where x_end is the closed-form endpoint of the
probability-flow ODE, and the least-squares order in NFE. Stochastic solvers: sample mean and std
(target: m and s). Writes results.json and TensorBoard scalars (error vs NFE per solver).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cleandiff_rl.diffusion import SOLVERS, get_solver, time_grid
from cleandiff_rl.diffusion.analytic import exact_model, fit_order, ode_error
from cleandiff_rl.utils.cli import pipeline


@pipeline("solver_convergence")
def main(cfg: DictConfig) -> None:
    torch.set_default_dtype(torch.float64)  # measure the solver, not float32 rounding
    models = {}
    for time, schedule, step_schedule in (tuple(s) for s in cfg.settings):  # bad settings fail before any output
        models[time, schedule, step_schedule] = model = exact_model(time, schedule, "eps", cfg.m, cfg.s)
        time_grid(model.schedule, 1, step_schedule)
    out_dir = Path(cfg.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(out_dir / "tb"))
    ode = [n for n in SOLVERS if not get_solver(n).stochastic]
    sde = [n for n in SOLVERS if get_solver(n).stochastic]
    results = []
    for (time, schedule, step_schedule), model in tqdm(models.items(), desc="settings"):
        setting = f"{time}/{schedule}/{step_schedule}"
        print(f"\n[{setting}] ODE: mean |x - x_end| at steps {list(cfg.ode_steps)}, fitted order in NFE")
        for solver in ode:
            runs = [ode_error(model, solver, n, step_schedule) for n in cfg.ode_steps]
            errors, nfes = [r[0] for r in runs], [r[1] for r in runs]
            order = fit_order(nfes, errors)
            for e, n in zip(errors, nfes):
                writer.add_scalar(f"{setting}/error/{solver}", e, n)
            results.append({"setting": setting, "solver": solver, "nfe": nfes, "error": errors, "order": order})
            print(f"  {solver:20s}" + "".join(f"{e:10.2e}" for e in errors) + f"   order {order:.2f}")
        print(f"[{setting}] SDE at {cfg.sde_steps} steps: mean (target {cfg.m}), std (target {cfg.s})")
        for solver in sde:
            x, _ = model.sample(torch.zeros(cfg.sde_samples, 2), solver=solver, steps=cfg.sde_steps,
                                step_schedule=step_schedule, generator=torch.Generator().manual_seed(0))
            mean, std = x.mean().item(), x.std().item()
            results.append({"setting": setting, "solver": solver, "mean": mean, "std": std})
            print(f"  {solver:20s} mean {mean:.4f}  std {std:.4f}")
    writer.close()
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
