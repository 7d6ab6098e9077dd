"""Two checks of a Diffusion-QL or IDQL critic, on the data it was trained on.

1. Values: Q(s, a) of dataset actions against the Monte-Carlo discounted return of the behavior
   policy from there (IQL's expectile and DQL's max push Q above it, but they should correlate).
2. Ranking: how much Q varies across the candidates the policy draws at one state, against the
   size of Q's error in (1). When the spread is far below the error, choosing candidates by Q
   (argmax or softmax) picks by noise.
"""

from __future__ import annotations

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from cleandiff_rl.agents import load_policy
from cleandiff_rl.agents.common import sample_candidates
from cleandiff_rl.data import discounted_returns, read_episodes


@hydra.main(version_base="1.3", config_path="../configs", config_name="critic_diagnostics")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    policy = load_policy(cfg.checkpoint, cfg.device)
    if not hasattr(policy, "critic_target"):
        raise ValueError(f"{cfg.checkpoint} holds a {policy.name!r} policy, which has no critic (dql or idql)")
    episodes = read_episodes(policy.dataset_id)
    reward_scale = float(getattr(policy, "reward_scale", 1.0))  # IDQL's critic learns scaled rewards
    returns = discounted_returns(episodes.rew * reward_scale, episodes.starts, episodes.lengths,
                                 policy.config.discount)
    rows = np.random.default_rng(cfg.seed).choice(len(returns), min(cfg.transitions, len(returns)), replace=False)
    obs = policy.obs_normalizer.normalize(torch.as_tensor(episodes.obs[rows], device=policy.device))
    act = policy.normalize_action(torch.as_tensor(episodes.act[rows], device=policy.device))
    with torch.no_grad():
        q_data = policy.critic_target.q_min(obs, act).cpu().numpy()
        n = policy.config.num_candidates
        obs_rep, candidates, _ = sample_candidates(
            policy.actor, obs[:cfg.states], policy.act_dim, n, solver=policy.solver, steps=policy.steps,
            use_ema=getattr(policy.config, "act_with_ema", True),
            generator=torch.Generator(policy.device).manual_seed(cfg.seed))
        q_cand = policy.critic_target.q_min(obs_rep, candidates).view(-1, n).cpu().numpy()
    mc = returns[rows]

    print(f"{policy.name} critic after {policy.updates} updates, {len(rows)} transitions of {policy.dataset_id}")
    print(f"Q(s, a_data) mean            {q_data.mean():9.2f}   Monte-Carlo return mean {mc.mean():.2f}")
    print(f"correlation(Q, MC return)    {np.corrcoef(q_data, mc)[0, 1]:9.3f}")
    print(f"RMS(Q - MC return)           {np.sqrt(np.mean((q_data - mc) ** 2)):9.2f}   std of MC return {mc.std():.2f}")
    print(f"Q over {n} candidates, std    {q_cand.std(1).mean():9.3f}   (mean over {len(q_cand)} states)")
    print(f"Q over {n} candidates, max-mean {(q_cand.max(1) - q_cand.mean(1)).mean():7.3f}")


if __name__ == "__main__":
    main()
