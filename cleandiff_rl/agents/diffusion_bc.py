"""Diffusion BC: behavior cloning with a diffusion model over actions, conditioned on the state.

pi(a | s) is learned by denoising score matching on the dataset's (s, a) pairs alone, as in
Diffusion Policy (Chi et al. 2023) for low-dimensional states, and exactly the "Diffusion-BC"
baseline of the Diffusion-QL paper (Wang et al. 2023): Diffusion-QL's actor without its Q term.
Acting draws one action per state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cleandiff_rl.agents.base import Agent
from cleandiff_rl.agents.common import DiffusionActorConfig, diffusion_actor


@dataclass
class DiffusionBCConfig(DiffusionActorConfig):
    """Diffusion-QL's actor settings (see `DiffusionActorConfig`), so BC vs QL isolates the Q term."""


class DiffusionBC(Agent):
    name = "diffusion_bc"
    Config = DiffusionBCConfig
    ema_models = ("actor",)

    def __init__(self, obs_dim: int, act_dim: int, config: dict | DiffusionBCConfig | None = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        cfg = self.config
        self.actor = diffusion_actor(cfg, act_dim, obs_dim, device=self.device)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor.optimizer}

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        self.actor.model.train()
        loss = self.actor.loss(batch["act"], batch["obs"])
        return {"actor/bc_loss": loss.detach(), "actor/grad_norm": self.actor.optimize(loss)}

    def _act(self, obs: Tensor, solver: str, steps: int, generator: torch.Generator | None) -> Tensor:
        prior = obs.new_zeros(obs.shape[0], self.act_dim)
        action, self.last_sample_log = self.actor.sample(prior, solver=solver, steps=steps, condition_cfg=obs,
                                                         temperature=self.config.temperature, generator=generator)
        return action
