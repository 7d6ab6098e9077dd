"""Diffusion-QL (Wang, Hunt & Zhou, ICLR 2023): a diffusion actor trained with BC plus Q-learning.

Per update (Zhendong-Wang/Diffusion-Policies-for-Offline-RL, agents/ql_diffusion.py):
1. Critic: twin Q-networks regress r + gamma (1 - terminal) min(Q1', Q2')(s', a'), where a' is
   sampled from the EMA actor at s' and Q' are the target networks.
2. Actor: L = L_bc + eta * L_q, where L_bc is the denoising loss on dataset actions and
   L_q = -Q_i(s, a_pi) / mean|Q_j(s, a_pi)| (i random, j the other, the denominator detached)
   with a_pi sampled from the online actor *with gradients through every sampling step*.
3. Both gradient norms are clipped at the per-task `grad_norm`; targets track the critic with
   tau = 0.005 every step; the actor's EMA (0.995) updates every 5 steps from step 1000 (copying the actor
   before; `ema_warmup: hold` keeps the initial weights until then, as the original, see `after_step`).
4. `bc_updates` > 0 (the original: 0) adds that many denoising-only actor steps, each on a batch of its own:
   they cost no sampling chain (a tenth of an update each on the MLP), and the actor's BC loss is what the
   updates of a CPU budget leave unfitted on medium-expert data.
The critics are the original's 3 x 256 Mish MLPs; `critic_layer_norm` adds LayerNorm after each hidden
layer (CleanDiffuser's DQLCritic), which bounds Q far from the data (opt-in).
Acting (`selection: softmax`, the original's): sample 50 actions per state from the online actor and draw
one with probability softmax(min Q of the target critics); any rule of agents/acting.py is opt-in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cleandiff_rl.agents.acting import CandidateActing, SelectionConfig, act_setting, sample_candidates
from cleandiff_rl.agents.base import Agent
from cleandiff_rl.agents.common import DiffusionActorConfig, TwinQ, diffusion_actor, held_ema_step
from cleandiff_rl.utils import optimizer_step, soft_update


@dataclass
class DiffusionQLConfig(DiffusionActorConfig, SelectionConfig):
    """Defaults: the original's (main.py, hopper-medium); per-task eta and grad_norm (main.py's) are in
    configs/task.

    Time is discrete (T = 5), as in the original, and this matters: the Q term trains the network only
    at the times the sampler visits. With continuous time the BC loss almost never samples those exact
    times, so the Q term is free to rewrite the network there and drives every action to a corner of
    the box (measured: hopper-medium score 6 at 5 steps, 39 at 4 steps from the same checkpoint). With
    T = 5 the BC loss trains exactly the sampled levels. Sampling then takes 1 to 5 steps.
    """

    time: str = "discrete"
    eta: float = 1.0  # weight of the Q term
    grad_norm: float = 9.0  # max gradient norm of actor and critic (0 = no clipping)
    discount: float = 0.99
    tau: float = 0.005  # target critic Polyak rate, every step
    critic_lr: float = 3e-4
    critic_hidden: int = 256
    critic_layer_norm: bool = False  # LayerNorm after each critic layer (CleanDiffuser's DQLCritic; the original has none)
    selection: str = act_setting("softmax")  # the original's; sample | mode | argmax | auto (agents/acting.py)
    num_candidates: int = act_setting(50)  # actions sampled per state when selecting
    rank_threshold: float = act_setting(1.2)  # auto: above the shared 0.75, as selecting lost to the mode up to ratio ~1 (CPU-preset checkpoints)
    act_with_ema: bool = act_setting(False)  # the original samples the online actor; True: the EMA actor, steadier between updates
    bc_updates: int = 0  # extra denoising-only actor steps per update, each on its own batch (the original: 0)
    ema_warmup: str = "copy"  # before ema_start the EMA copies the actor; hold: keeps its initial weights (the original's)


class DiffusionQL(CandidateActing, Agent):
    name = "dql"
    has_critics = True
    Config = DiffusionQLConfig
    ema_models = ("actor",)
    selections = ("softmax", "sample", "mode", "argmax", "auto")
    auto_selection = "softmax"
    mode_name = "actor's mode"

    def __init__(self, obs_dim: int, act_dim: int, config: dict | DiffusionQLConfig | None = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        cfg = self.config
        clip = cfg.grad_norm or None
        self.actor = diffusion_actor(cfg, act_dim, obs_dim, grad_clip_norm=clip, device=self.device)
        hidden = (cfg.critic_hidden,) * 3
        self.critic = TwinQ(obs_dim, act_dim, hidden, act="mish", layer_norm=cfg.critic_layer_norm).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self._init_acting(obs_dim)

    @classmethod
    def check_config(cls, cfg: DiffusionQLConfig) -> None:
        super().check_config(cfg)
        if cfg.bc_updates < 0:
            raise ValueError(f"bc_updates must be >= 0, got {cfg.bc_updates}")
        if cfg.ema_warmup not in ("copy", "hold"):
            raise ValueError(f"unknown ema_warmup {cfg.ema_warmup!r}; valid: copy, hold")

    @property
    def batches_per_step(self) -> int:
        return 1 + self.config.bc_updates

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor.optimizer, "critic": self.critic_optimizer}

    def after_step(self) -> None:
        """`ema_warmup: copy`: every DiffusionModel's EMA rule (`ema_update`). `hold`: the original's
        (ql_diffusion.py `step_ema`): after update k (from 0) the EMA averages when k >= ema_start and
        k % ema_every == 0, and keeps its initial weights before."""
        if self.config.ema_warmup == "copy":
            return super().after_step()
        held_ema_step(self)

    def ema_holds_average(self, n: int) -> bool:
        """`ema_warmup: hold`: whether the EMA averages after update n (from 1), i.e. k = n - 1 (from 0)."""
        return n - 1 >= self.config.ema_start and (n - 1) % self.config.ema_every == 0

    def _sample(self, obs: Tensor, *, use_ema: bool, requires_grad: bool = False) -> Tensor:
        prior = obs.new_zeros(obs.shape[0], self.act_dim)
        action, _ = self.actor.sample(prior, solver=self.config.solver, steps=self.config.sampling_steps,
                                      condition_cfg=obs, use_ema=use_ema, requires_grad=requires_grad)
        return action

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config
        batch, *bc_batches = self.split_batches(batch)
        obs, act, next_obs = batch["obs"], batch["act"], batch["next_obs"]
        self.actor.model.train()

        # 1. critic: clipped double-Q target with the next action from the EMA actor
        with torch.no_grad():
            next_act = self._sample(next_obs, use_ema=True)
            target = batch["rew"] + cfg.discount * (1.0 - batch["terminal"]) * self.critic_target.q_min(next_obs, next_act)
        q1, q2 = self.critic(obs, act)
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        critic_grad = optimizer_step(self.critic_optimizer, critic_loss, self.critic.parameters(), cfg.grad_norm or None)

        # 2. actor: BC loss + eta * normalized Q loss, gradients through the whole sampling chain
        bc_loss = self.actor.loss(act, obs)
        new_act = self._sample(obs, use_ema=False, requires_grad=True)
        self.critic.requires_grad_(False)  # the Q loss trains the actor only: no critic weight gradients
        q1_pi, q2_pi = self.critic(obs, new_act)
        self.critic.requires_grad_(True)
        flip = torch.randint(2, (), device=self.device).float()  # which critic is maximized; the other normalizes
        q_loss = -torch.lerp(q1_pi, q2_pi, flip).mean() / torch.lerp(q2_pi, q1_pi, flip).abs().mean().detach()
        actor_grad = self.actor.optimize(bc_loss + cfg.eta * q_loss)

        # 3. target critic
        soft_update(self.critic_target, self.critic, cfg.tau)

        # 4. denoising-only actor steps, on batches of their own
        for part in bc_batches:
            self.actor.optimize(self.actor.loss(part["act"], part["obs"]))
        return {"actor/bc_loss": bc_loss.detach(), "actor/q_loss": q_loss.detach(), "actor/grad_norm": actor_grad,
                "critic/loss": critic_loss.detach(), "critic/grad_norm": critic_grad,
                "critic/q_mean": q1.detach().mean(), "critic/target_mean": target.mean()}

    def draw(self, obs: Tensor, n: int, *, temperature: float, solver: str, steps: int,
             generator: torch.Generator | None) -> tuple[Tensor, dict]:
        """`n` actions per normalized observation from the actor (the online one unless `act_with_ema`)."""
        return sample_candidates(self.actor, obs, self.act_dim, n, solver=solver, steps=steps, temperature=temperature,
                                 use_ema=self.config.act_with_ema, generator=generator)

    def rate(self, obs_rep: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The target critics' min Q (the original's selection score) and both target critics' Q."""
        q1, q2 = self.critic_target(obs_rep, actions)
        return torch.minimum(q1, q2), q1, q2
