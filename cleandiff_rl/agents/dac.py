"""Diffusion Actor-Critic (Fang et al. 2024): the actor's noise regression is steered by the Q gradient.

Per update (Fang-Lin93/DAC, agents/dac.py `DACLearner.update`):
1. Critic: an ensemble of `num_qs` (10) Q-networks regresses r + gamma (1 - terminal) V(s'), where V(s') is
   the lower confidence bound mean_h - rho * std_h over the heads of the target critics' Q, each head's Q
   averaged over `num_q_samples` (10) actions sampled from the EMA actor at s'. The loss averages the
   squared errors over heads and batch; the gradient norm is clipped at `grad_norm` (1).
2. Target critic: Polyak averaging with tau = 0.005, before the actor's step (which reads the new targets).
3. Actor (soft Q-guidance): a dataset action is noised to level t, x_t = alpha_t a + sigma_t eps, and the
   actor minimizes eta * |eps_pred - eps|^2 + mean(sigma_t * g * eps_pred), with g the gradient at x_t of the
   target critics' mean Q, divided by their mean |Q(s, a)| on the batch. Its minimizer is the noise target
   eps - sigma_t g / (2 eta): the regression target shifted along the Q gradient.
4. BC weight by dual ascent: the update's BC loss moves eta by eta_lr * clip(bc - bc_threshold, -1, 1), clipped
   to [eta_min, eta_max] (`eta_lr` 0: fixed eta). The original recomputes that loss after the actor's step but
   with the pre-step parameters (`actor`, not `new_actor`), which is this update's BC loss again.
5. The actor's EMA (0.995 every 5 updates, from update 1000); both learning rates decay by cosine to 0 over
   `lr_decay_steps` (the original: over the whole training).
Time is discrete (T = 5) as in the original: the guidance trains the levels the sampler visits.
Acting (`selection: argmax`, the paper's): 10 actions from the online actor by 5 DDPM steps, the one with the
highest mean Q of the target critics; `softmax` draws by softmax(Q / `selection_temperature`) (agents/acting.py).
Rewards are scaled by 1000 / (max - min episode return) of the dataset, as in the original (IQL's).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cleandiff_rl.agents.acting import CandidateActing, SelectionConfig, act_setting, sample_candidates
from cleandiff_rl.agents.base import Agent
from cleandiff_rl.agents.common import ACTOR_BACKBONES, DiffusionActorConfig, diffusion_model, held_ema_step
from cleandiff_rl.nn.layers import mlp
from cleandiff_rl.utils import optimizer_step, soft_update
from cleandiff_rl.utils.optim import cosine_decay_lrs

EPS = 1e-6  # the original's guard on the Q normalizer


@dataclass
class DACConfig(DiffusionActorConfig, SelectionConfig):
    """Defaults: the original's (main.py and runs.sh for locomotion); per-task rho and bc_threshold are in
    configs/task. The networks are the original's: 3 x 256 Mish MLPs, a 16-dim cosine/sine time feature
    through a 32-32 Mish MLP in the actor, Glorot-uniform weights and zero biases."""

    time: str = "discrete"
    grad_norm: float = 1.0  # max gradient norm of actor and critic (0 = no clipping)
    lr_decay_steps: int = 2_000_000  # both lrs: cosine decay to 0 over these updates (main.py max_steps); 0: off
    num_qs: int = 10  # Q heads in the ensemble
    num_q_samples: int = 10  # next actions per state averaged in the Q target
    rho: float = 1.0  # lower confidence bound: mean - rho * std over the heads
    eta: float = 1.0  # initial weight of the BC loss
    eta_lr: float = 0.001  # dual ascent step on eta (runs.sh; main.py's default 0 keeps eta fixed)
    eta_min: float = 0.001
    eta_max: float = 100.0
    bc_threshold: float = 1.0  # the BC loss eta's dual ascent holds the actor to
    discount: float = 0.99
    tau: float = 0.005  # target critic Polyak rate, every step
    critic_lr: float = 3e-4
    critic_hidden: int = 256
    scale_rewards: bool = True  # r * 1000 / (max - min episode return) (reward_tune iql_locomotion)
    ema_warmup: str = "copy"  # before ema_start the EMA copies the actor; hold: keeps the initial weights (original)
    selection: str = act_setting("argmax")  # the paper's; softmax | sample | mode | auto (agents/acting.py)
    num_candidates: int = act_setting(10)  # num_action_samples: actions sampled per state when selecting
    act_with_ema: bool = act_setting(False)  # the original samples the online actor; True: the EMA actor


def _glorot(module: nn.Module) -> nn.Module:
    """flax's Dense initialization: Glorot-uniform kernels, zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return module


