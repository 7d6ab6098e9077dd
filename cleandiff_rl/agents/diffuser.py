"""Diffuser (Janner, Du, Tenenbaum & Levine, ICML 2022): plan by diffusing state-action trajectories.

Per update (jannerm/diffuser, config/locomotion.py, models/diffusion.py):
1. Model: a temporal U-Net denoises windows [s_0 a_0, ..., s_{H-1} a_{H-1}] of the dataset (x0
   prediction); s_0 is inpainted (fixed, no loss) and the error on a_0 weighs 10 (`action_weight`).
2. Value: a half U-Net V(x_t, t) regresses the discounted return from the window start (gamma
   0.997, -100 added at a termination) on windows noised like the model's training inputs.
Acting (sampling/functions.py n_step_guided_p_sample): sample `num_candidates` plans from the current
state; before each denoising step take `n_guide_steps` steps x += scale * var * grad V(x, t), var the
step's posterior variance (`scale_grad_by_std`), none on the last `t_stopgrad` steps; rank the plans
by V from the last guide step and execute the first action of the best; replan at every step.
Departures: windows are [s, a] (the original [a, s]: a channel permutation of the same network);
actions are not normalized; acting uses the online value (the original its EMA).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cleandiff_rl.agents.acting import act_setting
from cleandiff_rl.agents.common import diffusion_model
from cleandiff_rl.agents.planning import Planner, PlannerConfig
from cleandiff_rl.data.torch_datasets import SequenceDataset
from cleandiff_rl.diffusion.solvers import Level, get_solver
from cleandiff_rl.nn import HalfJannerUNet1d, JannerUNet1d
from cleandiff_rl.utils import optimizer_step


@dataclass
class DiffuserConfig(PlannerConfig):
    """Defaults: Janner's hopper/walker2d settings (configs/task/* set the per-task ones), 20 steps,
    64 candidates (Janner's plan batch_size), continuous cosine time so any solver and step count samples it."""

    model_dim: int = 32
    dim_mults: list = field(default_factory=lambda: [1, 2, 4, 8])
    attention: bool = False
    action_weight: float = 10.0  # loss weight of a_0
    num_candidates: int = act_setting(64)
    scale: float = act_setting(0.1)  # guide step size: x += scale * grad V (times the posterior variance; 0 = unguided)
    n_guide_steps: int = act_setting(2)  # guide steps before each denoising step
    t_stopgrad: int = act_setting(2)  # the last t_stopgrad denoising steps are unguided
    scale_grad_by_std: bool = act_setting(True)  # multiply the guide gradient by the step's posterior variance
    standardize_value: bool = False  # regress (value - mean) / std instead of the raw return (the original: raw)


class _Value(nn.Module):
    """The half U-Net as a guide: V(x_t, t) -> (batch,)."""

    def __init__(self, net: HalfJannerUNet1d):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        return self.net(x, t).squeeze(-1)


class Diffuser(Planner):
    name = "diffuser"
    Config = DiffuserConfig
    plans_actions = True

    def __init__(self, obs_dim: int, act_dim: int, config: dict | DiffuserConfig | None = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        cfg = self.config
        unet = dict(model_dim=cfg.model_dim, dim_mults=tuple(cfg.dim_mults))
        self.value = _Value(HalfJannerUNet1d(self.x_dim, horizon=cfg.horizon, **unet))
        loss_weight = torch.ones(cfg.horizon, self.x_dim)
        loss_weight[0, obs_dim:] = cfg.action_weight
        self.model = diffusion_model(cfg, JannerUNet1d(self.x_dim, attention=cfg.attention, **unet),
                                     fix_mask=self.fix_mask(), loss_weight=loss_weight, classifier=self.value,
                                     device=self.device)
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=cfg.lr)
        self.register_buffer("value_mean", torch.zeros((), device=self.device))
        self.register_buffer("value_std", torch.ones((), device=self.device))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self.model.optimizer, "value": self.value_optimizer}

    def prepare(self, dataset: SequenceDataset) -> None:
        """With `standardize_value`, standardize the value targets with the dataset's window values."""
        if not self.config.standardize_value:
            return
        self.value_mean.fill_(float(dataset.values.mean()))
        self.value_std.fill_(float(dataset.values.std().clamp_min(1e-6)))

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x0 = self.trajectories(batch)
        self.model.model.train()
        diffusion_loss = self.model.loss(x0)
        model_grad = self.model.optimize(diffusion_loss)

        x_t, t, _ = self.model.add_noise(x0)  # s_0 stays clean, as in sampling
        target = (batch["values"] - self.value_mean) / self.value_std  # the raw value unless `standardize_value`
        value_loss = F.mse_loss(self.value(x_t, t), target)
        value_grad = optimizer_step(self.value_optimizer, value_loss, self.value.parameters())
        return {"model/loss": diffusion_loss.detach(), "model/grad_norm": model_grad,
                "value/loss": value_loss.detach(), "value/grad_norm": value_grad}

    def plan(self, obs: Tensor, solver: str, steps: int,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """`num_candidates` value-guided plans per normalized observation and their values:
        `((b, n, horizon, x_dim), (b, n))`, as Janner's n_step_guided_p_sample draws them."""
        cfg, model = self.config, self.model
        solver_ = get_solver(solver)
        levels, coefs = model.plan(solver_, steps, "uniform")
        net, mask = model.model_ema["diffusion"], model.fix_mask
        prior = obs.new_zeros(obs.shape[0] * cfg.num_candidates, cfg.horizon, self.x_dim)
        prior[:, 0, :self.obs_dim] = obs.repeat_interleave(cfg.num_candidates, 0)

        def noise() -> Tensor:
            return torch.randn(prior.shape, generator=generator, device=prior.device, dtype=prior.dtype)

        def denoise(x: Tensor, level: Level, param: str) -> Tensor:
            c_x, c_out = level.conversion(model.predict, param)
            return net(x, model.time_tensor(level.t, len(x), x.dtype)) * c_out + x * c_x

        x = torch.where(mask, prior, noise() * cfg.temperature)  # unit variance, as the original's x_T (not sigma_T)
        outputs: deque = deque(maxlen=solver_.history)
        values = None
        for i, coef in enumerate(coefs):
            # 1. guide: n_guide_steps gradient steps on V at this level, scaled by the posterior variance
            level, target = levels[i], levels[i + 1]
            variance = target.sigma**2 * -math.expm1(2 * (level.log_snr - target.log_snr))
            step = cfg.scale * (variance if cfg.scale_grad_by_std else 1.0) if i < len(coefs) - cfg.t_stopgrad else 0.0
            t = model.time_tensor(level.t, len(x), x.dtype)
            for _ in range(cfg.n_guide_steps):
                with torch.enable_grad():
                    x_in = x.detach().requires_grad_(True)
                    values = self.value(x_in, t)
                    grad = torch.autograd.grad(values.sum(), x_in)[0]
                x = torch.where(mask, prior, x + step * grad)
            # 2. denoise: one solver step (ddpm: posterior mean + sigma z), s_0 inpainted
            x = torch.where(mask, prior, solver_.step(x, i, levels, coef, denoise, outputs, noise))
        if values is None:  # unguided: rank by V at the last level
            values = self.value(x, model.time_tensor(levels[-2].t, len(x), x.dtype))
        shape = (-1, cfg.num_candidates)
        self.last_sample_log = {"nfe": len(coefs), "classifier_calls": len(coefs) * cfg.n_guide_steps,
                                "t": [lv.t for lv in levels], "solver": solver_.name, "steps": steps}
        return x.view(*shape, cfg.horizon, self.x_dim), values.detach().view(shape)

    def _act(self, obs: Tensor, solver: str, steps: int, generator: torch.Generator | None) -> Tensor:
        plans, values = self.plan(obs, solver, steps, generator)
        best = values.argmax(-1)
        chosen = plans[torch.arange(len(best), device=plans.device), best]
        self.keep_plan(chosen)
        return chosen[:, 0, self.obs_dim:].clamp(-1.0, 1.0)
