"""Decision Diffuser (Ajay et al., ICLR 2023): diffuse state trajectories conditioned on the return,
then act by inverse dynamics.

Per update (anuragajay/decision-diffuser; CleanDiffuser pipelines/dd_d4rl_mujoco.py):
1. Model: a DiT1d (or a temporal U-Net, `temporal_unet` the original's) denoises windows [s_0, ..., s_{H-1}] of
   normalized states (eps prediction), s_0 inpainted, the error on s_1 weighted 10 (CleanDiffuser's), conditioned
   on the window's discounted return / `return_scale` through an MLP whose output is dropped
   (replaced by the null embedding) with probability 0.25, so one network learns p(tau | R) and p(tau).
2. Inverse dynamics: an MLP maps (s_t, s_{t+1}) to a_t on consecutive dataset states, with its own Adam (the
   original steps one Adam on (diffusion + inverse dynamics) / 2: the same update up to Adam's eps).
Parity with the original, update by update and the action: tests/test_parity_decision_diffuser.py.
Acting: sample one plan from the current state with classifier-free guidance towards `target_return`,
eps = eps(null) + w_cfg (eps(R) - eps(null)), both evaluated in one batched call; the action is
inverse dynamics applied to (s_0, planned s_1). Replan at every step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cleandiff_rl.agents.acting import act_setting
from cleandiff_rl.agents.common import diffusion_model
from cleandiff_rl.agents.planning import Planner, PlannerConfig
from cleandiff_rl.nn import DiT1d, JannerUNet1d, MLPCondition
from cleandiff_rl.nn.layers import mlp
from cleandiff_rl.utils import optimizer_step


@dataclass
class DecisionDiffuserConfig(PlannerConfig):
    """Defaults: CleanDiffuser's (DiT1d, H 32, linear VP, DDIM 20 steps, initial noise x 0.5); per-task
    `target_return`, `w_cfg` and `return_scale` live in configs/task. The original uses a U-Net, H 100
    and 200 DDPM steps, which CPU budgets cannot afford. The EMA is the original's (0.995 every 10
    updates from update 2000, the PlannerConfig default): CleanDiffuser's 0.9999 every update keeps
    74% of the random initial weights after 3k updates, and such a plan model falls over at once."""

    schedule: str = "linear"
    schedule_kwargs: dict = field(default_factory=lambda: {"beta_min": 0.1, "beta_max": 20.0})
    predict: str = "eps"
    solver: str = "ddim"
    temperature: float = act_setting(0.5)
    step_temperature: float = act_setting(1.0)  # scale of each stochastic (ddpm) step's noise; the original's DDPM: 0.5
    clip_denoised: bool = False  # clamp x0 predictions to [-1, 1]: the original's, for its CDF-normalized states
    backbone: str = "dit"  # dit | unet | temporal_unet (the original's: returns embedding concatenated to time's)
    d_model: int = 320  # DiT1d
    n_heads: int = 10
    depth: int = 2
    model_dim: int = 64  # U-Net
    dim_mults: list = field(default_factory=lambda: [1, 2, 2, 2])
    next_state_weight: float = 10.0  # loss weight of s_1, the state inverse dynamics acts on
    condition_dropout: float = 0.25
    return_scale: float = 1000.0  # returns are divided by this (per task)
    target_return: float = act_setting(0.7)  # the normalized return plans are conditioned on (per task)
    w_cfg: float = act_setting(4.4)  # classifier-free guidance weight: 0 unconditional, 1 conditional, > 1 guided
    inv_hidden: int = 512
    inv_tanh: bool = True  # CleanDiffuser's Tanh on the inverse dynamics' output; the original has none
    inv_lr: float = 2e-4
    ema_rule: str = "model"  # model: the plan model's EMA, online inverse dynamics; original: see after_step


class DecisionDiffuser(Planner):
    name = "decision_diffuser"
    Config = DecisionDiffuserConfig
    plans_actions = False

    def __init__(self, obs_dim: int, act_dim: int, config: dict | DecisionDiffuserConfig | None = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        cfg = self.config
        if cfg.horizon < 2:
            raise ValueError(f"Decision Diffuser plans at least s_0 and s_1: horizon must be >= 2, got {cfg.horizon}")
        if cfg.backbone == "dit":
            backbone = DiT1d(obs_dim, cond_dim=128, d_model=cfg.d_model, n_heads=cfg.n_heads, depth=cfg.depth,
                             time_embedding="fourier")
        elif cfg.backbone == "unet":
            backbone = JannerUNet1d(obs_dim, cond_dim=128, model_dim=cfg.model_dim, dim_mults=tuple(cfg.dim_mults))
        elif cfg.backbone == "temporal_unet":
            backbone = JannerUNet1d(obs_dim, cond_dim=cfg.model_dim, model_dim=cfg.model_dim,
                                    dim_mults=tuple(cfg.dim_mults), concat_condition=True)
        else:
            raise ValueError(f"unknown backbone {cfg.backbone!r}; valid: dit, unet, temporal_unet")
        loss_weight = torch.ones(cfg.horizon, obs_dim)
        if cfg.horizon > 1:
            loss_weight[1] = cfg.next_state_weight
        if cfg.backbone == "temporal_unet":  # the original's returns MLP: 1 -> dim -> 4 dim -> dim, Mish
            condition = MLPCondition(1, cfg.model_dim, hidden_dims=(cfg.model_dim, 4 * cfg.model_dim),
                                     dropout=cfg.condition_dropout, act="mish")
        else:
            condition = MLPCondition(1, 128, hidden_dims=(128,), dropout=cfg.condition_dropout, act="silu")
        clip = {"x_min": -1.0, "x_max": 1.0} if cfg.clip_denoised else {}
        self.model = diffusion_model(cfg, backbone, condition, fix_mask=self.fix_mask(), loss_weight=loss_weight,
                                     device=self.device, **clip)
        self.inverse_dynamics = nn.Sequential(mlp(2 * obs_dim, (cfg.inv_hidden,) * 2, act_dim, "relu"),
                                              nn.Tanh() if cfg.inv_tanh else nn.Identity()).to(self.device)
        self.inv_optimizer = torch.optim.Adam(self.inverse_dynamics.parameters(), lr=cfg.inv_lr)
        if cfg.ema_rule not in ("model", "original"):
            raise ValueError(f"unknown ema_rule {cfg.ema_rule!r}; valid: model, original")
        self.inverse_dynamics_ema = (copy.deepcopy(self.inverse_dynamics).requires_grad_(False)
                                     if cfg.ema_rule == "original" else None)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self.model.optimizer, "inverse_dynamics": self.inv_optimizer}

    def after_step(self) -> None:
        """`ema_rule: model`: the plan model's EMA rule (`DiffusionModel.ema_update`). `original`: the original's
        Trainer.step_ema over the plan model and the inverse dynamics: after update k (from 0), when
        k % ema_every == 0, copy the weights while k < ema_start, else average; acting uses both EMAs."""
        cfg = self.config
        if cfg.ema_rule == "model":
            return super().after_step()
        self.updates += 1
        k, self.model.updates = self.model.updates, self.model.updates + 1
        if k % cfg.ema_every == 0:
            ema = [*self.model.model_ema.parameters(), *self.inverse_dynamics_ema.parameters()]
            online = [*self.model.model.parameters(), *self.inverse_dynamics.parameters()]
            with torch.no_grad():
                if k < cfg.ema_start:
                    torch._foreach_copy_(ema, online)
                else:
                    torch._foreach_lerp_(ema, online, 1.0 - cfg.ema_rate)

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config
        obs = batch["obs"]
        self.model.model.train()
        diffusion_loss = self.model.loss(obs, (batch["values"] / cfg.return_scale).unsqueeze(-1))
        model_grad = self.model.optimize(diffusion_loss)

        inv_loss = self.inverse_dynamics_loss(batch)
        inv_grad = optimizer_step(self.inv_optimizer, inv_loss, self.inverse_dynamics.parameters())
        return {"model/loss": diffusion_loss.detach(), "model/grad_norm": model_grad,
                "inverse_dynamics/loss": inv_loss.detach(), "inverse_dynamics/grad_norm": inv_grad}

    def inverse_dynamics_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean squared error of a_t predicted from (s_t, s_t+1), over the pairs inside an episode."""
        pairs = torch.cat([batch["obs"][:, :-1], batch["obs"][:, 1:]], -1)
        valid = batch["mask"][:, 1:]  # s_t+1 is real (padding only follows an episode's end)
        error = ((self.inverse_dynamics(pairs) - batch["act"][:, :-1]) ** 2).mean(-1)
        return (error * valid).sum() / valid.sum().clamp_min(1.0)

    def _act(self, obs: Tensor, solver: str, steps: int, generator: torch.Generator | None) -> Tensor:
        cfg = self.config
        target = obs.new_full((obs.shape[0], 1), cfg.target_return)
        plans = self.sample_plans(obs, 1, solver, steps, generator, condition_cfg=target, w_cfg=cfg.w_cfg,
                                  step_temperature=cfg.step_temperature)
        self.keep_plan(plans)
        inverse_dynamics = self.inverse_dynamics if self.inverse_dynamics_ema is None else self.inverse_dynamics_ema
        return inverse_dynamics(torch.cat([obs, plans[:, 1]], -1))