class DACNoiseNet(nn.Module):
    """The original's noise predictor: concat[s, x, time_mlp(features(k))] -> 3 x (hidden + Mish) -> x_dim, with
    k = 1..T the original's step (the project's index + 1), features [cos(k f_i), sin(k f_i)] (16 dims,
    f_i = 10000^(-i / 7)) and time_mlp Linear 32 -> Mish -> Linear 32."""

    def __init__(self, x_dim: int, cond_dim: int, hidden_dim: int = 256, emb_dim: int = 16, time_hidden: int = 32):
        super().__init__()
        half = emb_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1)), persistent=False)
        self.time_mlp = _glorot(mlp(emb_dim, (time_hidden,), time_hidden, "mish"))
        self.net = _glorot(mlp(cond_dim + x_dim + time_hidden, (hidden_dim,) * 3, x_dim, "mish"))

    def forward(self, x: Tensor, t: Tensor, condition: Tensor) -> Tensor:
        f = (t + 1).to(x.dtype)[:, None] * self.freqs
        time = self.time_mlp(torch.cat([f.cos(), f.sin()], -1))
        return self.net(torch.cat([condition, x, time], -1))


class QEnsemble(nn.Module):
    """`num_qs` independent Q(s, a) MLPs (Mish) evaluated as one batched matmul per layer: Q `(num_qs, batch)`."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, num_qs: int, n_hidden: int = 3):
        super().__init__()
        dims = [obs_dim + act_dim, *[hidden] * n_hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = math.sqrt(6.0 / (d_in + d_out))  # Glorot-uniform, per head
            self.weights.append(nn.Parameter(torch.empty(num_qs, d_in, d_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.zeros(num_qs, 1, d_out)))
        self.act = nn.Mish()

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        x = torch.cat([obs, action], -1).expand(len(self.weights[0]), -1, -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = self.act(x)
        return x.squeeze(-1)


def q_guidance(critic: nn.Module, obs: Tensor, noisy: Tensor, act: Tensor) -> Tensor:
    """The gradient at the noisy action of the heads' mean Q, over their mean |Q(s, a)| on the batch (torch.func,
    so that it also runs inside a seed ensemble's vmap)."""
    with torch.enable_grad():
        grad = torch.func.grad(lambda x: critic(obs, x).mean(0).sum())(noisy)
    return grad / (critic(obs, act).abs().mean() + EPS)


