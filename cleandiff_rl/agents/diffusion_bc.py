"""Diffusion BC: behavior cloning with a diffusion model over actions, conditioned on the state.

pi(a | s) is learned by denoising score matching on the dataset's (s, a) pairs alone, as in
Diffusion Policy (Chi et al. 2023) for low-dimensional states, and exactly the "Diffusion-BC"
baseline of the Diffusion-QL paper (Wang et al. 2023): Diffusion-QL's actor without its Q term.
Acting draws one action per state (`selection: sample`); `selection: mode` takes one ODE sample from zero noise.

Per update: 1 + `bc_updates` denoising steps, each on a batch of its own (the original: one, the default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cleandiff_rl.agents.acting import ActingConfig, CandidateActing, act_setting, sample_candidates
from cleandiff_rl.agents.base import Agent
from cleandiff_rl.agents.common import DiffusionActorConfig, diffusion_actor


@dataclass
class DiffusionBCConfig(DiffusionActorConfig, ActingConfig):
    """Diffusion-QL's actor settings (see `DiffusionActorConfig`), so BC vs QL isolates the Q term."""

    bc_updates: int = 0  # extra denoising steps per update, each on its own batch (Diffusion-QL's `bc_updates`)
    act_with_ema: bool = act_setting(False)  # the original's Diffusion_BC samples its online actor; True: the EMA one


class DiffusionBC(CandidateActing, Agent):
    name = "diffusion_bc"
    Config = DiffusionBCConfig
    ema_models = ("actor",)
    batch_keys = ("obs", "act")
    selections = ("sample", "mode")  # no critic: nothing to rank candidates by

    def __init__(self, obs_dim: int, act_dim: int, config: dict | DiffusionBCConfig | None = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        cfg = self.config
        self.actor = diffusion_actor(cfg, act_dim, obs_dim, device=self.device)
        self._init_acting(obs_dim)

    @classmethod
    def check_config(cls, cfg: DiffusionBCConfig) -> None:
        super().check_config(cfg)
        if cfg.bc_updates < 0:
            raise ValueError(f"bc_updates must be >= 0, got {cfg.bc_updates}")

    @property
    def batches_per_step(self) -> int:
        return 1 + self.config.bc_updates

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor.optimizer}

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        self.actor.model.train()
        losses, grad_norms = [], []
        for part in self.split_batches(batch):
            loss = self.actor.loss(part["act"], part["obs"])
            grad_norms.append(self.actor.optimize(loss))
            losses.append(loss.detach())
        return {"actor/bc_loss": torch.stack(losses).mean(), "actor/grad_norm": torch.stack(grad_norms).mean()}

    def draw(self, obs: Tensor, n: int, *, temperature: float, solver: str, steps: int,
             generator: torch.Generator | None) -> tuple[Tensor, dict]:
        """`n` actions per normalized observation from the actor (the online one unless `act_with_ema`)."""
        return sample_candidates(self.actor, obs, self.act_dim, n, solver=solver, steps=steps, temperature=temperature,
                                 use_ema=self.config.act_with_ema, generator=generator)
