"""Exact networks for Gaussian data x0 ~ N(m, s^2 I): every solver can be checked against them.

For such data x_t ~ N(alpha_t m, (alpha_t^2 s^2 + sigma_t^2) I), the exact predictions are known in
closed form, and so is where the probability-flow ODE carries a point (`ode_endpoint`). The tests and
`pipelines/solver_convergence.py` measure every solver's error and order against them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cleandiff_rl.diffusion.model import DiffusionModel
from cleandiff_rl.diffusion.schedules import NoiseSchedule
from cleandiff_rl.diffusion.solvers import get_solver


class GaussianScore(nn.Module):
    """Exact eps-, x0- or v-prediction for x0 ~ N(m, s^2 I) under `schedule`: with var = alpha^2 s^2 + sigma^2,
    eps* = sigma (x - alpha m) / var, x0* = m + alpha s^2 (x - alpha m) / var, v* = alpha' x0* + sigma' eps*."""

    def __init__(self, schedule: NoiseSchedule, m: float, s: float, predict: str):
        super().__init__()
        self.schedule, self.m, self.s, self.predict = schedule, m, s, predict

    def forward(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        if bool((t == t[0]).all()):  # a sampler's batch shares one time: evaluate the schedule once
            t = t[:1]
        alpha = self.schedule.alpha(t).to(x.dtype).view(shape)
        sigma = self.schedule.sigma(t).to(x.dtype).view(shape)
        var = alpha**2 * self.s**2 + sigma**2
        eps = sigma * (x - alpha * self.m) / var
        x0 = self.m + alpha * self.s**2 * (x - alpha * self.m) / var
        if self.predict != "v":
            return eps if self.predict == "eps" else x0
        d_alpha, d_sigma = (d.to(x.dtype).view(shape) for d in self.schedule.velocity(t))
        return d_alpha * x0 + d_sigma * eps


def exact_model(time: str, schedule: str, predict: str, m: float = 0.5, s: float = 0.3,
                diffusion_steps: int = 1000) -> DiffusionModel:
    """A DiffusionModel whose (EMA) backbone is the exact `GaussianScore`."""
    model = DiffusionModel(nn.Identity(), time=time, schedule=schedule, predict=predict,
                           diffusion_steps=diffusion_steps, device="cpu")
    exact = GaussianScore(model.schedule, m, s, predict)
    model.model["diffusion"] = exact
    model.model_ema["diffusion"] = exact
    return model


def ode_endpoint(x_T: Tensor, levels: list, m: float, s: float) -> Tensor:
    """Where the probability-flow ODE maps x_T from the first grid level to the last one."""
    first, last = levels[0], levels[-1]
    var_T = first.alpha**2 * s**2 + first.sigma**2
    var_end = last.alpha**2 * s**2 + last.sigma**2
    return last.alpha * m + math.sqrt(var_end / var_T) * (x_T - first.alpha * m)


def ode_error(model: DiffusionModel, solver: str, steps: int, step_schedule: str = "uniform",
              n: int = 512, seed: int = 0) -> tuple[float, int]:
    """Mean absolute distance of an `exact_model`'s samples from the closed-form ODE endpoint, and the NFE."""
    gaussian = model.model_ema["diffusion"]
    dtype = torch.get_default_dtype()
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x, log = model.sample(torch.zeros(n, 2, dtype=dtype), solver=solver, steps=steps,
                          step_schedule=step_schedule, x_T=x_T)
    levels, _ = model.plan(get_solver(solver), steps, step_schedule)
    return (x - ode_endpoint(x_T, levels, gaussian.m, gaussian.s)).abs().mean().item(), log["nfe"]


def fit_order(nfes: list[int], errors: list[float]) -> float:
    """Least-squares slope of -log(error) against log(NFE)."""
    x = torch.log(torch.tensor(nfes, dtype=torch.float64))
    y = torch.log(torch.tensor(errors, dtype=torch.float64))
    x = x - x.mean()
    return float(-(x * (y - y.mean())).sum() / (x * x).sum())
