"""Plain behavior cloning: an MLP regressing dataset actions (the non-diffusion baseline).

3 x 256 ReLU layers with a tanh output, trained by MSE with Adam 3e-4 (the "BC" row of D4RL-era
papers, e.g. TD3+BC's codebase). It is deterministic, so it has no solver or steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cleandiff_rl.agents.base import Agent
from cleandiff_rl.nn.layers import mlp
from cleandiff_rl.utils import optimizer_step


@dataclass
class BCConfig:
    hidden_dim: int = 256
    n_layers: int = 3
    lr: float = 3e-4


class BC(Agent):
    name = "bc"
    Config = BCConfig
    is_diffusion = False
    batch_keys = ("obs", "act")

    def __init__(self, obs_dim: int, act_dim: int, config: dict | BCConfig | None = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        cfg = self.config
        self.net = nn.Sequential(mlp(obs_dim, (cfg.hidden_dim,) * cfg.n_layers, act_dim, "relu"), nn.Tanh()).to(self.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.optimizer}

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        loss = F.mse_loss(self.net(batch["obs"]), batch["act"])
        grad_norm = optimizer_step(self.optimizer, loss, self.net.parameters())
        return {"actor/bc_loss": loss.detach(), "actor/grad_norm": grad_norm}

    def _act(self, obs: Tensor, solver: str | None, steps: int | None, generator: torch.Generator | None) -> Tensor:
        return self.net(obs)
