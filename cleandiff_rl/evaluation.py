"""Vectorized MuJoCo evaluation of a policy, and sweeps of one diffusion policy over solvers x steps.

`evaluate` runs N episodes side by side in a `SyncVectorEnv` (one batched `policy.act` per env step)
and reports returns, D4RL-normalized scores (x100), NFE and time per action. `sweep` repeats that for
every (solver, steps) pair of one checkpoint and writes sweep.csv / sweep.json and TensorBoard scalars
(score, return and time per action against NFE, one curve per solver).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from functools import partial
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cleandiff_rl.agents import load_policy
from cleandiff_rl.agents.base import Agent
from cleandiff_rl.agents.planning import Planner
from cleandiff_rl.data.registry import reference_scores
from cleandiff_rl.diffusion.solvers import CROSS_SOLVERS, get_solver
from cleandiff_rl.utils import atomic_write, format_table, write_csv

if TYPE_CHECKING:  # matplotlib loads only for planner figures: it costs every pipeline ~1 s at startup
    from matplotlib.figure import Figure

COLUMNS = ("solver", "steps", "nfe", "guidance_calls", "cfg_batched", "score_mean", "score_se", "return_mean",
           "return_se", "length_mean", "time_per_action_ms", "error")
SWEEP_STEPS = (1, 2, 5, 10, 20)  # sampling steps a sweep tries by default


def _env_id(policy: Agent, env_id: str | None) -> str:
    env_id = env_id or policy.env_id
    if env_id is None:
        raise ValueError(f"no env_id given and the policy (trained on {policy.dataset_id}) records none; "
                         "pass env_id=<gymnasium id>")
    return env_id


def _check_spaces(policy: Agent, env_id: str, obs_space: gym.Space, act_space: gym.Space) -> None:
    """One clear error when the env's observation/action sizes differ from the policy's."""
    obs_shape, act_shape = tuple(obs_space.shape or ()), tuple(act_space.shape or ())
    if obs_shape != (policy.obs_dim,) or act_shape != (policy.act_dim,):
        raise ValueError(f"policy (obs dim {policy.obs_dim}, act dim {policy.act_dim}, trained on "
                         f"{policy.dataset_id}) does not fit env {env_id} (observation shape {obs_shape}, "
                         f"action shape {act_shape})")


def _references(*ids: str | None) -> tuple[float, float] | None:
    """The (min, max) normalization references of the first id (a dataset's, then an env's) that has them."""
    for key in ids:
        try:
            return reference_scores(key)
        except ValueError:
            continue
    return None


def return_statistics(returns: Sequence[float], *ids: str | None) -> dict[str, float | None]:
    """Mean and standard error of episode returns, and of their normalized scores (x100, D4RL) against the
    references of the first of `ids` (dataset, env) that has them (None where none has)."""
    values = np.asarray(returns, dtype=np.float64)
    return_mean = float(values.mean())
    return_se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    refs = _references(*ids)
    score_mean = score_se = None
    if refs is not None:
        lo, hi = refs
        score_mean, score_se = 100 * (return_mean - lo) / (hi - lo), 100 * return_se / (hi - lo)
    return {"return_mean": return_mean, "return_se": return_se, "score_mean": score_mean, "score_se": score_se}


def evaluate(policy: Agent, env_id: str | None = None, *, episodes: int = 10, seed: int = 0,
             solver: str | None = None, steps: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Run `episodes` episodes (env seeds seed, seed+1, ...) at once; return their statistics.

    env_id: defaults to the one the policy records. solver / steps: default to the policy's.
    progress: show a progress bar over env steps (a planner's evaluation can take many minutes).
    Returns env_id, episodes, returns (per episode), return_mean/se, score_mean/se (D4RL x100; None
    without reference scores), length_mean, time_per_action_ms (wall time of one batched
    `policy.act`, i.e. per env step), nfe / guidance_calls / cfg_batched (network calls per action, see
    `network_calls`; None for non-diffusion policies), solver, steps, temperature (the initial-noise scale; None without one),
    acting (how a policy that decides it per checkpoint acted, e.g. IDQL's `selection: auto`; else None).
    """
    env_id = _env_id(policy, env_id)
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    envs = gym.vector.SyncVectorEnv([partial(gym.make, env_id)] * episodes)
    try:
        _check_spaces(policy, env_id, envs.single_observation_space, envs.single_action_space)
        if policy.is_diffusion:
            solver = policy.solver if solver is None else solver
            steps = policy.steps if steps is None else steps
            get_solver(solver)
        else:
            solver = steps = None
        low, high = envs.single_action_space.low, envs.single_action_space.high
        generator = torch.Generator(policy.device).manual_seed(seed)
        obs, _ = envs.reset(seed=list(range(seed, seed + episodes)))
        returns, lengths = np.zeros(episodes), np.zeros(episodes, dtype=np.int64)
        running = np.ones(episodes, dtype=bool)
        actions = np.zeros((episodes, policy.act_dim), dtype=envs.single_action_space.dtype)
        call_seconds = 0.0
        calls = 0
        bar = tqdm(total=gym.spec(env_id).max_episode_steps, desc=f"evaluate {env_id} x{episodes}", unit="step",
                   leave=False, disable=not progress, mininterval=1.0, dynamic_ncols=True)
        while running.any():  # finished envs are autoreset by the vector env; their later steps are ignored
            start = time.perf_counter()
            actions[running] = policy.act(obs[running], solver=solver, steps=steps, generator=generator)
            call_seconds += time.perf_counter() - start
            calls += 1
            obs, reward, terminated, truncated, _ = envs.step(np.clip(actions, low, high))
            returns[running] += reward[running]
            lengths[running] += 1
            running &= ~(terminated | truncated)
            bar.update()
            bar.set_postfix(running=int(running.sum()), refresh=False)
        bar.close()
    finally:
        envs.close()
    return {"env_id": env_id, "episodes": episodes, "returns": returns.tolist(),
            **return_statistics(returns, policy.dataset_id, env_id),
            "length_mean": float(lengths.mean()), "time_per_action_ms": 1000 * call_seconds / calls,
            "solver": solver, "steps": steps, "temperature": getattr(policy.config, "temperature", None),
            "acting": policy.last_sample_log.get("acting"), **network_calls(policy)}


