"""Torch datasets over Minari datasets: transitions for policies, fixed-horizon windows for planners.

Everything is loaded once into contiguous tensors on the training device; `sample()` draws random
indices on that device and gathers, so the training loop makes no numpy copies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gymnasium as gym
import minari
import numpy as np
import torch

from cleandiff_rl.data.loading import load_dataset
from cleandiff_rl.data.normalizers import Normalizer, fit_normalizer, normalizer_from_state
from cleandiff_rl.data.registry import normalized_score
from cleandiff_rl.utils import resolve_device


@dataclass
class Episodes:
    """A dataset flattened to steps: step t of episode e sits at row `starts[e] + t`."""

    obs: np.ndarray  # (N, obs_dim) observation before each step
    act: np.ndarray  # (N, act_dim)
    rew: np.ndarray  # (N,)
    next_obs: np.ndarray  # (N, obs_dim) observation after each step (the real one at a time-limit cut)
    terminal: np.ndarray  # (N,) bool: the MDP ended here (no bootstrapping)
    timeout: np.ndarray  # (N,) bool: the episode was cut here (time limit or data budget)
    starts: np.ndarray  # (E,) first row of each episode
    lengths: np.ndarray  # (E,)


def read_episodes(dataset: minari.MinariDataset | str) -> Episodes:
    """Read every episode of a Minari dataset (or dataset id) into flat arrays, checked on the way: a
    missing field, fields of mismatched lengths or sizes, NaN/inf in observations, actions or rewards,
    or actions outside the action space is one ValueError naming the dataset, the field, how many steps
    and the first one's episode and step."""
    if isinstance(dataset, str):
        dataset = load_dataset(dataset)
    name = dataset.spec.dataset_id
    obs_size, act_size = _box_size(dataset.observation_space), _box_size(dataset.action_space)
    obs, act, rew, term, trunc, ids = [], [], [], [], [], []
    for ep in _episodes(dataset, name):
        o = np.asarray(ep.observations)
        if not isinstance(ep.observations, np.ndarray) or o.ndim != 2:
            raise ValueError(f"dataset {name}: only flat Box observations are supported (got a nested or image "
                             "observation space)")
        fields = {"observations": o, "actions": np.asarray(ep.actions), "rewards": np.asarray(ep.rewards).reshape(-1),
                  "terminations": np.asarray(ep.terminations, bool).reshape(-1),
                  "truncations": np.asarray(ep.truncations, bool).reshape(-1)}
        n = len(fields["rewards"])
        lengths = {key: len(value) for key, value in fields.items()}
        if lengths != {key: n + (key == "observations") for key in fields}:
            raise ValueError(f"dataset {name}: episode {ep.id} has fields of mismatched lengths {lengths} (a Minari "
                             "episode of N steps holds N + 1 observations and N of the others)")
        a = fields["actions"].reshape(n, -1)
        for field, size, expected in (("observations", o.shape[1], obs_size), ("actions", a.shape[1], act_size)):
            if expected is not None and size != expected:
                raise ValueError(f"dataset {name}: episode {ep.id} has {field} of size {size}; its {field[:-1]} space "
                                 f"has {expected}")
        obs.append(o)
        act.append(a)
        rew.append(fields["rewards"])
        term.append(fields["terminations"])
        trunc.append(fields["truncations"])
        ids.append(int(ep.id))
    if not obs:
        raise ValueError(f"dataset {name} has no episodes")
    lengths = np.array([len(r) for r in rew])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    all_obs = np.concatenate(obs).astype(np.float32)  # every episode's N + 1 observations
    obs_starts = starts + np.arange(len(lengths))
    out = Episodes(
        obs=np.concatenate([o[:-1] for o in obs]).astype(np.float32),
        act=np.concatenate(act).astype(np.float32),
        rew=np.concatenate(rew).astype(np.float32),
        next_obs=np.concatenate([o[1:] for o in obs]).astype(np.float32),
        terminal=np.concatenate(term),
        timeout=np.concatenate(trunc),
        starts=starts,
        lengths=lengths,
    )
    for field, values, first in (("observations", all_obs, obs_starts), ("actions", out.act, starts),
                                 ("rewards", out.rew, starts)):
        count, episode, step = _bad_steps(~np.isfinite(values), first)
        if count:
            raise ValueError(f"dataset {name}: {count} step{'s' * (count > 1)} with non-finite (NaN/inf) {field}, "
                             f"the first at episode {ids[episode]}, step {step}; fix or rebuild the data")
    if act_size is not None:
        low, high = (np.broadcast_to(np.asarray(b, np.float64).reshape(-1), (act_size,))
                     for b in (dataset.action_space.low, dataset.action_space.high))
        slack = 1e-5 * np.maximum(1.0, np.abs(np.stack([low, high])))  # float32 rounding of a clipped action
        outside = (out.act < low - slack[0]) | (out.act > high + slack[1])
        count, episode, step = _bad_steps(outside, starts)
        if count:
            row = starts[episode] + step
            dim = int(np.flatnonzero(outside[row])[0])
            raise ValueError(f"dataset {name}: {count} step{'s' * (count > 1)} with actions outside the action space, "
                             f"the first at episode {ids[episode]}, step {step}: action[{dim}] = {out.act[row, dim]:.4g} "
                             f"not in [{low[dim]:.4g}, {high[dim]:.4g}]; fix or rebuild the data")
    return out


