"""Tiny offline-RL datasets for fast tests, written as real Minari datasets.

Each function writes into the current `MINARI_DATASETS_PATH` (tests point it at a tmp dir with the
`minari_root` fixture) and returns the `minari.MinariDataset`. Collection reuses the builder's
`collect`, so the data has exactly the layout of the real D4RL-style datasets.

- `pendulum_dataset`: a scripted, noisy stabilizing controller on `InvertedPendulum-v5`. It
  balances for the full 1000 steps, so every episode returns 1000; a learned policy should too.
- `random_dataset`: uniform random actions on any gymnasium env (default Hopper-v5).
- `broken_dataset`: `random_dataset`'s data with one defect (`DEFECTS`), for the loaders' checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer

from cleandiff_rl.data import TASKS
from cleandiff_rl.data.builder import collect

PENDULUM_ENV_ID = "InvertedPendulum-v5"
PENDULUM_MAX_RETURN = 1000.0  # +1 per step, 1000-step time limit
# Mean return of uniform random actions on InvertedPendulum-v5 over 20 episodes (reset seeds 0-19,
# action_space.seed(0)), measured: 4.45 (episodes last 2-11 steps).
RANDOM_PENDULUM_RETURN = 4.45


class PendulumController:
    """Linear state feedback that balances InvertedPendulum-v5, plus optional Gaussian action noise.

    obs = [cart position, pole angle, cart velocity, pole angular velocity]; a positive force
    moves the cart under a pole falling toward +angle. Gains tuned empirically: 20/20 seeds
    reach 1000 even with action noise std 1.0; a 3x smaller angle gain fails at that noise.
    """

    GAINS = np.array([2.0, 20.0, 2.0, 2.0])

    def __init__(self, noise: float = 0.3, seed: int = 0):
        self.noise = float(noise)
        self.rng = np.random.default_rng(seed)

    def act(self, obs: np.ndarray) -> np.ndarray:
        action = float(self.GAINS @ np.asarray(obs, np.float64))
        if self.noise > 0:
            action += self.noise * self.rng.standard_normal()
        return np.clip(np.array([action], np.float32), -3.0, 3.0)


class RandomActor:
    """Uniform random actions from `action_space`, seeded."""

    def __init__(self, action_space: gym.spaces.Space, seed: int = 0):
        self.action_space = action_space
        self.action_space.seed(seed)

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.action_space.sample()


def _write(
    dataset_id: str,
    episodes: list[EpisodeBuffer],
    env_id: str,
    algorithm_name: str,
    description: str,
    ref: Sequence[float] | None,
) -> minari.MinariDataset:
    """Write `episodes` as a Minari dataset of `env_id`; store (ref_min, ref_max) when given."""
    ref_min, ref_max = (None, None) if ref is None else (float(ref[0]), float(ref[1]))
    # with an env and ref_max_score given, minari stores both references itself
    return minari.create_dataset_from_buffers(
        dataset_id=dataset_id,
        buffer=episodes,
        env=env_id,
        eval_env=env_id,
        algorithm_name=algorithm_name,
        code_permalink="tests",
        author="cleandiff_rl tests",
        author_email="tests@example.com",
        ref_min_score=ref_min,
        ref_max_score=ref_max,
        description=description,
    )


def pendulum_dataset(
    dataset_id: str = "test/pendulum/expert-v0", n_steps: int = 3000, seed: int = 0, noise: float = 0.3
) -> minari.MinariDataset:
    """`n_steps` of the noisy scripted controller on InvertedPendulum-v5 (refs: random 4.45, max 1000)."""
    episodes = collect(PendulumController(noise, seed), PENDULUM_ENV_ID, n_steps, seed, desc="collect pendulum")
    return _write(
        dataset_id,
        episodes,
        PENDULUM_ENV_ID,
        "scripted controller",
        f"Test data: linear state-feedback controller on {PENDULUM_ENV_ID} with Gaussian action noise "
        f"std {noise}; {n_steps} steps, seed {seed}.",
        (RANDOM_PENDULUM_RETURN, PENDULUM_MAX_RETURN),
    )


def random_dataset(
    dataset_id: str, env_id: str = "Hopper-v5", n_steps: int = 2000, seed: int = 0
) -> minari.MinariDataset:
    """`n_steps` of uniform random actions on `env_id`; D4RL references when it is one of `TASKS`."""
    env = gym.make(env_id)
    actor = RandomActor(env.action_space, seed)
    env.close()
    task = next((t for t in TASKS.values() if t.env_id == env_id), None)
    episodes = collect(actor, env_id, n_steps, seed, desc="collect random")
    return _write(
        dataset_id,
        episodes,
        env_id,
        "uniform random actions",
        f"Test data: uniform random actions on {env_id}; {n_steps} steps, seed {seed}.",
        None if task is None else (task.ref_min_score, task.ref_max_score),
    )


# What `broken_dataset` can break, in episode `episode` from step `step` on
DEFECTS = ("nan_observations", "inf_rewards", "actions_outside", "observation_size", "mismatched_lengths",
           "missing_rewards")


def broken_dataset(dataset_id: str, defect: str, env_id: str = "Hopper-v5", n_steps: int = 200, seed: int = 0,
                   episode: int = 1, step: int = 2) -> None:
    """`random_dataset`'s data with one defect in episode `episode`: a NaN observation at `step`; +inf and
    -inf rewards at `step` and `step + 1`; action[1] 0.5 above the action space's high at `step`; the last
    observation entry dropped; one reward too few; its rewards removed from the storage file."""
    if defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; one of {DEFECTS}")
    env = gym.make(env_id)
    high = env.action_space.high
    episodes = collect(RandomActor(env.action_space, seed), env_id, n_steps, seed, desc="collect random")
    env.close()
    ep = episodes[episode]
    assert len(ep.rewards) > step + 1, "the episode is too short for the defect"
    obs, act, rew = ep.observations.copy(), ep.actions.copy(), np.asarray(ep.rewards, np.float64).copy()
    if defect == "nan_observations":
        obs[step, 0] = np.nan
    elif defect == "inf_rewards":
        rew[step], rew[step + 1] = np.inf, -np.inf
    elif defect == "actions_outside":
        act[step, 1] = high[1] + 0.5
    elif defect == "observation_size":
        obs = obs[:, :-1]
    elif defect == "mismatched_lengths":
        rew = rew[:-1]
    episodes[episode] = dataclasses.replace(ep, observations=obs, actions=act, rewards=rew)
    dataset = _write(dataset_id, episodes, env_id, "uniform random actions", f"Test data with {defect}.", None)
    if defect == "missing_rewards":
        import h5py  # minari's storage

        with h5py.File(f"{dataset.storage.data_path}/main_data.hdf5", "a") as f:
            del f[f"episode_{episode}/rewards"]
