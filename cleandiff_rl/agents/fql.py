"""Flow Q-Learning (Park, Li & Levine, ICML 2025): a one-step actor distilled from a flow BC policy
while it maximizes Q. No gradient flows through a sampling chain, and acting is one network call.

Per update (seohongpark/fql, agents/fql.py):
1. Critic: two Q-networks (GELU MLPs, LayerNorm after each activation as in flax) regress
   r + gamma (1 - terminal) agg(Q1', Q2')(s', a'), a' = mu(s', z), z ~ N(0, I), from the one-step actor;
   agg is the mean (`q_agg: min` for the minimum).
2. Flow BC policy: flow matching on dataset actions, the shared `DiffusionModel` with `schedule="flow"`,
   `predict="v"` (v = eps - a); it never sees Q.
3. One-step actor mu(s, z): alpha * |mu(s, z) - flow(s, z)|^2 - Q(s, mu(s, z)), where flow(s, z) runs
   the BC flow's ODE from the same noise z (`sampling_steps` Euler steps from t = 1, the original's grid),
   without gradient, and Q is the mean of the two critics (divided by its batch mean |Q| with
   `normalize_q_loss`). The distillation term reads the actor's unclipped output, as the original's
   does, so an output outside [-1, 1] (where the clip passes no gradient) is still pulled back to the
   teacher; the critics, the targets and acting see actions clipped to [-1, 1].
4. Target critic: Polyak averaging with tau = 0.005.
The original sums the three losses and takes one Adam step; their parameters are disjoint, so separate
Adam steps taken after all losses give the same update: the teacher, the actor's Q term and the target
read the pre-step networks. `sequential_steps` steps each network right after its loss instead.
Acting (`selection: sample`, the paper's): a = mu(s, z), z ~ N(0, temperature^2 I), one network call.
`mode` acts with mu(s, 0); `argmax` / `softmax` / `auto` rank `num_candidates` one-step actions by the
critics' mean Q (opt-in, agents/acting.py). `acting: flow` draws from the BC flow policy instead, with any
solver and steps (what a sweep compares).
Locomotion: the paper gives no values; every task takes the original's default alpha 10 with
`normalize_q_loss` on, as the FQL README recommends for new environments (configs/algo/fql.yaml).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cleandiff_rl.agents.acting import CandidateActing, SelectionConfig, act_setting
from cleandiff_rl.agents.base import Agent
from cleandiff_rl.agents.common import DiffusionConfig, TwinQ, diffusion_model
from cleandiff_rl.nn import FlowMlp
from cleandiff_rl.nn.layers import mlp
from cleandiff_rl.utils import optimizer_step, soft_update

ACTING = ("onestep", "flow")


@dataclass
class FQLConfig(DiffusionConfig, SelectionConfig):
    """Defaults: the original's (agents/fql.py get_config: 4 x 512 GELU MLPs, LayerNorm critics, batch 256,
    Adam 3e-4, 10 flow steps, no EMA, alpha 10); configs/algo/fql.yaml turns normalize_q_loss on."""

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
    sequential_steps: bool = False  # step each network after its own loss (Diffusion-QL's order); off: the original's
    acting: str = act_setting("onestep")  # onestep (the paper's) or flow (the BC flow policy, any solver and steps)
    selection: str = act_setting("sample")  # the paper's one action; mode | argmax | softmax | auto
    num_candidates: int = act_setting(5)  # argmax / softmax / auto: actions drawn per state


class FQL(CandidateActing, Agent):
    name = "fql"
    has_critics = True
    Config = FQLConfig
    ema_models = ("flow",)
    selections = ("sample", "mode", "argmax", "softmax", "auto")
    auto_selection = "argmax"

    def __init__(self, obs_dim: int, act_dim: int, config: dict | FQLConfig | None = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        cfg = self.config
        hidden = (cfg.hidden_dim,) * cfg.n_layers
        self.flow = diffusion_model(cfg, FlowMlp(act_dim, obs_dim, cfg.hidden_dim, cfg.n_layers), device=self.device)
        self.actor = mlp(obs_dim + act_dim, hidden, act_dim, "gelu_tanh").to(self.device)  # mu(s, z)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr)
        self.critic = TwinQ(obs_dim, act_dim, hidden, act="gelu_tanh", layer_norm="post").to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self._init_acting(obs_dim)

    @classmethod
    def check_config(cls, cfg: FQLConfig) -> None:
        super().check_config(cfg)
        if cfg.q_agg not in ("mean", "min"):
            raise ValueError(f"FQL aggregates its two critics by 'mean' or 'min', got {cfg.q_agg!r}")
        if cfg.acting not in ACTING:
            raise ValueError(f"unknown acting {cfg.acting!r}; valid: {', '.join(ACTING)}")

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
        if cfg.sequential_steps:
            critic_grad = optimizer_step(self.critic_optimizer, critic_loss, self.critic.parameters())

        # 2. flow BC policy: flow matching on the dataset actions
        flow_loss = self.flow.loss(act, obs)
        if cfg.sequential_steps:
            flow_grad = self.flow.optimize(flow_loss)

        # 3. one-step actor: distil the flow's ODE map from the same noise, and maximize Q
        noise = torch.randn_like(act)
        with torch.no_grad():  # the teacher: Euler steps on v = eps - x0 from t = 1 (x = z) to t = 0
            teacher, velocity, n = noise, self.flow.model["diffusion"], cfg.sampling_steps
            for i in range(n):
                teacher = teacher - velocity(teacher, teacher.new_full((len(obs),), 1.0 - i / n), obs) / n
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

        # 4. target critic (the original's: from the critic before its step), then the original's single step
        soft_update(self.critic_target, self.critic, cfg.tau)
        if not cfg.sequential_steps:
            flow_grad = self.flow.optimize(flow_loss)
            critic_grad = optimizer_step(self.critic_optimizer, critic_loss, self.critic.parameters())
        return {"flow/bc_loss": flow_loss.detach(), "flow/grad_norm": flow_grad, "actor/distill_loss": distill_loss.detach(),
                "actor/q_loss": q_loss.detach(), "actor/grad_norm": actor_grad, "critic/loss": critic_loss.detach(),
                "critic/grad_norm": critic_grad, "critic/q_mean": q1.detach().mean(), "critic/target_mean": target.mean()}

    def draw(self, obs: Tensor, n: int, *, temperature: float, solver: str | None, steps: int | None,
             generator: torch.Generator | None) -> tuple[Tensor, dict]:
        """`n` actions per normalized observation in one call: mu(s, z), z ~ N(0, temperature^2 I) (`acting: flow`:
        the BC flow policy's samples, by `solver` and `steps`)."""
        obs_rep = obs.repeat_interleave(n, 0) if n > 1 else obs
        if self.config.acting == "flow":
            action, log = self.flow.sample(obs_rep.new_zeros(obs_rep.shape[0], self.act_dim), solver=solver, steps=steps,
                                           condition_cfg=obs_rep, temperature=temperature, generator=generator)
            return action.clamp(-1.0, 1.0), log
        if temperature == 0.0:
            noise = obs_rep.new_zeros(obs_rep.shape[0], self.act_dim)
        else:
            noise = torch.randn(obs_rep.shape[0], self.act_dim, generator=generator, device=obs.device)
            if temperature != 1.0:
                noise.mul_(temperature)
        return self.one_step(obs_rep, noise), {"nfe": 1, "classifier_calls": 0, "cfg_batched": False}

    def rate(self, obs_rep: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The critics' mean Q (what the actor maximizes) and both critics' Q."""
        q1, q2 = self.critic(obs_rep, actions)
        return (q1 + q2) / 2, q1, q2
