"""Acting: every way a policy turns drawn candidates into one action per state, behind one interface.

Rules (`selection`, a setting of every policy that acts by candidates; its default is the paper's):
- sample: one draw at the configured `temperature` (Diffusion BC's, FQL's mu(s, z)).
- mode: one draw from zero noise (temperature 0) with an ODE solver: the solver asked for, or DDIM in
  place of a stochastic one; FQL's one-step actor gives mu(s, 0).
- argmax: the best Q of `num_candidates` draws (IDQL's, Diffuser's plan selection by value).
- softmax: one of `num_candidates` draws with probability softmax(Q / `selection_temperature`) (Diffusion-QL's).
- expectile: one of `num_candidates` draws with IDQL's expectile weights (the IDQL paper's implicit policy).
- auto: `auto_selection` where the critics can rank a state's candidates (`rank_ratio` > `rank_threshold`),
  else the mode; opt-in, a rule fitted on this project's CPU-budget checkpoints (docs/algorithms.md).

A policy that acts by candidates mixes in `CandidateActing` and `ActingConfig` (`SelectionConfig` where it
has critics to rank candidates by) and provides:
- `draw(obs, n, *, temperature, solver, steps, generator) -> (actions (b * n, act_dim), sampler log)`,
  `n` draws per normalized observation in one batched call, observation i's at rows i * n ... i * n + n - 1;
- `rate(obs_rep, actions) -> (score, q1, q2)`, each `(b * n,)`: what selection ranks by, and both critics' Q;
- `selections` (the rules it can act by), `auto_selection`, `mode_name`, and for `expectile`
  `implicit_weights(obs_rep, score)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from cleandiff_rl.diffusion.solvers import get_solver

RULES = ("sample", "mode", "argmax", "softmax", "expectile", "auto")
SELECTS = ("argmax", "softmax", "expectile")  # the rules that rank `num_candidates` draws
PROBE_STATES = 256  # dataset states the rank ratio is measured on
# `auto`'s threshold: between the ratios where the mode and selection won on CPU-preset checkpoints (docs/algorithms.md).
RANK_THRESHOLD = 0.75


def act_setting(default: Any) -> Any:
    """A config field only acting reads (no update does): a training may resume with another value, and an
    evaluation records it (`act_only_settings`)."""
    return field(default=default, metadata={"acting": True})


def act_only_settings(config: Any) -> tuple[str, ...]:
    """The names of a config dataclass's (or instance's) fields declared with `act_setting`."""
    return tuple(f.name for f in dataclasses.fields(config) if f.metadata.get("acting"))


@dataclass
class ActingConfig:
    """How a policy that draws its actions acts (see the module): one sample, or the mode."""

    selection: str = act_setting("sample")  # sample | mode (and, with `SelectionConfig`, the rules that rank)


@dataclass
class SelectionConfig(ActingConfig):
    """How a policy with critics acts; an algorithm redeclares the defaults as its paper's."""

    num_candidates: int = act_setting(1)  # draws ranked by argmax / softmax / expectile / auto
    selection_temperature: float = act_setting(1.0)  # softmax: probabilities softmax(Q / this)
    rank_threshold: float = act_setting(RANK_THRESHOLD)  # auto: select above this rank ratio, else the mode


def mode_solver(solver: str | None) -> str | None:
    """The ODE solver that samples a mode: `solver` itself when it is one, else DDIM (a stochastic solver adds
    noise at every step); None for a policy without a solver."""
    if solver is None:
        return None
    return "ddim" if get_solver(solver).stochastic else solver