def evaluate_checkpoint(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate the checkpoint of a `configs/evaluate.yaml` config; write and return `run_dir/evaluation.json`:
    the result of `evaluate`, with the checkpoint, its algorithm, dataset and updates, the act settings, and
    `acts_as`: the act settings that act exactly so with any per-checkpoint choice fixed (`chosen_settings`).

    The evaluate pipeline's job, here so that launchers (`cleandiff_rl.launching`) can ship it to workers.
    """
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    policy = load_policy(str(cfg["checkpoint"]), cfg["device"], temperature=cfg["temperature"],
                         selection=cfg.get("selection"))
    settings = cfg.get("settings") or {}
    settings = OmegaConf.to_container(settings) if isinstance(settings, DictConfig) else dict(settings)
    policy.with_settings(settings)
    result = evaluate(policy, cfg["env_id"], episodes=cfg["episodes"], seed=cfg["seed"], solver=cfg["solver"],
                      steps=cfg["steps"], progress=True)
    act_settings = policy.with_settings({"solver": cfg["solver"], "steps": cfg["steps"]}).act_settings()
    record = {"checkpoint": str(cfg["checkpoint"]), "algo": policy.name, "dataset_id": policy.dataset_id,
              "updates": policy.updates, "seed": cfg["seed"], "settings": settings, "act_settings": act_settings,
              "acts_as": policy.with_settings(policy.chosen_settings()).act_settings(), **result}
    atomic_write(Path(cfg["run_dir"]) / "evaluation.json", lambda f: json.dump(record, f, indent=1))
    return record


def network_calls(policy: Agent) -> dict[str, Any]:
    """Network calls per action of the last sampling: nfe = backbone calls + value-gradient calls.

    A classifier-free-guidance step is one backbone call when its two passes are batched together
    (`cfg_batched`, the default) and would be two otherwise; `guidance_calls` counts the value
    (classifier) gradients inside nfe. A one-step actor (FQL) counts 1. Scoring the finished candidates
    (a critic or value pass) is not counted. None for a policy that records no sampling (BC).
    """
    log = policy.last_sample_log
    if not log:
        return {"nfe": None, "guidance_calls": None, "cfg_batched": None}
    guidance = log.get("classifier_calls", 0)
    return {"nfe": log["nfe"] + guidance, "guidance_calls": guidance, "cfg_batched": log.get("cfg_batched", False)}


def write_sweep(rows: list[dict], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write sweep.csv (the `COLUMNS`) and sweep.json (full rows) atomically; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sweep.csv", rows, COLUMNS)
    atomic_write(out / "sweep.json", lambda f: json.dump(rows, f, indent=1))
    return out / "sweep.csv", out / "sweep.json"


def _check_sweep(policy: Agent, env_id: str | None, solvers: Sequence[str], steps: Sequence[int]) -> str:
    """Refuse a sweep that cannot run (before anything is written); return its env id."""
    if not policy.is_diffusion:
        raise ValueError(f"sweep needs a diffusion policy; {policy.name!r} acts without a solver or steps "
                         "(use evaluate; an FQL checkpoint sweeps its flow policy with +settings.acting=flow)")
    for name in solvers:
        get_solver(name)
    if not all(isinstance(n, int) and n >= 1 for n in steps):
        raise ValueError(f"steps must be positive integers, got {list(steps)}")
    env_id = _env_id(policy, env_id)
    env = gym.make(env_id)
    try:
        _check_spaces(policy, env_id, env.observation_space, env.action_space)
    finally:
        env.close()
    return env_id


def sweep(policy: Agent, env_id: str | None = None, *, solvers: Sequence[str] = CROSS_SOLVERS,
          steps: Sequence[int] = SWEEP_STEPS, episodes: int = 10, seed: int = 0,
          out_dir: str | os.PathLike | None = None, writer: Any = None, progress: bool = True) -> list[dict]:
    """Evaluate one diffusion policy with every solver at every number of steps (same env seeds each).

    A pair the sampler rejects (ValueError, e.g. more steps than a discrete schedule's T) becomes a row
    with `error` set and no scores. out_dir: sweep.csv / sweep.json, rewritten after every pair.
    writer: a SummaryWriter; scalars sweep/{score,return,time_per_action_ms}/<solver> against NFE.
    """
    env_id = _check_sweep(policy, env_id, solvers, steps)
    solvers, steps = list(solvers), list(steps)
    rows: list[dict] = []
    bar = tqdm(list(product(solvers, steps)), desc=f"sweep {env_id}", disable=not progress, dynamic_ncols=True)
    for solver, n in bar:
        try:
            row = {**evaluate(policy, env_id, episodes=episodes, seed=seed, solver=solver, steps=n), "error": None}
        except ValueError as err:
            row = {"env_id": env_id, "episodes": episodes, **dict.fromkeys(COLUMNS), "solver": solver, "steps": n,
                   "error": str(err)}
        rows.append(row)
        metric = "score" if row["score_mean"] is not None else "return"
        bar.set_postfix({"solver": solver, "steps": n, "nfe": row["nfe"],
                         metric: "error" if row["error"] else f"{row[f'{metric}_mean']:.1f}"})
        if writer is not None and row["error"] is None:
            if row["score_mean"] is not None:
                writer.add_scalar(f"sweep/score/{solver}", row["score_mean"], row["nfe"])
            writer.add_scalar(f"sweep/return/{solver}", row["return_mean"], row["nfe"])
            writer.add_scalar(f"sweep/time_per_action_ms/{solver}", row["time_per_action_ms"], row["nfe"])
        if out_dir is not None:
            write_sweep(rows, out_dir)
    if writer is not None:
        writer.flush()
    return rows


def sweep_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, tb_dir: str | os.PathLike, *,
                     device: str = "auto", env_id: str | None = None, temperature: float | None = None,
                     selection: str | None = None, settings: dict | None = None, **kwargs: Any) -> list[dict]:
    """Load a checkpoint and `sweep` it: tables in `out_dir`, TensorBoard scalars in `tb_dir`.

    temperature: the initial-noise scale (None = the checkpoint's). selection: the acting rule (None = the
    checkpoint's, agents/acting.py). settings: other act-time settings
    (`Agent.with_settings`, e.g. {"acting": "flow"} to sweep FQL's flow policy). kwargs go to `sweep`
    (solvers, steps, episodes, seed, progress). A rerun into the same `tb_dir` replaces the previous
    sweep's TensorBoard scalars, as it replaces its tables.
    """
    policy = load_policy(str(checkpoint), device, temperature=temperature, selection=selection)
    policy.with_settings(settings or {})
    _check_sweep(policy, env_id, kwargs.get("solvers", CROSS_SOLVERS), kwargs.get("steps", SWEEP_STEPS))
    for previous in Path(tb_dir).glob("events.out.tfevents.*"):
        previous.unlink()
    writer = SummaryWriter(str(tb_dir))
    try:
        return sweep(policy, env_id, out_dir=out_dir, writer=writer, **kwargs)
    finally:
        writer.close()


def run_sweep(cfg: Mapping[str, Any]) -> list[dict]:
    """Sweep the checkpoint of a `configs/sweep.yaml` config (`sweep_checkpoint`): tables in its run_dir,
    TensorBoard in run_dir/tb. The sweep pipeline's job."""
    settings = cfg.get("settings") or {}
    settings = OmegaConf.to_container(settings) if isinstance(settings, DictConfig) else dict(settings)
    return sweep_checkpoint(cfg["checkpoint"], cfg["run_dir"], Path(cfg["run_dir"]) / "tb", device=cfg["device"],
                            env_id=cfg["env_id"], temperature=cfg["temperature"], selection=cfg.get("selection"),
                            settings=settings, solvers=list(cfg["solvers"]), steps=list(cfg["steps"]),
                            episodes=cfg["episodes"], seed=cfg["seed"])


def sweep_table(rows: list[dict]) -> str:
    """A sweep's table: solvers (rows) x steps (columns), cells "score ± se (nfe N)", under a title line.

    Shows the normalized score when the rows have one, else the return; failed pairs read "error"
    and their messages follow the table.
    """
    metric = "score" if any(r.get("score_mean") is not None for r in rows) else "return"
    steps_list = list(dict.fromkeys(r["steps"] for r in rows))
    cells: dict[tuple[str, int], str] = {}
    for r in rows:
        if r.get("error"):
            cells[r["solver"], r["steps"]] = "error"
        elif r.get(f"{metric}_mean") is not None:
            cells[r["solver"], r["steps"]] = f"{r[f'{metric}_mean']:.1f} ± {r[f'{metric}_se']:.1f} (nfe {r['nfe']})"
    first = rows[0] if rows else {}
    title = "normalized score (x100)" if metric == "score" else "return"
    lines = [f"{title} ± standard error (network evaluations per action) on {first.get('env_id')}, "
             f"{first.get('episodes')} episodes",
             format_table(["solver", *(f"{n} steps" for n in steps_list)],
                          [[solver, *(cells.get((solver, n), "-") for n in steps_list)]
                           for solver in dict.fromkeys(r["solver"] for r in rows)])]
    if any(r.get("guidance_calls") for r in rows):
        lines.append("nfe includes one value-gradient call per guided denoising step")
    if any(r.get("cfg_batched") for r in rows):
        lines.append("classifier-free guidance: the conditional and unconditional passes are one batched call per step")
    errors = [f"  {r['solver']} x {r['steps']} steps: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + (["errors:"] + errors if errors else []))


def plan_figure(policy: Planner, env_id: str | None = None, *, seed: int = 0, dims: int = 4) -> Figure:
    """The first plan of one episode against the states the planner then reached (replanning every
    step), for the first `dims` state dimensions over the plan's horizon."""
    env_id = _env_id(policy, env_id)
    env = gym.make(env_id)
    try:
        _check_spaces(policy, env_id, env.observation_space, env.action_space)
        obs, _ = env.reset(seed=seed)
        action = policy.act(obs)
        planned = policy.last_plan[0].cpu().numpy()
        executed = [obs]
        for _ in range(len(planned) - 1):
            obs, _, terminated, truncated, _ = env.step(action)
            executed.append(obs)
            if terminated or truncated:
                break
            action = policy.act(obs)
    finally:
        env.close()
    executed = np.stack(executed)
    dims = min(dims, policy.obs_dim)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * dims, 2.6))
    for d, ax in enumerate(fig.subplots(1, dims, squeeze=False)[0]):
        ax.plot(planned[:, d], label="planned")
        ax.plot(executed[:, d], label="executed")
        ax.set(title=f"state[{d}]", xlabel="step")
    fig.axes[0].legend()
    fig.tight_layout()
    return fig
