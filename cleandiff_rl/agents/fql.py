"""Flow Q-Learning (Park, Li & Levine, ICML 2025): a one-step actor distilled from a flow BC policy
while it maximizes Q. No gradient flows through a sampling chain, and acting is one network call.

Per update (seohongpark/fql, agents/fql.py):
1. Critic: two Q-networks (LayerNorm MLPs) regress r + gamma (1 - terminal) agg(Q1', Q2')(s', a'),
   a' = mu(s', z), z ~ N(0, I), from the one-step actor; agg is the mean (`q_agg: min` for the minimum).
2. Flow BC policy: flow matching on dataset actions, the shared `DiffusionModel` with `schedule="flow"`,
   `predict="v"` (v = eps - a); it never sees Q.
3. One-step actor mu(s, z): alpha * |mu(s, z) - flow(s, z)|^2 - Q(s, mu(s, z)), where flow(s, z) runs
   the BC flow's ODE from the same noise z (`sampling_steps` Euler steps: DDIM on the flow schedule),
   without gradient, and Q is the mean of the two critics (divided by its batch mean |Q| with
   `normalize_q_loss`). The distillation term reads the actor's unclipped output, as the original's
   does, so an output outside [-1, 1] (where the clip passes no gradient) is still pulled back to the
   teacher; the critics, the targets and acting see actions clipped to [-1, 1].
4. Target critic: Polyak averaging with tau = 0.005.
The original sums the three losses and takes one Adam step; their parameters are disjoint, so separate
Adam steps give the same update, except that here the critic steps first and the actor's Q term sees
the stepped critic (as in Diffusion-QL).
Acting (`acting: onestep`): a = mu(s, z), z ~ N(0, temperature^2 I), one network call (the paper's).
This project's `selection: auto` (the default) draws N = `num_candidates` (5) noises, N actions in one
batched call, and keeps the one with the highest mean Q, but only where the critics can rank a state's
candidates (`rank_ratio` > 0.75, agents/common.py `RankedCandidates`); elsewhere it acts with mu(s, 0), the
actor's mode, as IDQL and Diffusion-QL act at their actor's mode there. On hopper medium-replay (ratio
1.76) best of 5 scored 24.3 against one action's 17.4; on medium-expert (ratio 0.65) mu(s, 0) scored
78.2, one action at temperature 1 60.7 and best of 5 35.5.
`selection: argmax` always takes the best of N, `mode` always mu(s, 0) (the medium-expert tasks' default,
configs/task: there the ratio did not tell when selecting pays); walker2d medium-replay takes the best of 5
at temperature 0.5 (its task file); `num_candidates: 1` at temperature 1 is the paper's acting.
`acting: flow` samples the BC flow policy instead, with any solver and steps (no critic): what a sweep
compares.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cleandiff_rl.agents.base import Agent
from cleandiff_rl.agents.common import (
    RANK_THRESHOLD,
    DiffusionActorConfig,
    RankedCandidates,
    TwinQ,
    diffusion_model,
    select,
)
from cleandiff_rl.diffusion.solvers import get_solver
from cleandiff_rl.nn import FlowMlp
from cleandiff_rl.nn.layers import mlp
from cleandiff_rl.utils import optimizer_step, soft_update

ACTING = ("onestep", "flow")


@dataclass
class FQLConfig(DiffusionActorConfig):
    """Defaults: the original's (agents/fql.py get_config: 4 x 512 GELU MLPs, LayerNorm critics, batch 256,
    Adam 3e-4, 10 flow steps, no EMA); alpha (and here normalize_q_loss) per task in configs/task."""

    time: str = "continuous"
    schedule: str = "flow"
    schedule_kwargs: dict = field(default_factory=dict)
    predict: str = "v"
    solver: str = "ddim"  # on the flow schedule, an Euler step on the velocity
    sampling_steps: int = 10  # the original's flow_steps: the distillation target's ODE steps
    hidden_dim: int = 512
    n_layers: int = 4
    ema_rate: float = 0.0  # no EMA: the flow's EMA copy follows the online network (acting: flow uses it)
    ema_every: int = 1
    ema_start: int = 0
    alpha: float = 10.0  # weight of the distillation loss
    normalize_q_loss: bool = False  # divide the Q loss by mean |Q| (detached)
    q_agg: str = "mean"  # how the target aggregates the two critics: mean or min
    discount: float = 0.99
    tau: float = 0.005
    critic_lr: float = 3e-4
    acting: str = "onestep"  # onestep (the paper's) or flow (the BC flow policy, any solver and steps)
    num_candidates: int = 5  # onestep acting: N actions mu(s, z), the one with the highest Q (1: the paper's)
    selection: str = "auto"  # best of N where the critics rank candidates, else the mode; mode | argmax (always best of N)
    rank_threshold: float = RANK_THRESHOLD  # auto: best of N when `rank_ratio` exceeds this


class FQL(RankedCandidates, Agent):
    name = "fql"
    Config = FQLConfig
    ema_models = ("flow",)
    auto_selection = "argmax"  # the best of N by mean Q
    selections = ("argmax",)

    def __init__(self, obs_dim: int, act_dim: int, config: dict | FQLConfig | None = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        cfg = self.config
        hidden = (cfg.hidden_dim,) * cfg.n_layers
        self.flow = diffusion_model(cfg, FlowMlp(act_dim, obs_dim, cfg.hidden_dim, cfg.n_layers), device=self.device)
        # the teacher's ODE starts at its grid's first level, from noise z scaled to the noise level there
        levels, _ = self.flow.plan(get_solver(cfg.solver), cfg.sampling_steps, "uniform")
        self._sigma_start = levels[0].sigma
        self.actor = mlp(obs_dim + act_dim, hidden, act_dim, "gelu").to(self.device)  # mu(s, z)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr)
        self.critic = TwinQ(obs_dim, act_dim, hidden, act="gelu", layer_norm=True).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self._init_probes(obs_dim)

    @classmethod
    def check_config(cls, cfg: FQLConfig) -> None:
        if cfg.q_agg not in ("mean", "min"):
            raise ValueError(f"FQL aggregates its two critics by 'mean' or 'min', got {cfg.q_agg!r}")
        if cfg.acting not in ACTING:
            raise ValueError(f"unknown acting {cfg.acting!r}; valid: {', '.join(ACTING)}")
        if cfg.num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {cfg.num_candidates}")
        cls.check_selection(cfg.selection)

    @property
    def is_diffusion(self) -> bool:  # type: ignore[override]
        """Whether `act` samples with a solver and steps: only when acting with the flow policy."""
        return self.config.acting == "flow"

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"flow": self.flow.optimizer, "actor": self.actor_optimizer, "critic": self.critic_optimizer}

    def one_step(self, obs: Tensor, noise: Tensor, clip: bool = True) -> Tensor:
        """mu(s, z), clipped to the action box (`clip=False`: the raw output, which the distillation reads)."""
        action = self.actor(torch.cat([obs, noise], -1))
        return action.clamp(-1.0, 1.0) if clip else action

    def _q(self, critic: TwinQ, obs: Tensor, action: Tensor) -> Tensor:
        q1, q2 = critic(obs, action)
        return torch.minimum(q1, q2) if self.config.q_agg == "min" else (q1 + q2) / 2

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config
        obs, act, next_obs = batch["obs"], batch["act"], batch["next_obs"]
        self.flow.model.train()

        # 1. critic: the target's next action from the one-step actor
        with torch.no_grad():
            next_act = self.one_step(next_obs, torch.randn_like(act))
            target = batch["rew"] + cfg.discount * (1.0 - batch["terminal"]) * self._q(self.critic_target, next_obs, next_act)
        q1, q2 = self.critic(obs, act)
        critic_loss = ((q1 - target).square().mean() + (q2 - target).square().mean()) / 2
        critic_grad = optimizer_step(self.critic_optimizer, critic_loss, self.critic.parameters())

        # 2. flow BC policy: flow matching on the dataset actions
        flow_loss = self.flow.loss(act, obs)
        flow_grad = self.flow.optimize(flow_loss)

        # 3. one-step actor: distil the flow's ODE map from the same noise, and maximize Q
        noise = torch.randn_like(act)
        with torch.no_grad():
            teacher, _ = self.flow.sample(torch.zeros_like(act), solver=cfg.solver, steps=cfg.sampling_steps,
                                          x_T=noise * self._sigma_start, condition_cfg=obs, use_ema=False)
        raw = self.one_step(obs, noise, clip=False)
        distill_loss = (raw - teacher.clamp(-1.0, 1.0)).square().mean()  # unclipped: pulls back what leaves the box
        action = raw.clamp(-1.0, 1.0)
        self.critic.requires_grad_(False)  # the Q loss trains the actor only
        q1_pi, q2_pi = self.critic(obs, action)
        self.critic.requires_grad_(True)
        q = (q1_pi + q2_pi) / 2
        q_loss = -q.mean()
        if cfg.normalize_q_loss:
            q_loss = q_loss / q.abs().mean().detach()
        actor_grad = optimizer_step(self.actor_optimizer, cfg.alpha * distill_loss + q_loss, self.actor.parameters())

        # 4. target critic
        soft_update(self.critic_target, self.critic, cfg.tau)
        return {"flow/bc_loss": flow_loss.detach(), "flow/grad_norm": flow_grad, "actor/distill_loss": distill_loss.detach(),
                "actor/q_loss": q_loss.detach(), "actor/grad_norm": actor_grad, "critic/loss": critic_loss.detach(),
                "critic/grad_norm": critic_grad, "critic/q_mean": q1.detach().mean(), "critic/target_mean": target.mean()}

    def candidates(self, obs: Tensor, n: int, generator: torch.Generator | None,
                   temperature: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`n` one-step actions per observation in one call, `(b * n, act_dim)`, and both critics' Q on them
        (None for one); the noise scaled by `temperature` (default: the config's)."""
        temperature = self.config.temperature if temperature is None else temperature
        obs_rep = obs.repeat_interleave(n, 0)
        noise = torch.randn(obs_rep.shape[0], self.act_dim, generator=generator, device=obs.device)
        actions = self.one_step(obs_rep, noise.mul_(temperature))
        q1, q2 = self.critic(obs_rep, actions) if n > 1 else (None, None)
        return actions, q1, q2

    def _probe_candidates(self, obs: Tensor, solver: str | None, steps: int | None,
                          generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """`rank_ratio`'s candidates, drawn as acting draws them: the selection score (mean Q) and both
        critics' Q."""
        _, q1, q2 = self.candidates(obs, self.config.num_candidates, generator)
        return (q1 + q2) / 2, q1, q2

    def _auto_choice(self, selects: bool) -> dict[str, Any]:
        """`auto`'s acting: the best of the candidates, or the mode mu(s, 0); the flow policy selects nothing."""
        if self.config.acting == "flow":
            return {}
        return {"selection": self.auto_selection} if selects else {"temperature": 0.0, "num_candidates": 1}

    def _act(self, obs: Tensor, solver: str | None, steps: int | None, generator: torch.Generator | None) -> Tensor:
        cfg = self.config
        if cfg.acting == "flow":
            prior = obs.new_zeros(obs.shape[0], self.act_dim)
            action, self.last_sample_log = self.flow.sample(prior, solver=solver, steps=steps, condition_cfg=obs,
                                                            temperature=cfg.temperature, generator=generator)
            return action.clamp(-1.0, 1.0)
        n, temperature, acting = cfg.num_candidates, None, None
        at_mode, why = self.acts_at_mode()
        if at_mode:
            n, temperature, acting = 1, 0.0, f"mode mu(s, 0) ({why})"
        elif why:
            acting = f"best of {n} by Q ({why})"
        actions, q1, q2 = self.candidates(obs, n, generator, temperature)
        self.last_sample_log = {"nfe": 1, "classifier_calls": 0, "cfg_batched": False}  # per candidate
        if acting:
            self.last_sample_log["acting"] = acting
        return actions if n == 1 else select(actions, (q1 + q2) / 2, n, "argmax")