def sample_candidates(actor: Any, obs: Tensor, act_dim: int, n: int, *, solver: str, steps: int,
                      temperature: float = 1.0, use_ema: bool = True,
                      generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
    """`n` actions per observation from a diffusion actor (a `DiffusionModel`) in one batched sampler call,
    from initial noise scaled by `temperature`: (actions `(b * n, act_dim)`, the sampler's log)."""
    obs_rep = obs.repeat_interleave(n, 0)
    return actor.sample(obs.new_zeros(obs_rep.shape[0], act_dim), solver=solver, steps=steps, condition_cfg=obs_rep,
                        use_ema=use_ema, temperature=temperature, generator=generator)


def select(candidates: Tensor, scores: Tensor, n: int, rule: str, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> Tensor:
    """One of `n` candidates per state: `candidates (b * n, ...)` (actions or plans), `scores (b * n,)`.

    argmax: the highest score. softmax: drawn with probabilities softmax(scores / temperature).
    expectile: drawn with probabilities proportional to the scores, non-negative weights.
    """
    scores = scores.view(-1, n)
    candidates = candidates.view(scores.shape[0], n, *candidates.shape[1:])
    if rule == "argmax":
        idx = scores.argmax(-1)
    elif rule == "softmax":
        idx = torch.multinomial(torch.softmax(scores / temperature, -1), 1, generator=generator).squeeze(-1)
    elif rule == "expectile":
        idx = torch.multinomial(scores, 1, generator=generator).squeeze(-1)
    else:
        raise ValueError(f"unknown selection {rule!r}; valid: {', '.join(SELECTS)}")
    return candidates[torch.arange(len(idx), device=candidates.device), idx]


def describe(rule: str, n: int, solver: str | None, mode_name: str = "mode") -> str:
    """How one rule acts, for the `acting` log: e.g. 'softmax Q of 50', 'actor's mode (ddim, T=0)'."""
    if rule == "mode":
        return f"{mode_name} ({solver}, T=0)" if solver else f"{mode_name} (T=0)"
    if rule == "sample":
        return "one sample"
    return f"{rule} Q of {n}" if rule != "expectile" else f"expectile resampling of {n}"


class CandidateActing:
    """Mixin (before `Agent`) for a policy that acts by the rules of this module; its config mixes in
    `ActingConfig`. `_act` acts by the config's `selection`; `auto` decides per set of weights by the rank ratio,
    measured on `PROBE_STATES` dataset states fixed before training (`probe_obs`, drawn in `prepare` with a
    fixed seed, kept in the checkpoint): the mean within-state std of the score over a state's candidates,
    divided by the critics' mean disagreement |Q1 - Q2| on them."""

    selections: ClassVar[tuple[str, ...]] = ("sample", "mode")  # the rules the policy can act by
    auto_selection: ClassVar[str | None] = None  # how `auto` selects where the critics rank candidates
    mode_name: ClassVar[str] = "mode"  # how the `acting` log names the mode

    # ---- what the policy provides --------------------------------------------------------------

    def draw(self, obs: Tensor, n: int, *, temperature: float, solver: str | None, steps: int | None,
             generator: torch.Generator | None) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def rate(self, obs_rep: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def implicit_weights(self, obs_rep: Tensor, score: Tensor) -> Tensor:
        raise NotImplementedError

    # ---- settings --------------------------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """One clear error for acting settings the policy cannot act by; then the algorithm's own checks."""
        if cfg.selection not in cls.selections:
            raise ValueError(f"unknown selection {cfg.selection!r}; valid: {', '.join(cls.selections)}")
        if getattr(cfg, "num_candidates", 1) < 1:
            raise ValueError(f"num_candidates must be >= 1, got {cfg.num_candidates}")
        if getattr(cfg, "selection_temperature", 1.0) <= 0:
            raise ValueError(f"selection_temperature must be > 0, got {cfg.selection_temperature}")
        super().check_config(cfg)  # type: ignore[misc]

    def _init_acting(self, obs_dim: int) -> None:
        """The probe states of `auto` (a policy that can act by it): NaN until `prepare`."""
        if "auto" in self.selections:
            self.register_buffer("probe_obs", torch.full((PROBE_STATES, obs_dim), float("nan"), device=self.device))
        self._rank_cache: tuple = ((), 0.0)

    def prepare(self, dataset: Any) -> None:
        """Fix the probe states: a seed-0 draw of the dataset's (normalized) states, the same in every run."""
        super().prepare(dataset)  # type: ignore[misc]
        if hasattr(self, "probe_obs"):
            obs = dataset.data["obs"]
            draw = torch.randint(len(obs), (PROBE_STATES,), generator=torch.Generator().manual_seed(0))
            self.probe_obs.copy_(obs[draw.to(obs.device)])

    # ---- the rank ratio (`auto`) ---------------------------------------------------------------

    @torch.no_grad()
    def rank_ratio(self, solver: str | None = None, steps: int | None = None) -> float:
        """Whether the critics can rank a state's candidates (see the class); once per weights and settings,
        from fixed noise. NaN without probe states or with one candidate (nothing to rank)."""
        cfg, solver, steps = self.config, solver or self.solver, steps or self.steps
        probes = getattr(self, "probe_obs", None)
        if probes is None or probes.isnan().any() or cfg.num_candidates < 2:
            return float("nan")
        key = (self.updates, cfg.num_candidates, solver, steps, cfg.temperature, getattr(cfg, "acting", None))
        if self._rank_cache[0] != key:
            n = cfg.num_candidates
            actions, _ = self.draw(probes, n, temperature=cfg.temperature, solver=solver, steps=steps,
                                   generator=torch.Generator(self.device).manual_seed(0))
            score, q1, q2 = self.rate(probes.repeat_interleave(n, 0), actions)
            spread = score.view(-1, n).std(-1).mean()
            self._rank_cache = (key, float(spread / (q1 - q2).abs().mean().clamp_min(1e-8)))
        return self._rank_cache[1]

    def acting_rule(self, solver: str | None = None, steps: int | None = None) -> tuple[str, str]:
        """(the rule `act` acts by now, why where `auto` decided it: '' otherwise). `auto` selects where the rank
        ratio exceeds `rank_threshold` or is NaN (no probe states to measure it on), else takes the mode; with
        one candidate it decides nothing (its one draw)."""
        cfg = self.config
        if cfg.selection != "auto":
            return cfg.selection, ""
        if cfg.num_candidates < 2:
            return self.auto_selection, ""
        ratio = self.rank_ratio(solver, steps)
        return (self.auto_selection if not ratio <= cfg.rank_threshold else "mode"), f"rank ratio {ratio:.2f}"

    def chosen_settings(self) -> dict[str, Any]:
        """{'selection': the rule `auto` takes for these weights}; {} for any other rule (nothing decided)."""
        rule, why = self.acting_rule()
        return {"selection": rule} if why else {}

    def act_settings(self) -> dict[str, Any]:
        """The base's record, less what the rule does not read (so two settings that act alike record alike):
        the mode's solver is its ODE solver, and it reads no temperature or candidates; one sample reads no
        candidates; only softmax its temperature, only `auto` its threshold."""
        record = super().act_settings()  # type: ignore[misc]
        rule = record["selection"]
        drop = {"rank_threshold"} if rule != "auto" else set()
        if rule != "softmax" and rule != "auto":
            drop.add("selection_temperature")
        if rule in ("sample", "mode"):
            drop.add("num_candidates")
        if rule == "mode":
            drop.add("temperature")
            record["solver"] = mode_solver(record["solver"])
        return {key: value for key, value in record.items() if key not in drop}

    # ---- acting ----------------------------------------------------------------------------------

    def _act(self, obs: Tensor, solver: str | None, steps: int | None, generator: torch.Generator | None) -> Tensor:
        cfg = self.config
        rule, why = self.acting_rule(solver, steps)
        n = cfg.num_candidates if rule in SELECTS else 1
        if rule == "mode":
            solver = mode_solver(solver)
        temperature = 0.0 if rule == "mode" else cfg.temperature
        actions, self.last_sample_log = self.draw(obs, n, temperature=temperature, solver=solver, steps=steps,
                                                  generator=generator)
        if n > 1:  # one candidate is its own pick
            obs_rep = obs.repeat_interleave(n, 0)
            score, _, _ = self.rate(obs_rep, actions)
            if rule == "expectile":
                score = self.implicit_weights(obs_rep, score)
            actions = select(actions, score, n, rule, cfg.selection_temperature, generator)
        if why:
            self.last_sample_log = {**self.last_sample_log,
                                    "acting": f"{describe(rule, n, solver, self.mode_name)} ({why})"}
        return actions
