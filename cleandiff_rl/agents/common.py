"""Pieces two or more algorithms share: config -> DiffusionModel, twin critics (acting: agents/acting.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cleandiff_rl.agents.acting import act_setting
from cleandiff_rl.diffusion import DiffusionModel
from cleandiff_rl.nn import DQLMlp, IDQLMlp
from cleandiff_rl.nn.layers import mlp

if TYPE_CHECKING:
    from cleandiff_rl.agents.planning import PlannerConfig


@dataclass
class DiffusionConfig:
    """Settings of a diffusion (or flow) model over actions conditioned on the (normalized) observation.

    The defaults are Diffusion-QL's actor (Wang et al. 2023): eps prediction on the VP SDE with
    beta_min 0.1, beta_max 10, sampled by DDPM in 5 steps with x0 clipped to the action box. The
    original discretizes time into T = 5 levels. Here time is continuous by default
    (`time: continuous`). Its 5-step uniform grid hits exactly the original's 5 noise levels, and
    the same network can also be sampled at 1, 2, 10 or 20 steps by any solver. `time: discrete`
    with `diffusion_steps: 5` gives the original's training exactly, and then at most 5 sampling
    steps. Diffusion-QL uses it, because its Q loss must meet the BC loss at the sampled levels.
    """

    time: str = "continuous"
    schedule: str = "linear"
    diffusion_steps: int = 5
    schedule_kwargs: dict = field(default_factory=lambda: {"beta_min": 0.1, "beta_max": 10.0})
    predict: str = "eps"
    solver: str = "ddpm"
    sampling_steps: int = 5
    temperature: float = act_setting(1.0)  # acting: scale of the initial noise (see `Agent.set_sampling`)
    hidden_dim: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.0
    ema_rate: float = 0.995
    ema_every: int = 5
    ema_start: int = 1000


@dataclass
class DiffusionActorConfig(DiffusionConfig):
    """A `DiffusionConfig` whose denoiser is one of `ACTOR_BACKBONES` (`diffusion_actor`)."""

    backbone: str = "mlp"  # mlp: Diffusion-QL's 3 x hidden_dim Mish MLP; resnet: IDQL's LN-ResNet (see ACTOR_BACKBONES)
    n_blocks: int = 3  # resnet: residual blocks
    dropout: float = 0.1  # resnet: dropout in each block


def diffusion_model(cfg: DiffusionConfig | PlannerConfig, backbone: nn.Module,
                    nn_condition: nn.Module | None = None, *, device: torch.device, **options: Any) -> DiffusionModel:
    """The `DiffusionModel` around `backbone` with the diffusion, optimizer and EMA settings of `cfg`.

    The one place an agent's config becomes a model, so every algorithm reads its settings the same way;
    `options` are the model's algorithm-specific arguments (fix_mask, loss_weight, classifier, x_min, ...).
    """
    return DiffusionModel(backbone, nn_condition, time=cfg.time, schedule=cfg.schedule,
                          diffusion_steps=cfg.diffusion_steps, schedule_kwargs=dict(cfg.schedule_kwargs),
                          predict=cfg.predict, lr=cfg.lr, weight_decay=cfg.weight_decay, ema_rate=cfg.ema_rate,
                          ema_every=cfg.ema_every, ema_start=cfg.ema_start, device=device, **options)


# The denoisers an action model can use (`DiffusionActorConfig.backbone`); the LN-ResNet fits medium-expert
# data better at a CPU budget, at 6-7x the MLP's time per update.
ACTOR_BACKBONES = {
    "mlp": lambda cfg, act_dim, obs_dim: DQLMlp(act_dim, obs_dim, hidden_dim=cfg.hidden_dim),
    "resnet": lambda cfg, act_dim, obs_dim: IDQLMlp(act_dim, obs_dim, hidden_dim=cfg.hidden_dim,
                                                    n_blocks=cfg.n_blocks, dropout=cfg.dropout),
}


def diffusion_actor(cfg: DiffusionActorConfig, act_dim: int, obs_dim: int, *, grad_clip_norm: float | None = None,
                    device: torch.device) -> DiffusionModel:
    """The `DiffusionModel` over actions in [-1, 1], conditioned on the observation, that `cfg` describes
    (its `backbone` one of `ACTOR_BACKBONES`)."""
    if cfg.backbone not in ACTOR_BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; valid: {', '.join(ACTOR_BACKBONES)}")
    backbone = ACTOR_BACKBONES[cfg.backbone](cfg, act_dim, obs_dim)
    return diffusion_model(cfg, backbone, x_min=-1.0, x_max=1.0, grad_clip_norm=grad_clip_norm, device=device)


def held_ema_step(agent: Any) -> None:
    """`ema_warmup: hold` bookkeeping after an update: count it, and average the actor's EMA where the agent's
    original rule (`agent.ema_holds_average(n)`, n counted from 1) says; before that the EMA keeps its weights."""
    agent.updates += 1
    agent.actor.updates += 1
    if agent.ema_holds_average(agent.actor.updates):
        with torch.no_grad():
            torch._foreach_lerp_(list(agent.actor.model_ema.parameters()), list(agent.actor.model.parameters()),
                                 1.0 - agent.config.ema_rate)


class TwinQ(nn.Module):
    """Two independent Q(s, a) MLPs (clipped double Q)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (256, 256, 256), act: str = "mish",
                 layer_norm: bool | str = False):  # True: LayerNorm before the activation, "post": after (see `mlp`)
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, hidden_dims, 1, act, layer_norm)
        self.q2 = mlp(obs_dim + act_dim, hidden_dims, 1, act, layer_norm)

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([obs, action], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def q_min(self, obs: Tensor, action: Tensor) -> Tensor:
        return torch.minimum(*self(obs, action))
