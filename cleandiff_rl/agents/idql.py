"""IDQL (Hansen-Estruch et al. 2023): IQL critics + a diffusion behavior model, combined at act time.

Per update (philippe-eecs/IDQL, jaxrl5/agents/ddpm_iql_simple/ddpm_iql_learner.py), repeated
`critic_updates` times on batches of their own for steps 1-2:
1. Value: V(s) fits the tau-expectile (tau = 0.7) of min(Q1', Q2')(s, a) over dataset actions.
2. Critic: twin Q regress r * reward_scale + gamma (1 - terminal) V(s'); targets track with 0.005.
3. Behavior: a diffusion model (IDQL's LN-ResNet) learns pi_beta(a | s) by plain denoising; it
   never sees Q, so actor and critic train independently, and each gets its own budget: a value +
   critic update costs about a quarter of a behavior-model update on one CPU core, so
   `critic_updates > 1` buys more critic updates for less than their share of time (the original: 1).
Acting (`selection: auto`, the default): act by argmax Q only where the critic can rank a state's
candidates, else at the behavior model's mode; `rank_ratio` (agents/common.py `RankedCandidates`)
measures it once per set of weights on 256 dataset states fixed before training, with the target
critics' min Q as the score.
- ratio > `rank_threshold` (0.75): sample `num_candidates` actions from the EMA behavior model and take
  the one with the highest min Q (`selection: argmax`, the released code's evaluation). On
  medium-replay this scores 3-8x BC.
- else: one sample from zero noise (temperature 0) with an ODE solver (the one asked for; DDIM in place of
  a stochastic one), the behavior model's mode. Where the critic's
  ranking of a state's actions is noise (hopper medium and medium-expert: ratio 0.46 and 0.45,
  medium-replay 1.47), argmax lost 6 and 32 points to the mode (README).
An agent without probe states (`prepare` never ran) acts by argmax. `selection: mode` always acts at the
mode. On medium-expert `auto` took the mode on every build (ratios 0.45-0.63), and there the mode and the
argmax of 64 each lost 9-40 points on some build; the medium-expert tasks act by the argmax of 4
(configs/algo/idql.yaml), which beat the mode and BC on every build measured.
`selection: expectile` resamples with the expectile weights (the paper's; see `expectile_weights`);
`argmax` and `softmax` always select among the candidates.
Rewards are scaled by 1000 / (max - min episode return) of the dataset, as in the original.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cleandiff_rl.agents.base import Agent
from cleandiff_rl.agents.common import (
    SELECTIONS,
    DiffusionActorConfig,
    RANK_THRESHOLD,
    RankedCandidates,
    TwinQ,
    diffusion_actor,
    sample_candidates,
)
from cleandiff_rl.nn.layers import mlp
from cleandiff_rl.utils import optimizer_step, soft_update


@dataclass
class IDQLConfig(DiffusionActorConfig):
    """Defaults: the original's (launcher train_ddpm_iql_offline.py); see `DiffusionActorConfig`."""

    weight_decay: float = 1e-4  # optax adamw default
    ema_rate: float = 0.999  # actor_tau 0.001 every step from step 0
    ema_every: int = 1
    ema_start: int = 0
    backbone: str = "resnet"  # the LN-ResNet (n_blocks 3, dropout 0.1)
    expectile: float = 0.7
    discount: float = 0.99
    tau: float = 0.005
    critic_lr: float = 3e-4
    critic_hidden: int = 256
    critic_updates: int = 1  # value + critic updates per behavior-model update, each on its own batch
    scale_rewards: bool = True  # r * 1000 / (max - min episode return)
    num_candidates: int = 64
    selection: str = "auto"  # argmax where the critic ranks candidates, else the mode; mode | argmax | expectile | softmax
    selection_temperature: float = 1.0  # used by softmax only
    rank_threshold: float = RANK_THRESHOLD  # auto: argmax when `rank_ratio` exceeds this


def expectile_weights(advantage: Tensor, expectile: float) -> Tensor:
    """IDQL's implicit-policy weights for the expectile critic: tau where Q > V, 1 - tau elsewhere.

    The paper's w(s, a) = |f'(A)| / |A| for the critic loss f; the expectile loss f(A) = |tau - 1(A < 0)| A^2
    makes that 2 |tau - 1(A < 0)|, whatever the size of A (ddpm_iql_learner.py `sample_implicit_policy`).
    """
    return torch.where(advantage > 0, expectile, 1.0 - expectile)


