"""Diffuser (Janner, Du, Tenenbaum & Levine, ICML 2022): plan by diffusing state-action trajectories.

Per update (jannerm/diffuser, config/locomotion.py; CleanDiffuser pipelines/diffuser_d4rl_mujoco.py):
1. Model: a temporal U-Net denoises windows [s_0 a_0, ..., s_{H-1} a_{H-1}] of the dataset (x0
   prediction); s_0 is inpainted (fixed, no loss) and the error on a_0 weighs 10 (`action_weight`).
2. Value: a half U-Net V(x_t, t) regresses the discounted return from the window start (gamma
   0.997, -100 added at a termination) on windows noised like the model's training inputs.
Acting: sample `num_candidates` plans from the current state, each denoising step shifted up the
value gradient (classifier guidance, `w_cg`), rank the plans by V at the clean end, and execute the
first action of the best; replan at every step.
Departure: V regresses the standardized value (z-score over the dataset's windows), so `w_cg` is in
units of value standard deviations on every task; the original regresses raw returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cleandiff_rl.agents.common import diffusion_model
from cleandiff_rl.agents.planning import Planner, PlannerConfig
from cleandiff_rl.data.torch_datasets import SequenceDataset
from cleandiff_rl.nn import HalfJannerUNet1d, JannerUNet1d
from cleandiff_rl.utils import optimizer_step


@dataclass
class DiffuserConfig(PlannerConfig):
    """Defaults: Janner's hopper/walker2d settings (configs/task/* set the per-task ones), 20 steps,
    64 candidates (CleanDiffuser's), continuous cosine time so any solver and step count samples it."""

    model_dim: int = 32
    dim_mults: list = field(default_factory=lambda: [1, 2, 4, 8])
    attention: bool = False
    action_weight: float = 10.0  # loss weight of a_0
    num_candidates: int = 64
    w_cg: float = 0.1  # value-guidance weight: x0 += w_cg sigma^2 / alpha * grad V (0 = unguided)


class _Value(nn.Module):
    """The half U-Net as a guide: V(x_t, t) -> (batch,), in value standard deviations."""

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
        """Standardize the value targets with the dataset's window values."""
        self.value_mean.fill_(float(dataset.values.mean()))
        self.value_std.fill_(float(dataset.values.std().clamp_min(1e-6)))

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x0 = self.trajectories(batch)
        self.model.model.train()
        diffusion_loss = self.model.loss(x0)
        model_grad = self.model.optimize(diffusion_loss)

        x_t, t, _ = self.model.add_noise(x0)  # s_0 stays clean, as in sampling
        target = (batch["values"] - self.value_mean) / self.value_std
        value_loss = F.mse_loss(self.value(x_t, t), target)
        value_grad = optimizer_step(self.value_optimizer, value_loss, self.value.parameters())
        return {"model/loss": diffusion_loss.detach(), "model/grad_norm": model_grad,
                "value/loss": value_loss.detach(), "value/grad_norm": value_grad}

    def _act(self, obs: Tensor, solver: str, steps: int, generator: torch.Generator | None) -> Tensor:
        cfg = self.config
        n = cfg.num_candidates
        plans = self.sample_plans(obs, n, solver, steps, generator, w_cg=cfg.w_cg)
        clean = self.model.time_tensor(self.model.schedule.t_min, len(plans))
        best = self.value(plans, clean).view(-1, n).argmax(-1)
        chosen = plans.view(-1, n, cfg.horizon, self.x_dim)[torch.arange(len(best), device=plans.device), best]
        self.keep_plan(chosen)
        return chosen[:, 0, self.obs_dim:].clamp(-1.0, 1.0)