def _box_size(space: gym.Space) -> int | None:
    """The number of entries of a Box space (None for any other space)."""
    return int(np.prod(space.shape)) if isinstance(space, gym.spaces.Box) else None


def _episodes(dataset: minari.MinariDataset, name: str) -> Iterator[minari.EpisodeData]:
    """`dataset.iterate_episodes()`; a field missing from an episode's storage is one clear ValueError."""
    episodes = dataset.iterate_episodes()
    for index in dataset.episode_indices:
        try:
            episode = next(episodes)
        except (KeyError, OSError) as error:  # h5py: "Unable to ... open object (object 'rewards' doesn't exist)"
            field = re.search(r"object '(\w+)' doesn't exist", str(error))
            what = (f"no {field[1]!r} field" if field else
                    f"a field that cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:80]})")
            raise ValueError(f"dataset {name}: episode {index} has {what}; fix or rebuild the data") from None
        yield episode


def _bad_steps(bad: np.ndarray, starts: np.ndarray) -> tuple[int, int, int]:
    """How many rows of `bad` (rows, ...) hold a True, and the first one's episode (position in `starts`,
    each episode's first row) and step; (0, -1, -1) when none."""
    rows = np.flatnonzero(bad.reshape(len(bad), -1).any(-1))
    if not len(rows):
        return 0, -1, -1
    episode = int(np.searchsorted(starts, rows[0], side="right") - 1)
    return len(rows), episode, int(rows[0] - starts[episode])


def dataset_average(dataset_id: str) -> float:
    """The mean D4RL-normalized score of a dataset's own episodes: the reference a policy should beat."""
    episodes = read_episodes(dataset_id)
    returns = np.add.reduceat(episodes.rew.astype(np.float64), episodes.starts)
    return float(np.mean(normalized_score(dataset_id, returns)))


def discounted_returns(rew: np.ndarray, starts: np.ndarray, lengths: np.ndarray, discount: float) -> np.ndarray:
    """sum_k discount^k r_{t+k} to the end of its episode, for every step t (float64)."""
    out = np.zeros(len(rew), np.float64)
    for start, length in zip(starts, lengths):
        acc = 0.0
        for t in range(start + length - 1, start - 1, -1):
            acc = rew[t] + discount * acc
            out[t] = acc
    return out


def _to(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x), device=device)


def _normalizer(kind: str | None, data: torch.Tensor, saved: dict | None, key: str) -> Normalizer | None:
    """The saved normalizer `saved[key]` when a saved state is given, else one fitted on `data`."""
    if saved is not None:
        return None if saved.get(key) is None else normalizer_from_state(saved[key], data.device)
    return None if kind is None else fit_normalizer(kind, data)


