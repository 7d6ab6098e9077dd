"""Every setting of every pipeline, checked against its valid range before the pipeline makes anything.

`validate(cfg, config_name)` walks the composed config (algorithm `params` included) and checks each leaf
against `RANGES`, keyed by field name, by a dotted path's tail (`sac.gamma`) or by `<config>:<whole path>` where
one pipeline reads a name differently (`evaluate:steps` may be null: the policy's own). A key that names an
algorithm takes its mapping's rule (the suite's `steps.<algo>`). The check is fail-closed: a number whose
name has no rule is refused, so a new setting cannot go unchecked (tests/test_errors.py walks every
config to keep the table complete). Solver and algorithm names are checked against the registries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass(frozen=True)
class Range:
    """Numbers a setting accepts: an int or any finite number, between `low` and `high` (open where said),
    one value, a list of them (`shape="list"`) or either, and null where `none`."""

    kind: str = "float"  # int | float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none: bool = False
    shape: str = "scalar"  # scalar | list | any

    def describe(self) -> str:
        what = "an integer" if self.kind == "int" else "a number"
        if self.low is not None and self.high is not None:
            what += f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            what += f" {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            what += f" {'<' if self.high_open else '<='} {self.high:g}"
        if self.shape == "list":
            what = f"a list of {what.replace('an integer', 'integers').replace('a number', 'numbers')}"
        elif self.shape == "any":
            what += " (or a list of them)"
        return what + (" or null" if self.none else "")

    def problem(self, value: Any) -> str | None:
        """Why one number (not a list) is refused; None when it is fine."""
        if value is None:
            return None if self.none else "is null"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "is not a number"
        if self.kind == "int" and not isinstance(value, int):
            return "is not an integer"
        if not math.isfinite(value):
            return "is not finite"
        low_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        high_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return "is out of range" if low_bad or high_bad else None


def Int(low: float | None = None, high: float | None = None, **kw: Any) -> Range:  # noqa: N802 (a rule's name)
    return Range("int", low, high, **kw)


def Num(low: float | None = None, high: float | None = None, **kw: Any) -> Range:  # noqa: N802
    return Range("float", low, high, **kw)


POSITIVE_INT, COUNT, POSITIVE = Int(1), Int(0), Num(0, low_open=True)
FRACTION, RATE = Num(0, 1), Num(0, 1, low_open=True)

RANGES: dict[str, Range] = {
    # runs: budgets, batches, logging, evaluation, checkpoints, processes
    "steps": POSITIVE_INT, "train_steps": POSITIVE_INT, "updates": POSITIVE_INT, "total_steps": POSITIVE_INT,
    "steps_per_dataset": POSITIVE_INT, "learning_starts": COUNT,
    "evaluate:steps": Int(1, none=True), "sweep:steps": Int(1, shape="list"), "quickstart:steps": Int(1, shape="list"),
    "benchmark_acting:steps": Int(1, shape="list"), "benchmark_sampling:steps": Int(1, shape="list"),
    "sample.steps": Int(1, shape="list"), "ode_steps": Int(1, shape="list"), "sde_steps": POSITIVE_INT,
    "nfe": POSITIVE_INT, "teacher_steps": Int(1, none=True),
    "batch_size": POSITIVE_INT, "benchmark_updates:batch_size": Int(1, none=True),
    "benchmark_suite:batch_size": Int(1, none=True),  # per algorithm; null: the algorithm's default
    "batch": POSITIVE_INT, "train_batch": POSITIVE_INT, "batches": Int(1, shape="list"),
    "log_every": POSITIVE_INT, "eval_every": COUNT, "sac.eval_every": Int(1, none=True), "checkpoint_every": POSITIVE_INT,
    "eval_episodes": POSITIVE_INT, "episodes": POSITIVE_INT, "distill:episodes": COUNT,
    "keep_checkpoints": POSITIVE_INT, "checkpoints": POSITIVE_INT, "max_minutes": Num(0, low_open=True, none=True),
    "jobs": POSITIVE_INT, "threads": POSITIVE_INT, "benchmark_sampling:threads": Int(1, none=True),
    "seed": Int(0, 2**32 - 1), "version": COUNT, "reps": POSITIVE_INT,
    "seeds": Int(0, 2**32 - 1, none=True, shape="list"), "ensemble": POSITIVE_INT,  # seed ensembles (train.yaml)
    "benchmark_updates:ensemble": Int(1, 4096, none=True, shape="list"),
    "window_minutes": POSITIVE, "part_mib": POSITIVE,  # gpu_protocol: training minutes per window, file size limit
    "min_seconds": POSITIVE, "repeats": POSITIVE_INT, "blocks": POSITIVE_INT, "block_updates": POSITIVE_INT,
    "transitions": POSITIVE_INT, "states": POSITIVE_INT, "rollout_states": COUNT, "rollout_every": POSITIVE_INT,
    "rollout_steps": POSITIVE_INT, "sde_samples": POSITIVE_INT, "projections": POSITIVE_INT, "n_eval": POSITIVE_INT,
    "medium_target": Num(none=True),
    # optimization
    "lr": POSITIVE, "critic_lr": POSITIVE, "inv_lr": POSITIVE, "policy_lr": POSITIVE, "q_lr": POSITIVE,
    "lr_decay_steps": COUNT,
    "weight_decay": Num(0), "grad_norm": Num(0), "ema_rate": FRACTION, "ema_every": POSITIVE_INT, "ema_start": COUNT,
    "dropout": Num(0, 1, high_open=True), "condition_dropout": Num(0, 1, high_open=True),
    "bc_updates": COUNT, "critic_updates": POSITIVE_INT, "policy_frequency": POSITIVE_INT,
    # RL: returns, critics, losses
    "discount": FRACTION, "gamma": FRACTION, "tau": RATE, "expectile": Num(0, 1, low_open=True, high_open=True),
    "eta": Num(0), "alpha": Num(0), "awr_temperature": Num(0), "action_weight": Num(0), "next_state_weight": Num(0),
    "num_qs": Int(2), "num_q_samples": POSITIVE_INT, "rho": Num(0), "eta_lr": Num(0), "eta_min": POSITIVE,
    "eta_max": POSITIVE, "bc_threshold": Num(0),
    "return_scale": POSITIVE, "target_return": Num(), "terminal_penalty": Num(), "max_path_length": POSITIVE_INT,
    # networks and diffusion
    "hidden_dim": POSITIVE_INT, "hidden": POSITIVE_INT, "critic_hidden": POSITIVE_INT, "inv_hidden": POSITIVE_INT,
    "n_layers": POSITIVE_INT, "n_blocks": POSITIVE_INT, "d_model": POSITIVE_INT, "n_heads": POSITIVE_INT,
    "depth": POSITIVE_INT, "model_dim": POSITIVE_INT, "emb_dim": POSITIVE_INT, "dim_mults": Int(1, shape="list"),
    "horizon": POSITIVE_INT, "x_dim": POSITIVE_INT, "cond_dim": POSITIVE_INT,
    "diffusion_steps": POSITIVE_INT, "sampling_steps": POSITIVE_INT,
    "beta_min": POSITIVE, "beta_max": POSITIVE, "sigma_min": POSITIVE, "sigma_max": POSITIVE,  # schedule_kwargs
    "t_min": Num(0, 1, low_open=True, high_open=True), "t_max": RATE, "t_start": RATE, "stretch": POSITIVE,
    # acting
    "temperature": Num(0), "evaluate:temperature": Num(0, none=True), "sweep:temperature": Num(0, none=True),
    "distill:temperature": Num(0, none=True), "selection_temperature": POSITIVE,
    "num_candidates": POSITIVE_INT, "rank_threshold": Num(0), "w_cg": Num(0), "w_cfg": Num(0),
    "step_temperature": Num(0), "scale": Num(0), "n_guide_steps": COUNT, "t_stopgrad": COUNT,
    # toy problems
    "modes": POSITIVE_INT, "radius": POSITIVE, "std": POSITIVE, "m": Num(), "s": POSITIVE,
}

# Settings that name solvers or algorithms (one name or a list); "all" where a pipeline takes every solver.
NAMES = {"solver": "solver", "solvers": "solver", "teacher_solver": "solver", "algos": "algorithm"}
NULL_NAMES = {"evaluate:solver"}  # null: the policy's own
ALL_NAMES = {"toy2d:sample.solvers", "benchmark_acting:solvers", "benchmark_sampling:solvers"}


def rule_for(config_name: str, path: list[str]) -> Range | None:
    """The range of the setting at `path` (keys, no list indices) in `config_name`'s config: the rule for
    `<config_name>:<the whole path>`, else for the longest tail of the path; a key that names an algorithm
    (a per-algorithm mapping, as the suite's `steps.<algo>`) takes the rule of the mapping."""
    if len(path) > 1 and path[-1] in _names("algorithm"):
        return rule_for(config_name, path[:-1])
    whole = f"{config_name}:{'.'.join(path)}"
    if whole in RANGES:
        return RANGES[whole]
    for start in range(len(path)):
        tail = ".".join(path[start:])
        if tail in RANGES:
            return RANGES[tail]
    return None


def _names(kind: str) -> tuple[str, ...]:
    if kind == "solver":
        from cleandiff_rl.diffusion.solvers import SOLVERS
        return SOLVERS
    from cleandiff_rl.agents import ALGORITHMS
    return tuple(ALGORITHMS)


def leaves(node: Any, path: list[str], index: str = "") -> Any:
    """(keys, dotted name, value) of every leaf (a list is one) that resolves; missing values (???) and
    interpolations that do not resolve are left to the pipeline, which reports them when it reads them."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            if OmegaConf.is_missing(node, key):
                continue
            try:
                value = node[key]
            except OmegaConfBaseException:
                continue
            yield from leaves(value, [*path, str(key)], f"{index}.{key}" if index else str(key))
    else:
        yield path, index, node


def _element_problems(rule: Range, shown: str, value: Any) -> str | None:
    if isinstance(value, ListConfig):
        if rule.shape == "scalar":
            return f"{shown}={_show(value)} is a list; accepted: {rule.describe()}"
        for i in range(len(value)):
            try:
                item = value[i]
            except OmegaConfBaseException:
                continue
            why = rule.problem(item)
            if why:
                return f"{shown}[{i}]={_show(item)} {why}; accepted: {rule.describe()}"
        return None
    if rule.shape == "list" and value is not None:
        return f"{shown}={_show(value)} is not a list; accepted: {rule.describe()}"
    why = rule.problem(value)
    return f"{shown}={_show(value)} {why}; accepted: {rule.describe()}" if why else None


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, ListConfig):
        return str(OmegaConf.to_container(value))
    return repr(value) if isinstance(value, str) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def problems(cfg: DictConfig, config_name: str) -> list[str]:
    """Every setting of `cfg` (the composed `configs/<config_name>.yaml`, hydra node excluded) that is out of
    its range, of the wrong type, names no known solver or algorithm, or is a number with no rule."""
    found = []
    for path, shown, value in leaves(cfg, []):
        if path and path[0] == "hydra":
            continue
        name = path[-1]
        if name in NAMES:
            found += _name_problems(config_name, path, shown, value, NAMES[name])
            continue
        rule = rule_for(config_name, path)
        if rule is not None:
            problem = _element_problems(rule, shown, value)
            if problem:
                found.append(problem)
            continue
        numbers = [v for v in value] if isinstance(value, ListConfig) else [value]
        if any(_is_number(v) for v in numbers):
            found.append(f"{shown}={_show(value)}: no valid range is known for this setting")
    return found


def _name_problems(config_name: str, path: list[str], shown: str, value: Any, kind: str) -> list[str]:
    tail = ".".join(path)
    if value is None:
        return [] if f"{config_name}:{tail}" in NULL_NAMES else [f"{shown}=null; accepted: a {kind} name"]
    if value == "all" and f"{config_name}:{tail}" in ALL_NAMES:
        return []
    valid = _names(kind)
    given = list(value) if isinstance(value, ListConfig) else [value]
    for item in given:
        if item not in valid:
            return [f"unknown {kind} {item!r} in {shown}; valid: {', '.join(valid)}"]
    return []


def validate(cfg: DictConfig, config_name: str) -> None:
    """Raise one ValueError naming the first setting of `cfg` that `problems` refuses."""
    found = problems(cfg, config_name)
    if found:
        raise ValueError(found[0])
