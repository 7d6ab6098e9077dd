"""D4RL-style dataset builder for gymnasium v5 MuJoCo tasks, written as real Minari datasets.

The recipe (D4RL, Fu et al. 2020): train one SAC behavior policy, then collect with its
stochastic policy
  random         the randomly initialized policy (SAC step 0),
  medium         of the first checkpoint whose deterministic evaluation return reaches the target
                 (default one third of the expert reference score) and the one before it, the
                 closer to the target (SAC stops there when no level needs the expert),
  medium-replay  SAC's replay buffer up to that checkpoint,
  expert         the best checkpoint by deterministic evaluation (the last of equals; the final
                 policy while SAC still improves), so `expert` never scores below `medium`,
  medium-expert  medium and expert concatenated.
All levels are staged in a hidden folder of the Minari root and moved into place together once
every one is complete, so a failed or interrupted build publishes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
import torch
from minari.data_collector import EpisodeBuffer
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cleandiff_rl.data.registry import LEVELS, TASKS, dataset_id, datasets_root, normalized_score
from cleandiff_rl.data.sac import SACConfig, actor_from_snapshot, train_sac
from cleandiff_rl.utils import exclusive_run_dir, load_checkpoint, resolve_device


def collect(actor: torch.nn.Module, env_id: str, n_steps: int, seed: int, desc: str) -> list[EpisodeBuffer]:
    """Roll out the stochastic policy for exactly `n_steps` steps; the last episode is cut (truncated)."""
    torch.manual_seed(seed)  # the policy's action noise
    env = gym.make(env_id)
    episodes: list[EpisodeBuffer] = []
    obs, _ = env.reset(seed=seed)
    ep: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "term", "trunc")}
    ep["obs"].append(obs)
    for t in tqdm(range(n_steps), desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0):
        action = actor.act(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        truncated = (truncated or t == n_steps - 1) and not terminated  # a real termination wins, as in D4RL
        for k, v in (("obs", obs), ("act", action), ("rew", reward), ("term", terminated), ("trunc", truncated)):
            ep[k].append(v)
        if terminated or truncated:
            episodes.append(_episode(len(episodes), ep))
            if t < n_steps - 1:
                obs, _ = env.reset()
                ep = {k: [] for k in ep}
                ep["obs"].append(obs)
    env.close()
    return episodes


def _episode(idx: int, ep: Mapping[str, list]) -> EpisodeBuffer:
    return EpisodeBuffer(
        id=idx,
        observations=np.stack(ep["obs"]),
        actions=np.stack(ep["act"]).astype(np.float32),
        rewards=np.asarray(ep["rew"], np.float64),
        terminations=np.asarray(ep["term"], bool),
        truncations=np.asarray(ep["trunc"], bool),
    )


def replay_episodes(replay: Mapping[str, np.ndarray], n_steps: int) -> list[EpisodeBuffer]:
    """Episodes of SAC's replay buffer up to step `n_steps`; an episode cut there is truncated."""
    ends = np.flatnonzero(replay["terminated"][:n_steps] | replay["truncated"][:n_steps])
    if len(ends) == 0 or ends[-1] != n_steps - 1:
        ends = np.append(ends, n_steps - 1)
    episodes, start = [], 0
    for end in ends:
        sl = slice(start, end + 1)
        trunc = replay["truncated"][sl].copy()
        trunc[-1] = not replay["terminated"][end]
        episodes.append(
            EpisodeBuffer(
                id=len(episodes),
                # the buffer keeps float32; the env (and the other levels) give float64
                observations=np.concatenate([replay["obs"][sl], replay["next_obs"][end : end + 1]]).astype(np.float64),
                actions=replay["act"][sl],
                rewards=replay["rew"][sl].astype(np.float64),
                terminations=replay["terminated"][sl].copy(),
                truncations=trunc,
            )
        )
        start = end + 1
    return episodes


def _renumbered(episodes: list[EpisodeBuffer]) -> list[EpisodeBuffer]:
    return [
        EpisodeBuffer(
            id=i,
            observations=e.observations,
            actions=e.actions,
            rewards=e.rewards,
            terminations=e.terminations,
            truncations=e.truncations,
        )
        for i, e in enumerate(episodes)
    ]