class DAC(CandidateActing, Agent):
    name = "dac"
    Config = DACConfig
    ema_models = ("actor",)
    has_critics = True
    selections = ("argmax", "softmax", "sample", "mode", "auto")
    auto_selection = "argmax"
    mode_name = "actor's mode"
    decaying_lrs = {"actor": "lr", "critic": "critic_lr"}  # optimizer -> its config lr, decayed by cosine

    def __init__(self, obs_dim: int, act_dim: int, config: dict | DACConfig | None = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        cfg = self.config
        backbone = (DACNoiseNet(act_dim, obs_dim, cfg.hidden_dim) if cfg.backbone == "mlp"
                    else ACTOR_BACKBONES[cfg.backbone](cfg, act_dim, obs_dim))
        self.actor = diffusion_model(cfg, backbone, x_min=-1.0, x_max=1.0, grad_clip_norm=cfg.grad_norm or None,
                                     device=self.device)
        self.critic = QEnsemble(obs_dim, act_dim, cfg.critic_hidden, cfg.num_qs).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        if cfg.lr_decay_steps:  # tensor lrs: `after_step` decays them in place, which a captured CUDA graph also sees
            for opt, lr in ((self.actor.optimizer, cfg.lr), (self.critic_optimizer, cfg.critic_lr)):
                for group in opt.param_groups:
                    group["lr"] = torch.tensor(lr, device=self.device)
        self.register_buffer("eta", torch.tensor(float(cfg.eta), device=self.device))  # moved by dual ascent
        self.register_buffer("reward_scale", torch.ones((), device=self.device))
        self._init_acting(obs_dim)

    @classmethod
    def check_config(cls, cfg: DACConfig) -> None:
        super().check_config(cfg)
        if cfg.time != "discrete":
            raise ValueError(f"DAC trains at its T discrete noise levels (time: discrete), got time {cfg.time!r}")
        if cfg.backbone != "mlp" and cfg.backbone not in ACTOR_BACKBONES:
            raise ValueError(f"unknown backbone {cfg.backbone!r}; valid: {', '.join(ACTOR_BACKBONES)}")
        if cfg.num_qs < 2:
            raise ValueError(f"num_qs must be >= 2 (the lower confidence bound needs a spread), got {cfg.num_qs}")
        if cfg.num_q_samples < 1:
            raise ValueError(f"num_q_samples must be >= 1, got {cfg.num_q_samples}")
        if not 0 < cfg.eta_min <= cfg.eta <= cfg.eta_max:
            raise ValueError(f"DAC needs 0 < eta_min <= eta <= eta_max, got {cfg.eta_min}, {cfg.eta}, {cfg.eta_max}")
        if cfg.ema_warmup not in ("copy", "hold"):
            raise ValueError(f"unknown ema_warmup {cfg.ema_warmup!r}; valid: copy, hold")

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor.optimizer, "critic": self.critic_optimizer}

    def prepare(self, dataset) -> None:
        """Fix the reward scale from the dataset's episode returns (and the probe states), before training."""
        super().prepare(dataset)
        spread = float(dataset.episode_returns.max() - dataset.episode_returns.min())
        if self.config.scale_rewards and spread > 0:
            self.reward_scale.fill_(1000.0 / spread)

    def after_step(self) -> None:
        """The EMA (`ema_warmup: copy`: `DiffusionModel.ema_update`; `hold`: the original's rule, after update k
        (from 0) average when k > ema_start and k % ema_every == 0), then both lrs' cosine decay."""
        cfg = self.config
        if cfg.ema_warmup == "copy":
            super().after_step()
        else:
            held_ema_step(self)
        if cfg.lr_decay_steps:
            cosine_decay_lrs(self.optimizers(), cfg, self.decaying_lrs, self.updates)

    def ema_holds_average(self, n: int) -> bool:
        """`ema_warmup: hold`: whether the EMA averages after update n (from 1), i.e. k = n - 1 (from 0)."""
        return n - 1 > self.config.ema_start and (n - 1) % self.config.ema_every == 0

    def _sample(self, obs: Tensor, *, use_ema: bool) -> Tensor:
        prior = obs.new_zeros(obs.shape[0], self.act_dim)
        action, _ = self.actor.sample(prior, solver=self.config.solver, steps=self.config.sampling_steps,
                                      condition_cfg=obs, use_ema=use_ema)
        return action

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config
        obs, act, next_obs = batch["obs"], batch["act"], batch["next_obs"]
        b, n = obs.shape[0], cfg.num_q_samples
        self.actor.model.train()

        # 1. critic: lower confidence bound over the heads of the mean Q of n EMA-actor actions at s'
        with torch.no_grad():
            next_rep = next_obs.repeat_interleave(n, 0)
            next_q = self.critic_target(next_rep, self._sample(next_rep, use_ema=True)).view(-1, b, n).mean(-1)
            next_v = next_q.mean(0) - cfg.rho * next_q.std(0, correction=0)
            target = batch["rew"] * self.reward_scale + cfg.discount * (1.0 - batch["terminal"]) * next_v
        qs = self.critic(obs, act)
        critic_loss = (qs - target).square().mean()
        critic_grad = optimizer_step(self.critic_optimizer, critic_loss, self.critic.parameters(),
                                     cfg.grad_norm or None)

        # 2. target critic, before the actor reads it
        soft_update(self.critic_target, self.critic, cfg.tau)

        # 3. actor: noise regression with the target shifted by the normalized Q gradient at the noisy action
        noisy, t, eps = self.actor.add_noise(act)
        sigma = self.actor.schedule.sigma(t).to(act.dtype)[:, None]
        q_grad = q_guidance(self.critic_target, obs, noisy.detach(), act)
        net = self.actor.model["diffusion"]
        pred = net(noisy, t, obs)
        bc_loss = (pred - eps).square().mean()
        guidance_loss = (sigma * q_grad * pred).mean()
        actor_grad = self.actor.optimize(self.eta * bc_loss + guidance_loss)

        # 4. BC weight: dual ascent on this update's BC loss (the original's recomputes it with the pre-step actor)
        if cfg.eta_lr > 0:
            with torch.no_grad():
                step = cfg.eta_lr * (bc_loss - cfg.bc_threshold).clamp(-1.0, 1.0)
                self.eta.add_(step).clamp_(cfg.eta_min, cfg.eta_max)
        return {"actor/bc_loss": bc_loss.detach(), "actor/guidance_loss": guidance_loss.detach(),
                "actor/eta": self.eta.clone(), "actor/grad_norm": actor_grad, "critic/loss": critic_loss.detach(),
                "critic/grad_norm": critic_grad, "critic/q_mean": qs.detach().mean(),
                "critic/q_std": qs.detach().std(0, correction=0).mean(), "critic/target_mean": target.mean()}

    def draw(self, obs: Tensor, n: int, *, temperature: float, solver: str, steps: int,
             generator: torch.Generator | None) -> tuple[Tensor, dict]:
        """`n` actions per normalized observation from the actor (the online one unless `act_with_ema`)."""
        return sample_candidates(self.actor, obs, self.act_dim, n, solver=solver, steps=steps, temperature=temperature,
                                 use_ema=self.config.act_with_ema, generator=generator)

    def rate(self, obs_rep: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The target critics' mean Q over the heads (the original's selection score) and the first two heads."""
        qs = self.critic_target(obs_rep, actions)
        return qs.mean(0), qs[0], qs[1]