class IDQL(RankedCandidates, Agent):
    name = "idql"
    Config = IDQLConfig
    ema_models = ("actor",)
    auto_selection = "argmax"  # the released code's evaluation
    selections = SELECTIONS
    mode_name = "behavior mode"

    def __init__(self, obs_dim: int, act_dim: int, config: dict | IDQLConfig | None = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        cfg = self.config
        self.actor = diffusion_actor(cfg, act_dim, obs_dim, device=self.device)
        hidden = (cfg.critic_hidden,) * 2
        self.critic = TwinQ(obs_dim, act_dim, hidden, act="relu").to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.value = nn.Sequential(nn.LayerNorm(obs_dim), mlp(obs_dim, hidden, 1, "relu")).to(self.device)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=cfg.critic_lr)
        self.register_buffer("reward_scale", torch.ones((), device=self.device))
        self._init_probes(obs_dim)

    @classmethod
    def check_config(cls, cfg: IDQLConfig) -> None:
        cls.check_selection(cfg.selection)
        if cfg.critic_updates < 1:
            raise ValueError(f"critic_updates must be >= 1, got {cfg.critic_updates}")

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor.optimizer, "critic": self.critic_optimizer, "value": self.value_optimizer}

    @property
    def batches_per_step(self) -> int:
        return self.config.critic_updates

    def prepare(self, dataset) -> None:
        """Fix the reward scale from the dataset's episode returns (and the probe states), before training."""
        super().prepare(dataset)
        returns = dataset.episode_returns
        spread = float(returns.max() - returns.min())
        if self.config.scale_rewards and spread > 0:
            self.reward_scale.fill_(1000.0 / spread)

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config
        chunks = self.split_batches(batch)
        for part in chunks:
            obs, act = part["obs"], part["act"]

            # 1. value: expectile regression onto the target critic
            with torch.no_grad():
                q_target = self.critic_target.q_min(obs, act)
            v = self.value(obs).squeeze(-1)
            diff = q_target - v
            value_loss = (torch.abs(cfg.expectile - (diff < 0).float()) * diff**2).mean()
            optimizer_step(self.value_optimizer, value_loss, self.value.parameters())

            # 2. critic: one-step TD onto V(s')
            with torch.no_grad():
                next_v = self.value(part["next_obs"]).squeeze(-1)
                target = part["rew"] * self.reward_scale + cfg.discount * (1.0 - part["terminal"]) * next_v
            q1, q2 = self.critic(obs, act)
            critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
            optimizer_step(self.critic_optimizer, critic_loss, self.critic.parameters())
            soft_update(self.critic_target, self.critic, cfg.tau)

        # 3. behavior model: denoising only, on the first batch
        obs, act = chunks[0]["obs"], chunks[0]["act"]
        self.actor.model.train()
        bc_loss = self.actor.loss(act, obs)
        actor_grad = self.actor.optimize(bc_loss)
        return {"actor/bc_loss": bc_loss.detach(), "actor/grad_norm": actor_grad, "value/loss": value_loss.detach(),
                "value/v_mean": v.detach().mean(), "critic/loss": critic_loss.detach(), "critic/q_mean": q1.detach().mean()}

    def candidates(self, obs: Tensor, solver: str, steps: int,
                   generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """The act-time candidates for normalized observations `(b, obs_dim)` and how the critic rates them:
        obs repeated `(b * n, obs_dim)`, actions `(b * n, act_dim)` from the EMA behavior model and their
        target-critic min Q `(b * n,)`."""
        cfg = self.config
        obs_rep, actions, self.last_sample_log = sample_candidates(
            self.actor, obs, self.act_dim, cfg.num_candidates, solver=solver, steps=steps, temperature=cfg.temperature,
            generator=generator)
        return obs_rep, actions, self.critic_target.q_min(obs_rep, actions)

    def _selection_scores(self, obs_rep: Tensor, q: Tensor) -> Tensor:
        """Q, or with `selection: expectile` the implicit policy's weights of the advantage Q - V."""
        if self.config.selection != "expectile":
            return q
        return expectile_weights(q - self.value(obs_rep).squeeze(-1), self.config.expectile)
