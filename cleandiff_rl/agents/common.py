"""Pieces two or more algorithms share: config -> DiffusionModel, twin critics, target updates,
sample-then-select acting, and the rank ratio that decides whether selecting pays (`selection: auto`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from cleandiff_rl.diffusion import DiffusionModel
from cleandiff_rl.diffusion.solvers import get_solver
from cleandiff_rl.nn import DQLMlp, IDQLMlp
from cleandiff_rl.nn.layers import mlp

if TYPE_CHECKING:
    from cleandiff_rl.agents.planning import PlannerConfig

SELECTIONS = ("argmax", "softmax", "expectile")
PROBE_STATES = 256  # dataset states the rank ratio is measured on
# `selection: auto` selects above this rank ratio. Over eleven CPU-preset checkpoints (README, "Acting
# chosen per checkpoint") the critic-free acting won at ratios 0.45-0.71 and selection at 0.82-1.76; on a
# held-out walker2d medium-replay (0.82-0.89) it chose right for IDQL and FQL and tied for Diffusion-QL.
# On a third hopper medium-expert build it chose wrong both ways (Diffusion-QL at 0.95 selected and lost 17
# to its mode; IDQL at 0.45 took its mode and lost 33 to argmax): no threshold fits both. Session 17 added
# two more misses (IDQL 0.56 on halfcheetah medium-expert, 8 below argmax; FQL 1.19 on that hopper build, 7
# below its mode). Scored against issue 14's targets over every measured checkpoint, this rule still keeps each
# miss within a few points, where always selecting loses 33-43 on some medium-expert build (docs/measurements.md, session 17).
# IDQL's and FQL's default; Diffusion-QL's is 1.2 (agents/diffusion_ql.py says why).
RANK_THRESHOLD = 0.75


@dataclass
class DiffusionActorConfig:
    """Settings of a diffusion model over actions conditioned on the (normalized) observation.

    The defaults are Diffusion-QL's actor (Wang et al. 2023): eps prediction on the VP SDE with
    beta_min 0.1, beta_max 10, sampled by DDPM in 5 steps with x0 clipped to the action box. The
    original discretizes time into T = 5 levels. Here time is continuous by default
    (`time: continuous`). Its 5-step uniform grid hits exactly the original's 5 noise levels, and
    the same network can also be sampled at 1, 2, 10 or 20 steps by any solver. `time: discrete`
    with `diffusion_steps: 5` gives the original's training exactly, and then at most 5 sampling
    steps. Diffusion-QL uses it, because its Q loss must meet the BC loss at the sampled levels.
    """

    time: str = "continuous"
    schedule: str = "linear"
    diffusion_steps: int = 5
    schedule_kwargs: dict = field(default_factory=lambda: {"beta_min": 0.1, "beta_max": 10.0})
    predict: str = "eps"
    solver: str = "ddpm"
    sampling_steps: int = 5
    temperature: float = 1.0  # acting: scale of the initial noise (see `Agent.set_sampling`)
    backbone: str = "mlp"  # mlp: Diffusion-QL's 3 x hidden_dim Mish MLP; resnet: IDQL's LN-ResNet (see ACTOR_BACKBONES)
    hidden_dim: int = 256
    n_blocks: int = 3  # resnet: residual blocks
    dropout: float = 0.1  # resnet: dropout in each block
    lr: float = 3e-4
    weight_decay: float = 0.0
    ema_rate: float = 0.995
    ema_every: int = 5
    ema_start: int = 1000


def diffusion_model(cfg: DiffusionActorConfig | PlannerConfig, backbone: nn.Module,
                    nn_condition: nn.Module | None = None, *, device: torch.device, **options: Any) -> DiffusionModel:
    """The `DiffusionModel` around `backbone` with the diffusion, optimizer and EMA settings of `cfg`.

    The one place an agent's config becomes a model, so every algorithm reads its settings the same way;
    `options` are the model's algorithm-specific arguments (fix_mask, loss_weight, classifier, x_min, ...).
    """
    return DiffusionModel(backbone, nn_condition, time=cfg.time, schedule=cfg.schedule,
                          diffusion_steps=cfg.diffusion_steps, schedule_kwargs=dict(cfg.schedule_kwargs),
                          predict=cfg.predict, lr=cfg.lr, weight_decay=cfg.weight_decay, ema_rate=cfg.ema_rate,
                          ema_every=cfg.ema_every, ema_start=cfg.ema_start, device=device, **options)


# The denoisers an action model can use (`DiffusionActorConfig.backbone`). On hopper medium-expert at the CPU
# preset (30k updates) Diffusion BC's mode scored 58.8 with the MLP and 88.2 with the LN-ResNet (BC 80.3),
# at 6-7x the time per update (README, "Benchmark suite").
ACTOR_BACKBONES = {
    "mlp": lambda cfg, act_dim, obs_dim: DQLMlp(act_dim, obs_dim, hidden_dim=cfg.hidden_dim),
    "resnet": lambda cfg, act_dim, obs_dim: IDQLMlp(act_dim, obs_dim, hidden_dim=cfg.hidden_dim,
                                                    n_blocks=cfg.n_blocks, dropout=cfg.dropout),
}


def diffusion_actor(cfg: DiffusionActorConfig, act_dim: int, obs_dim: int, *, grad_clip_norm: float | None = None,
                    device: torch.device) -> DiffusionModel:
    """The `DiffusionModel` over actions in [-1, 1], conditioned on the observation, that `cfg` describes
    (its `backbone` one of `ACTOR_BACKBONES`)."""
    if cfg.backbone not in ACTOR_BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; valid: {', '.join(ACTOR_BACKBONES)}")
    backbone = ACTOR_BACKBONES[cfg.backbone](cfg, act_dim, obs_dim)
    return diffusion_model(cfg, backbone, x_min=-1.0, x_max=1.0, grad_clip_norm=grad_clip_norm, device=device)


class TwinQ(nn.Module):
    """Two independent Q(s, a) MLPs (clipped double Q)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: Sequence[int] = (256, 256, 256), act: str = "mish",
                 layer_norm: bool = False):
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, hidden_dims, 1, act, layer_norm)
        self.q2 = mlp(obs_dim + act_dim, hidden_dims, 1, act, layer_norm)

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([obs, action], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def q_min(self, obs: Tensor, action: Tensor) -> Tensor:
        return torch.minimum(*self(obs, action))


def sample_candidates(actor: DiffusionModel, obs: Tensor, act_dim: int, n: int, *, solver: str, steps: int,
                      temperature: float = 1.0, use_ema: bool = True,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, dict]:
    """`n` actions per observation in one batched sampler call, from initial noise scaled by `temperature`.

    Returns (obs repeated `(b * n, obs_dim)`, actions `(b * n, act_dim)`, the sampler's log).
    """
    obs_rep = obs.repeat_interleave(n, 0)
    prior = obs.new_zeros(obs_rep.shape[0], act_dim)
    actions, log = actor.sample(prior, solver=solver, steps=steps, condition_cfg=obs_rep, use_ema=use_ema,
                                temperature=temperature, generator=generator)
    return obs_rep, actions, log


def select(actions: Tensor, scores: Tensor, n: int, mode: str, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> Tensor:
    """Pick one of `n` candidates per observation: `actions (b * n, act_dim)`, `scores (b * n,)`.

    argmax: the best score. softmax: draw with probabilities softmax(scores / temperature).
    expectile: draw with the given non-negative weights as they are (IDQL's implicit policy).
    """
    scores = scores.view(-1, n)
    actions = actions.view(scores.shape[0], n, -1)
    if mode == "argmax":
        idx = scores.argmax(-1)
    elif mode == "softmax":
        idx = torch.multinomial(torch.softmax(scores / temperature, -1), 1, generator=generator).squeeze(-1)
    elif mode == "expectile":
        idx = torch.multinomial(scores, 1, generator=generator).squeeze(-1)
    else:
        raise ValueError(f"unknown selection {mode!r}; valid: {', '.join(SELECTIONS)}")
    return actions[torch.arange(len(idx), device=actions.device), idx]


def mode_solver(solver: str) -> str:
    """The ODE solver that samples a mode: `solver` itself when it is one (e.g. a sweep's), else DDIM (a
    stochastic solver adds noise at every step)."""
    return "ddim" if get_solver(solver).stochastic else solver


def behavior_mode(actor: DiffusionModel, obs: Tensor, act_dim: int, *, solver: str, steps: int, use_ema: bool = True,
                  generator: torch.Generator | None = None) -> tuple[Tensor, dict, str]:
    """The diffusion model's mode: one sample from zero noise (temperature 0) with `mode_solver(solver)`.

    Returns (actions `(b, act_dim)`, the sampler's log, the solver used)."""
    ode = mode_solver(solver)
    _, actions, log = sample_candidates(actor, obs, act_dim, 1, solver=ode, steps=steps, temperature=0.0,
                                        use_ema=use_ema, generator=generator)
    return actions, log, ode


class RankedCandidates:
    """Mixin for agents that pick one of `num_candidates` actions by their twin critics, and with
    `selection: auto` only where those critics can rank a state's candidates (`selection: mode`: never).

    `rank_ratio` measures that once per set of weights on `PROBE_STATES` dataset states fixed before
    training (`probe_obs`, drawn in `prepare` with a fixed seed, kept in the checkpoint): the mean
    within-state std of the selection score over a state's candidates, divided by the twin critics'
    mean disagreement |Q1 - Q2| on the same candidates: how far the selection's signal stands above the
    critics' own uncertainty. Above `rank_threshold` (`RANK_THRESHOLD`, 0.75; Diffusion-QL 1.2) the agent selects; the
    threshold was 1 until two halfcheetah medium-replay checkpoints (IDQL 0.82, FQL 0.97) acted without
    selection and lost 10.7 and 6.0 points (docs/measurements.md, session 14).
    The agent provides `candidates(obs, solver, steps, generator) -> (obs repeated, actions, min Q)` and
    `critic_target` (or its own `_probe_candidates(obs, solver, steps, generator) -> (score, q1, q2)`, each
    `(b * num_candidates,)`), `auto_selection` (how `auto` selects), `selections` (its other ways) and its
    config `num_candidates`, `temperature`, `rank_threshold`, `selection_temperature`. `_auto_choice` names
    the acting `auto` takes either way and `_act` acts so: as written here, those of a diffusion actor
    `actor` (its mode: one ODE sample from zero noise, as `behavior_mode` draws it); FQL overrides both.
    """

    added_state: ClassVar[tuple[str, ...]] = ("probe_obs",)
    auto_selection: ClassVar[str]  # how `selection: auto` selects where the critics rank candidates
    selections: ClassVar[tuple[str, ...]]  # the agent's own ways to select, beside `auto` and `mode`
    mode_name: ClassVar[str] = "actor's mode"  # how the `acting` log names acting at the mode

    @classmethod
    def check_selection(cls, selection: str) -> None:
        """One clear error for a `selection` the agent cannot act by."""
        valid = ("auto", "mode", *cls.selections)
        if selection not in valid:
            raise ValueError(f"unknown selection {selection!r}; valid: {', '.join(valid)}")

    def _init_probes(self, obs_dim: int) -> None:
        # NaN until `prepare`: an agent trained by hand, or a checkpoint older than the rule, has none
        self.register_buffer("probe_obs", torch.full((PROBE_STATES, obs_dim), float("nan"), device=self.device))
        self._rank_cache: tuple = ((), 0.0)

    def prepare(self, dataset: Any) -> None:
        """Fix the probe states: a seed-0 draw of the dataset's (normalized) states, the same in every
        process and rerun."""
        super().prepare(dataset)
        obs = dataset.data["obs"]
        draw = torch.randint(len(obs), (PROBE_STATES,), generator=torch.Generator().manual_seed(0))
        self.probe_obs.copy_(obs[draw.to(obs.device)])

    @torch.no_grad()
    def rank_ratio(self, solver: str | None = None, steps: int | None = None) -> float:
        """Whether the critics can rank a state's candidates (see the class); computed once per weights and
        acting settings, from fixed noise. NaN without probe states or with one candidate (nothing to rank)."""
        cfg, solver, steps = self.config, solver or self.solver, steps or self.steps
        if self.probe_obs.isnan().any() or cfg.num_candidates < 2:
            return float("nan")
        key = (self.updates, cfg.num_candidates, solver, steps, cfg.temperature)
        if self._rank_cache[0] != key:
            generator = torch.Generator(self.device).manual_seed(0)
            score, q1, q2 = self._probe_candidates(self.probe_obs, solver, steps, generator)
            spread = score.view(-1, cfg.num_candidates).std(-1).mean()
            self._rank_cache = (key, float(spread / (q1 - q2).abs().mean().clamp_min(1e-8)))
        return self._rank_cache[1]

    def _probe_candidates(self, obs: Tensor, solver: str, steps: int,
                          generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """`rank_ratio`'s candidates, drawn as acting draws them: the selection score (the target critics'
        min Q, as `candidates` rates them) and both target critics' Q."""
        obs_rep, actions, q = self.candidates(obs, solver, steps, generator)
        return q, *self.critic_target(obs_rep, actions)

    def ranks_candidates(self, solver: str | None = None, steps: int | None = None) -> tuple[bool, float]:
        """(whether `selection: auto` selects among the candidates here, the rank ratio). Where the ratio is
        NaN it selects: without probe states as the agent did before `auto`; one candidate is its own pick."""
        ratio = self.rank_ratio(solver, steps)
        return not ratio <= self.config.rank_threshold, ratio

    def acts_at_mode(self, solver: str | None = None, steps: int | None = None) -> tuple[bool, str]:
        """(whether acting takes the actor's mode instead of selecting among candidates, why, for the
        `acting` log): always with `selection: mode`; with `auto` where the critics cannot rank a state's
        candidates (the rank ratio); never with another selection or one candidate (why: "")."""
        cfg = self.config
        if cfg.selection == "mode":
            return True, "selection: mode"
        if cfg.selection != "auto" or cfg.num_candidates < 2:
            return False, ""
        ranks, ratio = self.ranks_candidates(solver, steps)
        return not ranks, f"rank ratio {ratio:.2f}"

    def chosen_settings(self) -> dict[str, Any]:
        """The act settings of the acting `selection: auto` or `mode` takes for these weights (`_auto_choice`:
        how the agent selects, or its mode); {} where it decides nothing (another selection, or one candidate)."""
        at_mode, why = self.acts_at_mode()
        return self._auto_choice(not at_mode) if why else {}

    def _auto_choice(self, selects: bool) -> dict[str, Any]:
        """The act settings `auto` acts as: `auto_selection` of the candidates, or the actor's mode."""
        if selects:
            return {"selection": self.auto_selection}
        return {"solver": mode_solver(self.solver), "temperature": 0.0, "num_candidates": 1}

    @property
    def acts_with_ema(self) -> bool:
        """Whether acting samples the EMA actor: always, unless the config's `act_with_ema` (Diffusion-QL's) says not."""
        return getattr(self.config, "act_with_ema", True)

    def _act(self, obs: Tensor, solver: str, steps: int, generator: torch.Generator | None) -> Tensor:
        """A diffusion actor's acting: its mode (`acts_at_mode`), else one of `num_candidates` samples picked
        by `select` on `_selection_scores` of their Q."""
        cfg = self.config
        at_mode, why = self.acts_at_mode(solver, steps)
        if at_mode:
            mode, log, ode = behavior_mode(self.actor, obs, self.act_dim, solver=solver, steps=steps,
                                           use_ema=self.acts_with_ema, generator=generator)
            self.last_sample_log = {**log, "acting": f"{self.mode_name} ({ode}, T=0; {why})"}
            return mode
        obs_rep, actions, q = self.candidates(obs, solver, steps, generator)
        selection = self.auto_selection if cfg.selection == "auto" else cfg.selection
        if why:
            self.last_sample_log["acting"] = f"{selection} Q of {cfg.num_candidates} ({why})"
        return select(actions, self._selection_scores(obs_rep, q), cfg.num_candidates, selection,
                      cfg.selection_temperature, generator)

    def _selection_scores(self, obs_rep: Tensor, q: Tensor) -> Tensor:
        """What `select` draws the candidates by: their Q (IDQL's expectile selection: its weights)."""
        return q
