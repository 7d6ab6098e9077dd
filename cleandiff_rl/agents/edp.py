"""Efficient Diffusion Policies (Kang, Ma, Du, Pang & Yan, NeurIPS 2023): Diffusion-QL without backpropagating
through the sampler.

Per update (sail-sg/edp, diffusion/dql.py `_train_step_td3`; `loss_type: iql` is `_train_step_iql`):
1. Critic target: r + gamma (1 - terminal) min(Q1', Q2')(s', a'), a' sampled at s' from the target policy
   (the actor's EMA) by the configured solver, Q' the target critics.
2. Action approximation: a dataset action is noised to a random level t, x_t = alpha_t a + sigma_t eps, and one
   network call predicts the clean action a0_hat (from the eps prediction, (x_t - sigma_t eps_hat) / alpha_t),
   clipped to [-1, 1]. The denoising loss of that same call is the BC term.
3. Policy (`loss_type: td3`, the paper's default): L = L_diff - (alpha / mean|Q_i|) Q_i(s, a0_hat), one critic i
   drawn at random per update, normalized by its own detached batch mean |Q_i|, alpha = 2.
   `loss_type: iql`: V(s) regresses min(Q1', Q2')(s, a) by expectile regression; the policy term is the
   advantage-weighted log-likelihood of the dataset action under N(a0_hat, I), weights
   min(exp(awr_temperature (Q' - V)), 100); the critics regress r + gamma (1 - terminal) V(s') instead of step 1.
4. Steps: the critic and policy losses read the networks before either steps (the original takes both gradients
   first); each network's gradient is clipped to `grad_norm` separately (Q1, Q2 and the actor each have an
   optax chain in the original).
5. Targets: the critics track with tau = 0.005 every update; the target policy is the actor's EMA (0.995 every
   5 updates after update 1000; `ema_warmup: hold` keeps its initial weights until then, as the original).
Time is continuous (the VP SDE with beta 0.1 to 20, of which the original's 100-step 'linear' table is a
discretization), so any solver samples the policy at any number of steps: the target actions and acting use
`solver` / `sampling_steps`.
Acting (`selection: softmax`, the original's `ensemble` act): 50 actions per state from the online actor, one
drawn with probability softmax(min(Q1, Q2)) of the online critics; any rule of agents/acting.py is opt-in.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from cleandiff_rl.agents.acting import CandidateActing, SelectionConfig, act_setting, sample_candidates
from cleandiff_rl.agents.base import Agent
from cleandiff_rl.agents.common import DiffusionActorConfig, TwinQ, diffusion_actor, held_ema_step
from cleandiff_rl.nn.layers import mlp
from cleandiff_rl.utils import optimizer_step, soft_update

LOSS_TYPES = ("td3", "iql")


@dataclass
class EDPConfig(DiffusionActorConfig, SelectionConfig):
    """Defaults: the original's (diffusion/dql.py get_default_config, trainer.py flags), except that time is
    continuous and sampling takes the README's fast setting (DPM-Solver, 15 steps) in place of the code's default
    100-step DDPM; the per-task grad_norm (hps.py, DQL's values) is in configs/task."""

    schedule_kwargs: dict = field(default_factory=lambda: {"beta_min": 0.1, "beta_max": 20.0})
    diffusion_steps: int = 100  # time: discrete only (the original's num_timesteps)
    solver: str = "ode_dpmsolver_2M"  # the README's dpm sampler (the original's is single-step order 3)
    sampling_steps: int = 15  # the original's dpm_steps: target actions and acting
    loss_type: str = "td3"  # td3: alpha-weighted Q term (the paper's); iql: advantage-weighted likelihood
    alpha: float = 2.0  # td3: weight of the normalized Q term
    expectile: float = 0.7  # iql: the value's expectile
    awr_temperature: float = 3.0  # iql: inverse temperature of the advantage weights
    grad_norm: float = 9.0  # max gradient norm of the actor and of each critic (0 = no clipping)
    discount: float = 0.99
    tau: float = 0.005  # target critic Polyak rate, every step
    critic_lr: float = 3e-4
    critic_hidden: int = 256
    selection: str = act_setting("softmax")  # the original's; sample | mode | argmax | auto (agents/acting.py)
    num_candidates: int = act_setting(50)  # actions sampled per state when selecting
    act_with_ema: bool = act_setting(False)  # the original samples the online actor
    ema_warmup: str = "copy"  # before ema_start the EMA copies the actor; hold: keeps its initial weights (the original's)


class EDP(CandidateActing, Agent):
    name = "edp"
    has_critics = True
    Config = EDPConfig
    ema_models = ("actor",)
    selections = ("softmax", "sample", "mode", "argmax", "auto")
    auto_selection = "softmax"
    mode_name = "actor's mode"

    def __init__(self, obs_dim: int, act_dim: int, config: dict | EDPConfig | None = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        cfg = self.config
        self.actor = diffusion_actor(cfg, act_dim, obs_dim, grad_clip_norm=cfg.grad_norm or None, device=self.device)
        hidden = (cfg.critic_hidden,) * 3
        self.critic = TwinQ(obs_dim, act_dim, hidden, act="mish").to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        # one optimizer per critic: the original clips each critic's gradient norm on its own
        self.q1_optimizer = torch.optim.Adam(self.critic.q1.parameters(), lr=cfg.critic_lr)
        self.q2_optimizer = torch.optim.Adam(self.critic.q2.parameters(), lr=cfg.critic_lr)
        if cfg.loss_type == "iql":
            self.value = mlp(obs_dim, hidden, 1, "mish").to(self.device)
            self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=cfg.critic_lr)
        self._init_acting(obs_dim)

    @classmethod
    def check_config(cls, cfg: EDPConfig) -> None:
        super().check_config(cfg)
        if cfg.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {cfg.loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if cfg.predict not in ("eps", "x0"):
            raise ValueError(f"EDP approximates the action from an eps or x0 prediction, got predict {cfg.predict!r}")
        if cfg.ema_warmup not in ("copy", "hold"):
            raise ValueError(f"unknown ema_warmup {cfg.ema_warmup!r}; valid: copy, hold")

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {"actor": self.actor.optimizer, "q1": self.q1_optimizer, "q2": self.q2_optimizer}
        if self.config.loss_type == "iql":
            opts["value"] = self.value_optimizer
        return opts

    def after_step(self) -> None:
        """`ema_warmup: copy`: every DiffusionModel's EMA rule (`ema_update`). `hold`: the original's target policy
        (dql.py `train`): after update n (from 1) it averages when n > ema_start and n % ema_every == 0, and keeps
        its initial weights before."""
        if self.config.ema_warmup == "copy":
            return super().after_step()
        held_ema_step(self)

    def ema_holds_average(self, n: int) -> bool:
        """`ema_warmup: hold`: whether the EMA averages after update n (from 1)."""
        return n > self.config.ema_start and n % self.config.ema_every == 0

    def _critic_step(self, q1: Tensor, q2: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each critic's MSE to `target`, one step each with its own clipping: (loss Q1 + Q2, both grad norms)."""
        clip = self.config.grad_norm or None
        loss1, loss2 = F.mse_loss(q1, target), F.mse_loss(q2, target)
        grad1 = optimizer_step(self.q1_optimizer, loss1, self.critic.q1.parameters(), clip)
        grad2 = optimizer_step(self.q2_optimizer, loss2, self.critic.q2.parameters(), clip)
        return loss1 + loss2, grad1, grad2

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config
        obs, act, next_obs = batch["obs"], batch["act"], batch["next_obs"]
        not_done = cfg.discount * (1.0 - batch["terminal"])
        self.actor.model.train()

        # 1. critic target (td3): the next action from the target policy, min of the target critics
        if cfg.loss_type == "td3":
            with torch.no_grad():
                prior = next_obs.new_zeros(next_obs.shape[0], self.act_dim)
                next_act, _ = self.actor.sample(prior, solver=cfg.solver, steps=cfg.sampling_steps,
                                                condition_cfg=next_obs, use_ema=True)
                target = batch["rew"] + not_done * self.critic_target.q_min(next_obs, next_act)
            q1, q2 = self.critic(obs, act)

        # 2. action approximation: noise the dataset action to a random level, predict the clean one in one call
        x_t, t, eps = self.actor.add_noise(act)
        out = self.actor.model["diffusion"](x_t, t, obs)
        diff_loss = F.mse_loss(out, eps if cfg.predict == "eps" else act)
        if cfg.predict == "eps":
            schedule = self.actor.schedule
            alpha, sigma = schedule.alpha(t).to(act.dtype)[:, None], schedule.sigma(t).to(act.dtype)[:, None]
            a0 = (x_t - sigma * out) / alpha
        else:
            a0 = out
        a0 = a0.clamp(-1.0, 1.0)

        # 3. policy loss on the approximated action, from the critics before their step
        metrics: dict[str, Tensor] = {}
        if cfg.loss_type == "td3":
            self.critic.requires_grad_(False)  # the Q term trains the actor only
            q1_pi, q2_pi = self.critic(obs, a0)
            self.critic.requires_grad_(True)
            flip = torch.randint(2, (), device=self.device).float()  # which critic guides (the original's coin)
            q_pi = torch.lerp(q1_pi, q2_pi, flip)
            guide_loss = -cfg.alpha * q_pi.mean() / q_pi.abs().mean().detach()
        else:
            # 3a. value: expectile regression of V(s) on the target critics' min Q(s, a), then one step
            with torch.no_grad():
                q_data = self.critic_target.q_min(obs, act)
            diff = q_data - self.value(obs).squeeze(-1)
            weight = torch.where(diff > 0, cfg.expectile, 1.0 - cfg.expectile)
            value_loss = (weight * diff.square()).mean()
            value_grad = optimizer_step(self.value_optimizer, value_loss, self.value.parameters(), cfg.grad_norm or None)
            # 3b. advantage-weighted log N(a; a0_hat, I) with the updated V
            with torch.no_grad():
                v = self.value(obs).squeeze(-1)
                weights = torch.exp((q_data - v) * cfg.awr_temperature).clamp(max=100.0)
                target = batch["rew"] + not_done * self.value(next_obs).squeeze(-1)
            log_prob = -0.5 * (act - a0).square().sum(-1) - 0.5 * self.act_dim * math.log(2 * math.pi)
            guide_loss = -(weights * log_prob).mean()
            q1, q2 = self.critic(obs, act)
            metrics = {"value/loss": value_loss.detach(), "value/grad_norm": value_grad, "value/v_mean": v.mean()}

        # 4. one step each: the policy, then the critics (both losses read the pre-step networks)
        actor_grad = self.actor.optimize(diff_loss + guide_loss)
        critic_loss, q1_grad, q2_grad = self._critic_step(q1, q2, target)

        # 5. target critics (the target policy is the actor's EMA, `after_step`)
        soft_update(self.critic_target, self.critic, cfg.tau)
        return {"actor/bc_loss": diff_loss.detach(), "actor/q_loss": guide_loss.detach(), "actor/grad_norm": actor_grad,
                "critic/loss": critic_loss.detach(), "critic/grad_norm": torch.hypot(q1_grad, q2_grad),
                "critic/q_mean": q1.detach().mean(), "critic/target_mean": target.mean(), **metrics}

    def draw(self, obs: Tensor, n: int, *, temperature: float, solver: str, steps: int,
             generator: torch.Generator | None) -> tuple[Tensor, dict]:
        """`n` actions per normalized observation from the actor (the online one unless `act_with_ema`)."""
        return sample_candidates(self.actor, obs, self.act_dim, n, solver=solver, steps=steps, temperature=temperature,
                                 use_ema=self.config.act_with_ema, generator=generator)

    def rate(self, obs_rep: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The online critics' min Q (the original's selection score: its act reads the trained parameters)."""
        q1, q2 = self.critic(obs_rep, actions)
        return torch.minimum(q1, q2), q1, q2