@contextmanager
def _minari_root(path: Path) -> Iterator[None]:
    """Point minari at another datasets root for the duration of the block."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _publish(staging: Path, root: Path, ids: list[str], overwrite: bool) -> None:
    """Move staged datasets (and their namespace metadata) into the real root."""
    for ds_id in ids:
        parts = ds_id.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            meta = Path(*parts[:depth], "namespace_metadata.json")
            (root / meta.parent).mkdir(parents=True, exist_ok=True)
            if (staging / meta).is_file() and not (root / meta).is_file():
                shutil.copy2(staging / meta, root / meta)
        target = root / ds_id
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"dataset {ds_id} appeared at {target} during the build")
            old = staging / f"replaced-{uuid.uuid4().hex}"
            os.replace(target, old)
        os.replace(staging / ds_id, target)


def medium_checkpoint(evals: list[tuple[int, float]], target: float) -> tuple[int, float]:
    """(step, return) of `medium`: of the first checkpoint whose return reaches `target` and the one before
    it, the closer to the target (SAC can jump past it between checkpoints: hopper went 1060 -> 2680 in 10k
    steps); the best checkpoint, with a warning, when none reaches it."""
    first = next((i for i, (_, ret) in enumerate(evals) if ret >= target), None)
    if first is not None:
        return min(evals[max(first - 1, 0):first + 1], key=lambda e: abs(e[1] - target))
    step, ret = max(evals, key=lambda e: e[1])
    warnings.warn(f"no SAC checkpoint reached the medium target {target:.1f} (best {ret:.1f} at step {step}); "
                  "using that best checkpoint as `medium`. Train longer or lower medium_target.", stacklevel=3)
    return step, ret


def build_datasets(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """Train (or resume) SAC and write the requested D4RL-style levels; return a build summary.

    `cfg` is the composed `configs/make_dataset.yaml` (a DictConfig or plain dict).
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    if cfg.env not in TASKS:
        raise ValueError(f"unknown env {cfg.env!r}; choose one of {sorted(TASKS)}")
    unknown = set(cfg.levels) - set(LEVELS)
    if unknown:
        raise ValueError(f"unknown levels {sorted(unknown)}; choose from {list(LEVELS)}")
    if not cfg.namespace or "/" in str(cfg.namespace):
        raise ValueError(f"namespace must be one non-empty name without '/', got {cfg.namespace!r}")
    if int(cfg.steps_per_dataset) < 1 or int(cfg.sac.total_steps) < int(cfg.sac.checkpoint_every):
        raise ValueError("need steps_per_dataset >= 1 and sac.total_steps >= sac.checkpoint_every")
    if cfg.sac.get("eval_every") is not None and int(cfg.sac.eval_every) < 1:
        raise ValueError(f"sac.eval_every must be a positive number of steps (or null), got {cfg.sac.eval_every}")
    task = TASKS[cfg.env]
    ids = {level: dataset_id(cfg.env, level, cfg.namespace, int(cfg.version)) for level in cfg.levels}
    root = datasets_root()
    existing = [i for i in ids.values() if (root / i).exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(f"datasets already exist: {existing} under {root}; pass overwrite=true to replace them")

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(int(cfg.threads))
    run_dir = Path(cfg.run_dir)
    sac_cfg = SACConfig(**OmegaConf.to_container(cfg.sac, resolve=True))
    target = task.ref_max_score / 3.0 if cfg.medium_target is None else float(cfg.medium_target)
    needs_expert = bool({"expert", "medium-expert"} & set(cfg.levels))
    with exclusive_run_dir(run_dir):  # SAC's checkpoints: one builder per run_dir
        record = train_sac(task.env_id, sac_cfg, run_dir, int(cfg.seed), device,
                           stop_return=None if needs_expert else target)  # no expert wanted: stop at medium
    sac_time = time.perf_counter() - t0

    evals = record["evals"]
    medium_step, medium_eval = medium_checkpoint(evals, target)
    expert_step, expert_eval = max(reversed(evals), key=lambda e: e[1])  # the best; the latest of equals
    policies = {"random": 0, "medium": medium_step, "expert": expert_step}

    def policy(level: str) -> torch.nn.Module:
        return actor_from_snapshot(load_checkpoint(record["snapshots"][policies[level]]), device)

    wanted = set(cfg.levels) | ({"medium", "expert"} if "medium-expert" in cfg.levels else set())
    n, seed = int(cfg.steps_per_dataset), int(cfg.seed)
    episodes: dict[str, list[EpisodeBuffer]] = {}
    for offset, level in enumerate(("random", "medium", "expert"), start=1):
        if level in wanted:
            episodes[level] = collect(policy(level), task.env_id, n, seed=seed + 1000 * offset, desc=f"collect {level}")
    if "medium-replay" in wanted:
        episodes["medium-replay"] = replay_episodes(record["replay"], medium_step)
    if "medium-expert" in wanted:
        episodes["medium-expert"] = _renumbered(episodes["medium"] + episodes["expert"])

    how = {
        "random": "the randomly initialized SAC policy",
        "medium": f"the SAC policy at step {medium_step} (deterministic eval return {medium_eval:.1f}, "
        f"target {target:.1f})",
        "medium-replay": f"SAC's replay buffer for its first {medium_step} steps (up to the medium policy)",
        "expert": f"the best SAC checkpoint, step {expert_step} (deterministic eval return {expert_eval:.1f})",
        "medium-expert": "the medium and expert datasets concatenated",
    }
    summary: dict[str, Any] = {
        "env_id": task.env_id,
        "datasets": {},
        "medium_step": medium_step,
        "medium_eval_return": medium_eval,
        "medium_target": target,
        "expert_step": expert_step,
        "expert_eval_return": expert_eval,
        "sac_seconds": sac_time,
    }
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".cleandiff-staging-{uuid.uuid4().hex}"
    try:
        with _minari_root(staging), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`author(_email)?` is set to None")  # optional in config
            for level, ds_id in ids.items():
                eps = episodes[level]
                returns = np.array([e.rewards.sum() for e in eps])
                minari.create_dataset_from_buffers(
                    dataset_id=ds_id,
                    buffer=eps,
                    env=task.env_id,
                    eval_env=task.env_id,
                    algorithm_name=f"SAC behavior policy, D4RL recipe ({level})",
                    code_permalink=str(cfg.code_permalink),
                    author=cfg.author,
                    author_email=cfg.author_email,
                    ref_min_score=task.ref_min_score,
                    ref_max_score=task.ref_max_score,
                    description=(
                        f"D4RL-style {level} dataset for {task.env_id}: {how[level]}; stochastic policy "
                        f"actions; seed {seed}. Reference scores are D4RL's constants."
                    ),
                    requirements=[f"gymnasium>={gym.__version__}", "mujoco>=3.1"],
                )
                summary["datasets"][ds_id] = {
                    "episodes": len(eps),
                    "steps": int(sum(len(e.rewards) for e in eps)),
                    "mean_return": float(returns.mean()),
                    "mean_normalized_score": float(normalized_score(task.env_id, returns.mean())),
                }
        _publish(staging, root, list(ids.values()), bool(cfg.overwrite))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary["total_seconds"] = time.perf_counter() - t0
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "build_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