class TransitionDataset(torch.utils.data.Dataset):
    """(s, a, r, s', terminal) transitions for policy learning.

    `terminal` is 1 only where the MDP ended; a time-limit (or data budget) cut has terminal 0
    and its real next observation, so the target bootstraps: r + gamma * (1 - terminal) * V(s').
    `timeout` marks those cuts and `done` = terminal or timeout marks every episode end.
    Observations are normalized once at load (`obs_normalizer`, Gaussian by default; pass a
    checkpoint's `normalizer_state()` as `normalizer_state` to reuse it); actions and rewards stay raw.
    """

    def __init__(
        self,
        dataset: minari.MinariDataset | str,
        *,
        device: str | torch.device = "auto",
        obs_normalizer: str | None = "gaussian",
        normalizer_state: dict | None = None,
    ):
        self.device = resolve_device(device)
        eps = read_episodes(dataset)
        obs, next_obs = _to(eps.obs, self.device), _to(eps.next_obs, self.device)
        self.obs_normalizer = _normalizer(obs_normalizer, obs, normalizer_state, "obs")
        if self.obs_normalizer is not None:
            obs, next_obs = self.obs_normalizer.normalize(obs), self.obs_normalizer.normalize(next_obs)
        terminal, timeout = _to(eps.terminal, self.device).float(), _to(eps.timeout, self.device).float()
        self.data = {
            "obs": obs,
            "act": _to(eps.act, self.device),
            "rew": _to(eps.rew, self.device),
            "next_obs": next_obs,
            "terminal": terminal,
            "timeout": timeout,
            "done": torch.maximum(terminal, timeout),
        }
        self.episode_returns = np.add.reduceat(eps.rew.astype(np.float64), eps.starts)
        self.obs_dim, self.act_dim = eps.obs.shape[1], eps.act.shape[1]

    def __len__(self) -> int:
        return len(self.data["rew"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A random batch (with replacement) as tensors on `self.device`; `generator` must live there too."""
        idx = torch.randint(len(self), (batch_size,), device=self.device, generator=generator)
        return {k: v[idx] for k, v in self.data.items()}

    def map_actions(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the stored actions by fn(actions), e.g. the agent's map to [-1, 1]."""
        self.data["act"] = fn(self.data["act"])

    def normalizer_state(self) -> dict:
        """What a checkpoint stores to rebuild the same normalization."""
        return {"obs": None if self.obs_normalizer is None else self.obs_normalizer.state_dict()}


class SequenceDataset(torch.utils.data.Dataset):
    """Windows of `horizon` steps of (obs, act) with the discounted return-to-go at the window start.

    Reproduces Diffuser's SequenceDataset/ValueDataset (jannerm/diffuser, datasets/sequence.py):
      * each episode (at most `max_path_length` steps) is followed by zero padding (raw zeros,
        normalized like any entry) up to `max_path_length`;
      * an episode of length L yields windows starting at 0 .. min(L - 1, max_path_length - horizon) - 1,
        so with `use_padding` a window may run past the episode end into the padding (`mask` = 0
        there); without it the last start is also capped at L - horizon - 1, inside the episode;
      * `values` = sum_k discount^k r_{start+k} to the episode end; an episode that terminated (not a
        time-limit cut) gets `terminal_penalty` on its last reward, added (Diffuser, default) or
        replacing the reward (`penalty_mode="replace"`, CleanDiffuser).
    Observations and actions are normalized (Gaussian by default, as Diffuser's locomotion config);
    `normalize_actions=False` leaves actions raw (the planners map them to [-1, 1] with `map_actions`).
    """

    def __init__(
        self,
        dataset: minari.MinariDataset | str,
        *,
        horizon: int,
        discount: float = 0.99,
        terminal_penalty: float = -100.0,
        penalty_mode: str = "add",
        max_path_length: int = 1000,
        use_padding: bool = True,
        normalizer: str | None = "gaussian",
        normalize_actions: bool = True,
        normalizer_state: dict | None = None,
        device: str | torch.device = "auto",
    ):
        if horizon < 1 or horizon > max_path_length:
            raise ValueError(
                f"need 1 <= horizon <= max_path_length, got horizon={horizon}, max_path_length={max_path_length}"
            )
        if penalty_mode not in ("add", "replace"):
            raise ValueError(f"penalty_mode must be 'add' or 'replace', got {penalty_mode!r}")
        self.device, self.horizon = resolve_device(device), horizon
        eps = read_episodes(dataset)
        if eps.lengths.max() > max_path_length:
            raise ValueError(
                f"an episode has {eps.lengths.max()} steps > max_path_length={max_path_length}; raise max_path_length"
            )

        rew = eps.rew.astype(np.float64)
        last = eps.starts + eps.lengths - 1
        ended = last[eps.terminal[last]]
        rew[ended] = rew[ended] + terminal_penalty if penalty_mode == "add" else terminal_penalty
        rtg = discounted_returns(rew, eps.starts, eps.lengths, discount)

        n_windows = np.minimum(eps.lengths - 1, max_path_length - horizon)
        if not use_padding:
            n_windows = np.minimum(n_windows, eps.lengths - horizon)
        n_windows = np.maximum(n_windows, 0)
        if n_windows.sum() == 0:
            raise ValueError(f"no window of horizon {horizon} fits in the episodes (use_padding={use_padding})")
        win_episode = np.repeat(np.arange(len(eps.lengths)), n_windows)
        win_start = np.concatenate([np.arange(n) for n in n_windows])

        # One extra all-zero row at the end is the padding that every window past its episode reads.
        obs = _to(np.concatenate([eps.obs, np.zeros((1, eps.obs.shape[1]), np.float32)]), self.device)
        act = _to(np.concatenate([eps.act, np.zeros((1, eps.act.shape[1]), np.float32)]), self.device)
        self.obs_normalizer = _normalizer(normalizer, obs[:-1], normalizer_state, "obs")
        self.act_normalizer = _normalizer(normalizer if normalize_actions else None, act[:-1], normalizer_state, "act")
        self.obs = obs if self.obs_normalizer is None else self.obs_normalizer.normalize(obs)
        self.act = act if self.act_normalizer is None else self.act_normalizer.normalize(act)
        self.pad_row = len(eps.rew)
        self.ep_start = _to(eps.starts, self.device)
        self.ep_length = _to(eps.lengths, self.device)
        self.win_episode = _to(win_episode, self.device)
        self.win_start = _to(win_start, self.device)
        self.values = _to(rtg[eps.starts[win_episode] + win_start].astype(np.float32), self.device)
        self.offsets = torch.arange(horizon, device=self.device)
        self.obs_dim, self.act_dim = eps.obs.shape[1], eps.act.shape[1]

    def __len__(self) -> int:
        return len(self.win_start)

    def _gather(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        ep = self.win_episode[idx]
        t = self.win_start[idx, None] + self.offsets  # (B, H) step within the episode
        valid = t < self.ep_length[ep, None]
        rows = torch.where(valid, self.ep_start[ep, None] + t, torch.full_like(t, self.pad_row))
        return {"obs": self.obs[rows], "act": self.act[rows], "values": self.values[idx], "mask": valid.float()}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self._gather(torch.tensor([i], device=self.device))
        return {k: v[0] for k, v in batch.items()}

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random windows: obs (B, H, obs_dim), act (B, H, act_dim), values (B,), mask (B, H)."""
        return self._gather(torch.randint(len(self), (batch_size,), device=self.device, generator=generator))

    def map_actions(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the stored actions (padding row included) by fn(actions)."""
        self.act = fn(self.act)

    def normalizer_state(self) -> dict:
        """What a checkpoint stores; pass it back as `normalizer_state=` to reuse the same maps."""
        return {
            "obs": None if self.obs_normalizer is None else self.obs_normalizer.state_dict(),
            "act": None if self.act_normalizer is None else self.act_normalizer.state_dict(),
        }
