"""IDQL (Hansen-Estruch et al. 2023): IQL critics + a diffusion behavior model, combined at act time.

Per update (philippe-eecs/IDQL, jaxrl5/agents/ddpm_iql_simple/ddpm_iql_learner.py), repeated
`critic_updates` times on batches of their own for steps 1-2:
1. Value: V(s) fits the tau-expectile (tau = 0.7) of min(Q1', Q2')(s, a) over dataset actions.
2. Critic: twin Q regress r * reward_scale + gamma (1 - terminal) V(s'); targets track with 0.005.
3. Behavior: a diffusion model (IDQL's LN-ResNet) learns pi_beta(a | s) by plain denoising; it
   never sees Q, so actor and critic train independently, and each gets its own budget: a value +
   critic update costs about a quarter of a behavior-model update on one CPU core, so
   `critic_updates > 1` buys more critic updates for less than their share of time (the original: 1).
Acting (`selection: argmax`, the released code's evaluation): sample `num_candidates` (64) actions from
the EMA behavior model and take the one with the highest min Q of the target critics. `expectile` resamples
by the expectile weights (the paper's implicit policy, `expectile_weights`); every rule of agents/acting.py
is opt-in.
Rewards are scaled by 1000 / (max - min episode return) of the dataset, as in the original.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cleandiff_rl.agents.acting import CandidateActing, SelectionConfig, act_setting, sample_candidates
from cleandiff_rl.agents.base import Agent
from cleandiff_rl.agents.common import DiffusionActorConfig, TwinQ, diffusion_actor
from cleandiff_rl.nn.layers import mlp
from cleandiff_rl.utils import optimizer_step, soft_update
from cleandiff_rl.utils.optim import cosine_decay_lrs


@dataclass
class IDQLConfig(DiffusionActorConfig, SelectionConfig):
    """Defaults: the original's (launcher train_ddpm_iql_offline.py); see `DiffusionActorConfig`."""

    weight_decay: float = 1e-4  # optax adamw default
    lr_decay_steps: int = 3_000_000  # actor lr: cosine decay to 0 over these updates (optax's); 0: constant
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
    selection: str = act_setting("argmax")  # the released code's; sample | mode | softmax | expectile | auto
    num_candidates: int = act_setting(64)  # the launcher's N at training-time evaluation


def expectile_weights(advantage: Tensor, expectile: float) -> Tensor:
    """IDQL's implicit-policy weights for the expectile critic: tau where Q > V, 1 - tau elsewhere.

    The paper's w(s, a) = |f'(A)| / |A| for the critic loss f; the expectile loss f(A) = |tau - 1(A < 0)| A^2
    makes that 2 |tau - 1(A < 0)|, whatever the size of A (ddpm_iql_learner.py `sample_implicit_policy`).
    """
    return torch.where(advantage > 0, expectile, 1.0 - expectile)


class IDQL(CandidateActing, Agent):
    name = "idql"
    has_critics = True
    Config = IDQLConfig
    ema_models = ("actor",)
    selections = ("argmax", "sample", "mode", "softmax", "expectile", "auto")
    auto_selection = "argmax"
    mode_name = "behavior mode"
    decaying_lrs = {"actor": "lr"}  # optimizer -> its config lr, decayed by cosine (`after_step`)

    def __init__(self, obs_dim: int, act_dim: int, config: dict | IDQLConfig | None = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        cfg = self.config
        self.actor = diffusion_actor(cfg, act_dim, obs_dim, device=self.device)
        if cfg.lr_decay_steps:  # a tensor lr: `after_step` decays it in place, which a captured CUDA graph also sees
            for group in self.actor.optimizer.param_groups:
                group["lr"] = torch.tensor(cfg.lr, device=self.device)
        hidden = (cfg.critic_hidden,) * 2
        self.critic = TwinQ(obs_dim, act_dim, hidden, act="relu").to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        value_norm = nn.LayerNorm(obs_dim, eps=1e-6)  # on the input only; flax's eps
        self.value = nn.Sequential(value_norm, mlp(obs_dim, hidden, 1, "relu")).to(self.device)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=cfg.critic_lr)
        self.register_buffer("reward_scale", torch.ones((), device=self.device))
        self._init_acting(obs_dim)

    @classmethod
    def check_config(cls, cfg: IDQLConfig) -> None:
        super().check_config(cfg)
        if cfg.critic_updates < 1:
            raise ValueError(f"critic_updates must be >= 1, got {cfg.critic_updates}")

    def after_step(self) -> None:
        """The base bookkeeping (EMA), then the actor's next lr: lr (1 + cos(pi k / D)) / 2 after k updates."""
        super().after_step()
        if self.config.lr_decay_steps:
            cosine_decay_lrs(self.optimizers(), self.config, self.decaying_lrs, self.updates)

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
            critic_loss = (F.mse_loss(q1, target) + F.mse_loss(q2, target)) / 2  # the mean over both heads, as the original
            optimizer_step(self.critic_optimizer, critic_loss, self.critic.parameters())
            soft_update(self.critic_target, self.critic, cfg.tau)

        # 3. behavior model: denoising only, on the first batch
        obs, act = chunks[0]["obs"], chunks[0]["act"]
        self.actor.model.train()
        bc_loss = self.actor.loss(act, obs)
        actor_grad = self.actor.optimize(bc_loss)
        return {"actor/bc_loss": bc_loss.detach(), "actor/grad_norm": actor_grad, "value/loss": value_loss.detach(),
                "value/v_mean": v.detach().mean(), "critic/loss": critic_loss.detach(), "critic/q_mean": q1.detach().mean()}

    def draw(self, obs: Tensor, n: int, *, temperature: float, solver: str, steps: int,
             generator: torch.Generator | None) -> tuple[Tensor, dict]:
        """`n` actions per normalized observation from the EMA behavior model."""
        return sample_candidates(self.actor, obs, self.act_dim, n, solver=solver, steps=steps, temperature=temperature,
                                 generator=generator)

    def rate(self, obs_rep: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The target critics' min Q (the released code's argmax score) and both target critics' Q."""
        q1, q2 = self.critic_target(obs_rep, actions)
        return torch.minimum(q1, q2), q1, q2

    def implicit_weights(self, obs_rep: Tensor, score: Tensor) -> Tensor:
        """`selection: expectile`: the implicit policy's weights of the advantage Q - V."""
        return expectile_weights(score - self.value(obs_rep).squeeze(-1), self.config.expectile)
