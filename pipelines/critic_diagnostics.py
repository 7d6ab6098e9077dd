"""Three checks of a Diffusion-QL, IDQL or FQL critic (the Q by which the policy ranks its candidates).

1. Values: Q(s, a) of dataset actions against the Monte-Carlo discounted return of the behavior
   policy from there (IQL's expectile and DQL's max push Q above it, but they should correlate).
2. Spread: how much Q varies across the candidates the policy draws at one state, against the
   size of Q's error in (1). When the spread is far below the error, choosing candidates by Q
   (argmax or softmax) picks by noise.
3. Ranking against outcomes: at states of the policy's own episodes (MuJoCo state restored), take
   each candidate once, then follow a policy (the checkpoint itself, or `follow`) for
   `rollout_steps` steps; correlate Q with that discounted return across the candidates of a state.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig

from cleandiff_rl.agents import load_policy
from cleandiff_rl.agents.base import Agent
from cleandiff_rl.data import discounted_returns, read_episodes
from cleandiff_rl.utils.cli import pipeline


CriticPolicy = Agent  # one whose `has_critics`: it rates actions by Q (`rate`)


def critic_q(policy: CriticPolicy, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Q by which the policy ranks candidates (its `rate`): the target critics' min (Diffusion-QL, IDQL) or the
    critics' mean (FQL), on normalized observations and actions."""
    return policy.rate(obs, action)[0]


def candidate_q(policy: CriticPolicy, obs: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The act-time candidates at raw observations `obs` (the policy's own `draw`, at its solver, steps and
    temperature): Q `(states, n)` and env actions `(states, n, act_dim)`."""
    n = policy.config.num_candidates
    generator = torch.Generator(policy.device).manual_seed(seed)
    with torch.no_grad():
        obs_t = policy.obs_normalizer.normalize(torch.as_tensor(obs, dtype=torch.float32, device=policy.device))
        candidates, _ = policy.draw(obs_t, n, temperature=policy.config.temperature, solver=policy.solver,
                                    steps=policy.steps, generator=generator)
        q = critic_q(policy, obs_t.repeat_interleave(n, 0), candidates)
    actions = policy.unnormalize_action(candidates).cpu().numpy().reshape(-1, n, policy.act_dim)
    return q.view(-1, n).cpu().numpy(), actions


def rollout_returns(policy: CriticPolicy, follow: Agent, cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    """Q of each candidate at `rollout_states` states of the policy's own episodes, and the discounted
    return of taking that candidate once, then `follow`'s actions for `rollout_steps - 1` steps."""
    env = gym.make(policy.env_id).unwrapped  # MuJoCo: set_state restores a visited state exactly
    snapshots: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    episode = 0
    while len(snapshots) < cfg.rollout_states:
        obs, _ = env.reset(seed=cfg.seed + episode)
        episode += 1
        for t in range(1000):
            if t % cfg.rollout_every == 0 and len(snapshots) < cfg.rollout_states:
                snapshots.append((env.data.qpos.copy(), env.data.qvel.copy(), obs))
            obs, _, terminated, _, _ = env.step(policy.act(obs))
            if terminated:
                break
    q, actions = candidate_q(policy, np.stack([obs for _, _, obs in snapshots]), cfg.seed)
    envs = [gym.make(policy.env_id).unwrapped for _ in range(q.size)]
    current = np.zeros((q.size, policy.obs_dim))
    for k, sim in enumerate(envs):
        qpos, qvel, _ = snapshots[k // q.shape[1]]
        sim.reset(seed=k)
        sim.set_state(qpos, qvel)
    returns, alive, discount = np.zeros(q.size), np.ones(q.size, dtype=bool), 1.0
    step_actions = actions.reshape(q.size, -1)
    for t in range(cfg.rollout_steps):
        if t > 0:
            step_actions = follow.act(current)
            discount *= policy.config.discount
        for k in np.flatnonzero(alive):
            current[k], reward, terminated, _, _ = envs[k].step(step_actions[k])
            returns[k] += discount * reward
            alive[k] = not terminated
    return q, returns.reshape(q.shape)


@pipeline("critic_diagnostics")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    policy = load_policy(cfg.checkpoint, cfg.device)
    if not policy.has_critics:
        raise ValueError(f"{cfg.checkpoint} holds a {policy.name!r} policy, which has no critic (dql, idql or fql)")
    episodes = read_episodes(policy.dataset_id)
    reward_scale = float(getattr(policy, "reward_scale", 1.0))  # IDQL's critic learns scaled rewards
    returns = discounted_returns(episodes.rew * reward_scale, episodes.starts, episodes.lengths,
                                 policy.config.discount)
    rows = np.random.default_rng(cfg.seed).choice(len(returns), min(cfg.transitions, len(returns)), replace=False)
    obs = policy.obs_normalizer.normalize(torch.as_tensor(episodes.obs[rows], device=policy.device))
    act = policy.normalize_action(torch.as_tensor(episodes.act[rows], device=policy.device))
    with torch.no_grad():
        q_data = critic_q(policy, obs, act).cpu().numpy()
    q_cand, _ = candidate_q(policy, episodes.obs[rows[:cfg.states]], cfg.seed)
    n = q_cand.shape[1]
    mc = returns[rows]

    print(f"{policy.name} critic after {policy.updates} updates, {len(rows)} transitions of {policy.dataset_id}")
    print(f"Q(s, a_data) mean            {q_data.mean():9.2f}   Monte-Carlo return mean {mc.mean():.2f}")
    print(f"correlation(Q, MC return)    {np.corrcoef(q_data, mc)[0, 1]:9.3f}")
    print(f"RMS(Q - MC return)           {np.sqrt(np.mean((q_data - mc) ** 2)):9.2f}   std of MC return {mc.std():.2f}")
    print(f"Q over {n} candidates, std    {q_cand.std(1).mean():9.3f}   (mean over {len(q_cand)} states)")
    print(f"Q over {n} candidates, max-mean {(q_cand.max(1) - q_cand.mean(1)).mean():7.3f}")

    if cfg.rollout_states:
        follow = policy if cfg.follow is None else load_policy(cfg.follow, cfg.device)
        q, rollout = rollout_returns(policy, follow, cfg)
        corr = [np.corrcoef(qs, rs)[0, 1] for qs, rs in zip(q, rollout) if qs.std() > 0 and rs.std() > 0]
        chosen = rollout[np.arange(len(q)), q.argmax(1)]
        print(f"rollouts: {len(q)} states x {n} candidates, then {follow.name} for {cfg.rollout_steps - 1} steps")
        print(f"correlation(Q, rollout return) within a state {np.mean(corr) if corr else float('nan'):6.3f}")
        print(f"rollout return std over candidates {rollout.std(1).mean():7.3f}   "
              f"(Q std {q.std(1).mean():.3f}, in the critic's reward units)")
        print(f"rollout return: argmax-Q candidate {chosen.mean():.2f}, mean candidate {rollout.mean():.2f}, "
              f"best candidate {rollout.max(1).mean():.2f}")


if __name__ == "__main__":
    main()
