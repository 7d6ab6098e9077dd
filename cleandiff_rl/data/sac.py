"""Soft Actor-Critic, the behavior policy of the D4RL recipe, in one readable file (CleanRL style).

Read top to bottom: networks, replay buffer, `train_sac` (the loop), checkpointing.
One environment step, one gradient step (`policy_frequency` delays the actor as in CleanRL).
Every `checkpoint_every` steps the loop evaluates the deterministic policy, stores a small
actor snapshot (the builder later picks `medium` and `expert` from these) and atomically
rewrites one resume checkpoint holding networks, optimizers, replay buffer, step and RNG.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from cleandiff_rl.nn.layers import mlp
from cleandiff_rl.utils import atomic_save, load_checkpoint, optimizer_step, seed_everything, soft_update

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


@dataclass
class SACConfig:
    """SAC hyperparameters (CleanRL's MuJoCo defaults) and run bookkeeping."""

    total_steps: int = 1_000_000
    learning_starts: int = 5_000
    batch_size: int = 256
    gamma: float = 0.99
    tau: float = 0.005
    policy_lr: float = 3e-4
    q_lr: float = 1e-3
    policy_frequency: int = 2
    hidden: int = 256
    alpha: float = 0.2
    autotune: bool = True
    checkpoint_every: int = 10_000  # the resume state (networks, optimizers, replay buffer)
    eval_every: int | None = None  # a policy snapshot and its deterministic evaluation; None: checkpoint_every
    eval_episodes: int = 5


# ---------------------------------------------------------------- networks


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, (hidden, hidden), 1, act="relu")

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy; action bounds are buffers so a snapshot is self-contained."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.obs_dim, self.act_dim, self.hidden = obs_dim, act_dim, hidden
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)
        self.register_buffer("scale", torch.as_tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor((high + low) / 2.0, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(obs)
        log_std = torch.tanh(self.log_std(h))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)
        return self.mean(h), log_std

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reparameterized action, its log-probability and the deterministic (mean) action."""
        mean, log_std = self(obs)
        eps = torch.randn_like(mean)
        y = torch.tanh(mean + log_std.exp() * eps)
        log_prob = -0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)  # Gaussian density of u
        log_prob = log_prob - torch.log(self.scale * (1 - y.pow(2)) + 1e-6)  # change of variables
        return y * self.scale + self.bias, log_prob.sum(-1), torch.tanh(mean) * self.scale + self.bias

    @torch.inference_mode()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Numpy action(s) for numpy observation(s), for rollouts: the mean or a stochastic draw."""
        mean, log_std = self(torch.as_tensor(obs, dtype=torch.float32, device=self.scale.device))
        u = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
        return (torch.tanh(u) * self.scale + self.bias).cpu().numpy()

    def snapshot(self) -> dict:
        """Everything needed to rebuild this actor elsewhere (see `actor_from_snapshot`)."""
        return {
            "dims": (self.obs_dim, self.act_dim, self.hidden),
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
        }


def actor_from_snapshot(snap: dict, device: torch.device | str = "cpu") -> Actor:
    """Rebuild an `Actor` written by `Actor.snapshot()`."""
    obs_dim, act_dim, hidden = snap["dims"]
    actor = Actor(obs_dim, act_dim, hidden, np.zeros(act_dim), np.ones(act_dim))
    actor.load_state_dict(snap["state_dict"])
    return actor.to(device).eval()


# ---------------------------------------------------------------- replay buffer


class ReplayBuffer:
    """Flat transition storage in time order (one env), so episodes can be rebuilt from it."""

    FIELDS = ("obs", "act", "rew", "next_obs", "terminated", "truncated")

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.size = 0
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.act = np.zeros((capacity, act_dim), np.float32)
        self.rew = np.zeros(capacity, np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.terminated = np.zeros(capacity, bool)
        self.truncated = np.zeros(capacity, bool)

    def add(self, obs, act, rew, next_obs, terminated, truncated) -> None:
        i = self.size
        self.obs[i], self.act[i], self.rew[i], self.next_obs[i] = obs, act, rew, next_obs
        self.terminated[i], self.truncated[i] = terminated, truncated
        self.size += 1

    def sample(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        idx = np.random.randint(0, self.size, batch_size)
        return tuple(
            torch.as_tensor(getattr(self, f)[idx], dtype=torch.float32, device=device)
            for f in ("obs", "act", "rew", "next_obs", "terminated")
        )

    def state_dict(self) -> dict:
        return {"size": self.size, **{f: getattr(self, f)[: self.size].copy() for f in self.FIELDS}}

    def load_state_dict(self, state: dict) -> None:
        self.size = state["size"]
        for f in self.FIELDS:
            getattr(self, f)[: self.size] = state[f]


# ---------------------------------------------------------------- evaluation


def evaluate(actor: Actor, env_id: str, episodes: int, seed: int) -> float:
    """Mean undiscounted return of the deterministic policy over `episodes` episodes."""
    env = gym.make(env_id)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, ret = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(actor.act(obs, deterministic=True))
            ret += float(r)
            done = term or trunc
        returns.append(ret)
    env.close()
    return float(np.mean(returns))


# ---------------------------------------------------------------- training loop


def _result(record: dict, snap_dir: Path, rb: ReplayBuffer) -> dict:
    snapshots = {step: snap_dir / name for step, name in record["snapshots"].items()}
    return {**record, "snapshots": snapshots, "replay": rb.state_dict()}


def train_sac(env_id: str, cfg: SACConfig, run_dir: str | Path, seed: int, device: torch.device,
              stop_return: float | None = None) -> dict:
    """Train (or resume) SAC on `env_id`; return the run record.

    stop_return: end at the first evaluation whose deterministic return reaches it (a build that
    needs no expert stops at its medium policy); a later call without it continues the run.

    Every `cfg.eval_every` steps the policy is kept and evaluated; every `cfg.checkpoint_every` steps (and
    at the end or the stop) the resume state is rewritten. An interrupted run resumes from that state and
    redoes the evaluations after it. The record holds `evals` (list of (step, deterministic return)),
    `snapshots` (step -> actor snapshot path) and `replay` (the replay buffer state). A finished run
    returns at once.
    """
    run_dir = Path(run_dir)
    ckpt_path, snap_dir = run_dir / "checkpoints" / "sac_last.pt", run_dir / "policies"
    seed_everything(seed)  # a resumed run then restores the RNG state it saved
    env = gym.make(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]

    actor = Actor(obs_dim, act_dim, cfg.hidden, env.action_space.low, env.action_space.high).to(device)
    qf1, qf2 = QNetwork(obs_dim, act_dim, cfg.hidden).to(device), QNetwork(obs_dim, act_dim, cfg.hidden).to(device)
    qf1_t, qf2_t = QNetwork(obs_dim, act_dim, cfg.hidden).to(device), QNetwork(obs_dim, act_dim, cfg.hidden).to(device)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=cfg.policy_lr)
    target_entropy = -float(act_dim)
    log_alpha = torch.full((1,), float(np.log(cfg.alpha)), device=device, requires_grad=True)
    alpha_opt = torch.optim.Adam([log_alpha], lr=cfg.q_lr)
    q_params = [*qf1.parameters(), *qf2.parameters()]
    q_opt = torch.optim.Adam(q_params, lr=cfg.q_lr)

    def q_params_grad(enabled: bool) -> None:
        for p in q_params:
            p.requires_grad_(enabled)

    rb = ReplayBuffer(cfg.total_steps, obs_dim, act_dim)
    record: dict = {"evals": [], "snapshots": {}}
    eval_every = cfg.eval_every or cfg.checkpoint_every
    step = 0

    def save(step: int) -> None:
        atomic_save(
            {
                "step": step,
                "env_id": env_id,
                "seed": seed,
                "actor": actor.state_dict(),
                "qf1": qf1.state_dict(),
                "qf2": qf2.state_dict(),
                "qf1_target": qf1_t.state_dict(),
                "qf2_target": qf2_t.state_dict(),
                "actor_opt": actor_opt.state_dict(),
                "q_opt": q_opt.state_dict(),
                "log_alpha": log_alpha.detach().cpu(),
                "alpha_opt": alpha_opt.state_dict(),
                "replay": rb.state_dict(),
                "record": record,
                "rng": {
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
            },
            ckpt_path,
        )

    def snapshot(step: int) -> None:
        """Keep the policy (a dataset level may be collected with it) and, past step 0, its evaluation."""
        snap = atomic_save(actor.snapshot(), snap_dir / f"actor_{step:09d}.pt")
        record["snapshots"][step] = snap.name  # relative, so a run folder can be moved
        if step > 0:
            ret = evaluate(actor, env_id, cfg.eval_episodes, seed=10_000 + step)
            record["evals"].append((step, ret))
            writer.add_scalar("eval/return_deterministic", ret, step)

    if ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, map_location=device)
        if (ck["env_id"], ck["seed"]) != (env_id, seed) or ck["step"] > cfg.total_steps:
            raise ValueError(
                f"{ckpt_path} (env {ck['env_id']}, seed {ck['seed']}, step {ck['step']}) cannot continue as "
                f"env {env_id}, seed {seed}, total_steps {cfg.total_steps}; use another run_dir or delete it"
            )
        step = ck["step"]
        for module, key in ((actor, "actor"), (qf1, "qf1"), (qf2, "qf2"), (qf1_t, "qf1_target"), (qf2_t, "qf2_target")):
            module.load_state_dict(ck[key])
        for opt, key in ((actor_opt, "actor_opt"), (q_opt, "q_opt"), (alpha_opt, "alpha_opt")):
            opt.load_state_dict(ck[key])
        with torch.no_grad():
            log_alpha.copy_(ck["log_alpha"].to(device))
        rb.load_state_dict(ck["replay"])
        record = ck["record"]
        random.setstate(ck["rng"]["python"])
        np.random.set_state(ck["rng"]["numpy"])
        torch.set_rng_state(ck["rng"]["torch"])
        if ck["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        # The env state was not saved: the interrupted episode ends here, as a time-limit cut.
        if rb.size:
            rb.truncated[rb.size - 1] |= not rb.terminated[rb.size - 1]
    else:
        qf1_t.load_state_dict(qf1.state_dict())
        qf2_t.load_state_dict(qf2.state_dict())

    def reached() -> bool:
        return stop_return is not None and any(ret >= stop_return for _, ret in record["evals"])

    writer = SummaryWriter(str(run_dir / "tb"), purge_step=step)
    if step == 0:
        snapshot(0)  # the randomly initialized policy: D4RL's `random` level
        save(0)
    if step >= cfg.total_steps or reached():
        writer.close()
        return _result(record, snap_dir, rb)

    obs, _ = env.reset(seed=seed + step)
    ep_ret, ep_len = 0.0, 0
    env.action_space.seed(seed + step)
    alpha = log_alpha.exp().item()
    actor_loss = torch.zeros(())
    bar = tqdm(total=cfg.total_steps, initial=step, desc=f"SAC {env_id}", unit="step", dynamic_ncols=True)
    while step < cfg.total_steps:
        if step < cfg.learning_starts:
            action = env.action_space.sample()
        else:
            action = actor.act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rb.add(obs, action, reward, next_obs, terminated, truncated)
        obs = next_obs
        ep_ret, ep_len = ep_ret + float(reward), ep_len + 1
        step += 1
        if terminated or truncated:
            writer.add_scalar("train/episode_return", ep_ret, step)
            writer.add_scalar("train/episode_length", ep_len, step)
            bar.set_postfix(ret=f"{ep_ret:.0f}")
            obs, _ = env.reset()
            ep_ret, ep_len = 0.0, 0

        if step > cfg.learning_starts:
            b_obs, b_act, b_rew, b_next, b_term = rb.sample(cfg.batch_size, device)
            with torch.no_grad():
                next_a, next_logp, _ = actor.sample(b_next)
                q_next = torch.min(qf1_t(b_next, next_a), qf2_t(b_next, next_a)) - alpha * next_logp
                target = b_rew + (1.0 - b_term) * cfg.gamma * q_next  # a time-limit cut still bootstraps
            q1, q2 = qf1(b_obs, b_act), qf2(b_obs, b_act)
            q_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
            optimizer_step(q_opt, q_loss, q_params)

            if step % cfg.policy_frequency == 0:
                q_params_grad(False)  # the actor loss needs no Q-weight gradients (the next Q step zeroes them)
                for _ in range(cfg.policy_frequency):
                    a, logp, _ = actor.sample(b_obs)
                    actor_loss = (alpha * logp - torch.min(qf1(b_obs, a), qf2(b_obs, a))).mean()
                    optimizer_step(actor_opt, actor_loss, actor.parameters())
                    if cfg.autotune:
                        with torch.no_grad():
                            _, logp, _ = actor.sample(b_obs)
                        alpha_loss = (-log_alpha.exp() * (logp + target_entropy)).mean()
                        optimizer_step(alpha_opt, alpha_loss, [log_alpha])
                        alpha = log_alpha.exp().item()
                q_params_grad(True)

            soft_update(qf1_t, qf1, cfg.tau)
            soft_update(qf2_t, qf2, cfg.tau)
            if step % 1000 == 0:
                writer.add_scalar("losses/q", q_loss.item(), step)
                writer.add_scalar("losses/actor", actor_loss.item(), step)
                writer.add_scalar("losses/alpha", alpha, step)

        bar.update(1)
        evaluated = step % eval_every == 0 or step == cfg.total_steps
        if evaluated:
            snapshot(step)
            bar.set_postfix(eval=f"{record['evals'][-1][1]:.0f}")
        stop = evaluated and reached()  # only a new evaluation can reach the target
        if step % cfg.checkpoint_every == 0 or step == cfg.total_steps or stop:
            save(step)
        if stop:
            break
    bar.close()
    writer.close()
    env.close()
    return _result(record, snap_dir, rb)
