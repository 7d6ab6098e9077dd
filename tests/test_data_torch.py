"""Torch datasets, normalizers and normalized scores on a hand-made Minari dataset (numbers known)."""

from __future__ import annotations

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from minari.data_collector import EpisodeBuffer

from cleandiff_rl.data import (
    GaussianNormalizer,
    MinMaxNormalizer,
    SequenceDataset,
    TransitionDataset,
    discounted_returns,
    normalized_score,
    normalizer_from_state,
)
from cleandiff_rl.utils import atomic_save, load_checkpoint

# The hand-made dataset has no environment; minari warns about that, rightly, and it does not matter here.
pytestmark = pytest.mark.filterwarnings("ignore:.*is set to None:UserWarning", "ignore:env_spec is None:UserWarning")

# Three episodes: ep0 terminates after 4 steps, ep1 and ep2 are time-limit cuts (3 and 5 steps).
# Observation t of episode e is [10 e + t, -t]; action is [e, t]; rewards are listed.
LENGTHS = (4, 3, 5)
REWARDS = ([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0], [1.0, 1.0, 1.0, 1.0, 1.0])
TERMINATED = (True, False, False)


def _obs(e: int, t: int) -> list[float]:
    return [10.0 * e + t, -float(t)]


def make_handmade(dataset_id: str = "test/toy/handmade-v0", rewards=REWARDS, ref=(0.0, 10.0)) -> minari.MinariDataset:
    episodes = []
    for e, (length, rew, term) in enumerate(zip(LENGTHS, rewards, TERMINATED)):
        episodes.append(
            EpisodeBuffer(
                id=e,
                observations=np.array([_obs(e, t) for t in range(length + 1)]),
                actions=np.array([[e, t] for t in range(length)], np.float32),
                rewards=np.array(rew),
                terminations=np.array([term and t == length - 1 for t in range(length)]),
                truncations=np.array([(not term) and t == length - 1 for t in range(length)]),
            )
        )
    dataset = minari.create_dataset_from_buffers(
        dataset_id,
        episodes,
        observation_space=gym.spaces.Box(-np.inf, np.inf, (2,), np.float64),
        action_space=gym.spaces.Box(-10, 10, (2,), np.float32),
        code_permalink="tests",
        algorithm_name="hand-made",
        description="hand-made test data",
        author="tests",
        author_email="tests@example.com",
    )
    # minari stores reference scores only for datasets with an env; this one has none
    dataset.storage.update_metadata({"ref_min_score": ref[0], "ref_max_score": ref[1]})
    return dataset


@pytest.fixture
def handmade(minari_root) -> minari.MinariDataset:
    return make_handmade()


def test_transitions_terminal_and_timeout(handmade):
    ds = TransitionDataset(handmade, device="cpu", obs_normalizer=None)
    assert len(ds) == sum(LENGTHS) == 12
    d = {k: v.numpy() for k, v in ds.data.items()}
    end0, end1, end2 = 3, 6, 11
    # terminal only where the MDP ended; the time-limit ends are timeouts, not terminals
    assert d["terminal"].tolist() == [1.0 if i == end0 else 0.0 for i in range(12)]
    assert d["timeout"].tolist() == [1.0 if i in (end1, end2) else 0.0 for i in range(12)]
    assert d["done"].tolist() == [1.0 if i in (end0, end1, end2) else 0.0 for i in range(12)]
    # s' at every end is the real next observation (episode e, step L), never the next episode's start
    np.testing.assert_array_equal(d["next_obs"][end0], _obs(0, 4))
    np.testing.assert_array_equal(d["next_obs"][end1], _obs(1, 3))
    np.testing.assert_array_equal(d["next_obs"][end2], _obs(2, 5))
    np.testing.assert_array_equal(d["obs"][end0 + 1], _obs(1, 0))
    np.testing.assert_array_equal(d["next_obs"][1], d["obs"][2])
    np.testing.assert_array_equal(d["rew"], np.concatenate(REWARDS))
    np.testing.assert_array_equal(d["act"][5], [1, 1])
    np.testing.assert_allclose(ds.episode_returns, [10.0, 60.0, 5.0])


def test_transition_sampling_and_normalization(handmade):
    ds = TransitionDataset(handmade, device="cpu")
    raw = np.concatenate([np.array([_obs(e, t) for t in range(n)]) for e, n in enumerate(LENGTHS)])
    mean, std = raw.mean(0), raw.std(0)
    np.testing.assert_allclose(ds.data["obs"].numpy(), (raw - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds.data["next_obs"][3].numpy(), (np.array(_obs(0, 4)) - mean) / std, rtol=1e-5)
    b1 = ds.sample(64, generator=torch.Generator().manual_seed(0))
    b2 = ds.sample(64, generator=torch.Generator().manual_seed(0))
    assert set(b1) == {"obs", "act", "rew", "next_obs", "terminal", "timeout", "done"}
    assert b1["obs"].shape == (64, 2) and b1["terminal"].dtype == torch.float32
    for k in b1:
        assert torch.equal(b1[k], b2[k])
    # every sampled row is one consistent transition: reward i belongs to observation i
    raw_obs = ds.obs_normalizer.unnormalize(b1["obs"])
    row = {tuple(np.round(o, 3)): i for i, o in enumerate(raw)}
    idx = [row[tuple(np.round(o, 3))] for o in raw_obs.numpy()]
    np.testing.assert_array_equal(b1["rew"].numpy(), np.concatenate(REWARDS)[idx])
    # a checkpointed normalizer state reproduces the same data
    again = TransitionDataset(handmade, device="cpu", normalizer_state=ds.normalizer_state())
    assert torch.equal(again.data["obs"], ds.data["obs"])


def test_sequence_windows_and_values_match_hand_computation(handmade):
    ds = SequenceDataset(handmade, horizon=3, discount=0.5, max_path_length=6, normalizer=None, device="cpu")
    # Diffuser: min(L - 1, max_path_length - horizon) windows per episode: 3, 2, 3
    assert len(ds) == 8
    assert ds.win_episode.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert ds.win_start.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    # values: discounted sum to the episode end; the terminal reward gets -100 added (ep0 only)
    expected = [
        1 + 0.5 * 2 + 0.25 * 3 + 0.125 * (4 - 100),
        2 + 0.5 * 3 + 0.25 * (4 - 100),
        3 + 0.5 * (4 - 100),
        10 + 0.5 * 20 + 0.25 * 30,
        20 + 0.5 * 30,
        1 + 0.5 + 0.25 + 0.125 + 0.0625,
        1 + 0.5 + 0.25 + 0.125,
        1 + 0.5 + 0.25,
    ]
    np.testing.assert_allclose(ds.values.numpy(), expected, rtol=1e-6)
    # window 2 (ep0, start 2) runs one step past the end: zero padding, mask 0
    w = ds[2]
    np.testing.assert_array_equal(w["obs"].numpy(), [_obs(0, 2), _obs(0, 3), [0.0, 0.0]])
    np.testing.assert_array_equal(w["act"].numpy(), [[0, 2], [0, 3], [0, 0]])
    assert w["mask"].tolist() == [1.0, 1.0, 0.0]
    w = ds[6]
    np.testing.assert_array_equal(w["obs"].numpy(), [_obs(2, 1), _obs(2, 2), _obs(2, 3)])
    assert w["mask"].tolist() == [1.0, 1.0, 1.0]
    batch = ds.sample(16, generator=torch.Generator().manual_seed(1))
    assert batch["obs"].shape == (16, 3, 2) and batch["act"].shape == (16, 3, 2)
    assert batch["values"].shape == (16,) and batch["mask"].shape == (16, 3)


def test_sequence_options(handmade):
    replace = SequenceDataset(
        handmade, horizon=3, discount=0.5, max_path_length=6, penalty_mode="replace", normalizer=None, device="cpu"
    )
    assert replace.values[2].item() == pytest.approx(3 + 0.5 * -100)
    no_pad = SequenceDataset(handmade, horizon=3, max_path_length=6, use_padding=False, normalizer=None, device="cpu")
    # min(L - 1, 6 - 3, L - 3) windows: 1, 0, 2 -- none runs past its episode
    assert no_pad.win_episode.tolist() == [0, 2, 2] and no_pad.win_start.tolist() == [0, 0, 1]
    assert bool((no_pad.sample(32)["mask"] == 1).all())
    undiscounted = SequenceDataset(
        handmade, horizon=2, discount=1.0, terminal_penalty=0.0, max_path_length=6, normalizer=None, device="cpu"
    )
    assert undiscounted.values[0].item() == pytest.approx(10.0)  # the episode return
    normed = SequenceDataset(handmade, horizon=3, max_path_length=6, device="cpu")
    raw_pad = normed.obs_normalizer.unnormalize(normed[2]["obs"][2])
    np.testing.assert_allclose(raw_pad.numpy(), [0.0, 0.0], atol=1e-5)  # padding is raw zeros, as Diffuser
    with pytest.raises(ValueError, match="max_path_length"):
        SequenceDataset(handmade, horizon=2, max_path_length=4, device="cpu")
    with pytest.raises(ValueError, match="horizon"):
        SequenceDataset(handmade, horizon=7, max_path_length=6, device="cpu")
    with pytest.raises(ValueError, match="penalty_mode"):
        SequenceDataset(handmade, horizon=2, penalty_mode="sub", device="cpu")


def test_non_finite_data_is_one_clear_error(minari_root):
    bad = [list(r) for r in REWARDS]
    bad[1][2] = float("nan")
    ds = make_handmade("test/toy/nan-v0", rewards=bad)
    with pytest.raises(ValueError, match=r"^dataset test/toy/nan-v0: 1 step with non-finite \(NaN/inf\) rewards, the first at episode 1, step 2;"):
        TransitionDataset(ds, device="cpu")


@pytest.mark.parametrize("cls", [GaussianNormalizer, MinMaxNormalizer])
def test_normalizers_invert_and_round_trip(cls, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g) * torch.tensor([1.0, 50.0, 1e-3, 0.0]) + torch.tensor([3.0, -200.0, 1.0, 7.0])
    norm = cls.fit(x)
    y = norm.normalize(x)
    torch.testing.assert_close(norm.unnormalize(y), x, rtol=1e-6, atol=1e-4)
    if cls is GaussianNormalizer:
        # float32 data: column 2 (std 1e-3 around 1) carries ~1e-4 relative rounding
        torch.testing.assert_close(y[:, :3].mean(0), torch.zeros(3), atol=1e-3, rtol=0)
        torch.testing.assert_close(y[:, :3].std(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
        assert torch.all(y[:, 3] == 0)  # a constant dimension is only centered
    else:
        torch.testing.assert_close(y[:, :3].min(0).values, -torch.ones(3))
        torch.testing.assert_close(y[:, :3].max(0).values, torch.ones(3))
        assert torch.all(y[:, 3] == -1)
    atomic_save({"normalizer": norm.state_dict()}, tmp_path / "ckpt.pt")
    restored = normalizer_from_state(load_checkpoint(tmp_path / "ckpt.pt")["normalizer"])
    assert type(restored) is cls
    assert torch.equal(restored.normalize(x), y)
    other = (MinMaxNormalizer if cls is GaussianNormalizer else GaussianNormalizer).fit(x)
    with pytest.raises(ValueError, match="cannot load"):
        other.load_state_dict(norm.state_dict())


def test_normalized_score_sources(minari_root):
    # env ids and task names use D4RL's table; x100 as papers report
    np.testing.assert_allclose(normalized_score("Hopper-v5", [-20.272305, 3234.3]), [0.0, 100.0])
    assert normalized_score("walker2d", 4592.3) == pytest.approx(100.0)
    assert normalized_score("HalfCheetah-v5", -280.178953) == pytest.approx(0.0)
    # an absent dataset id falls back to the table by its task name
    assert normalized_score("cleandiff/ant/medium-v0", 3879.7) == pytest.approx(100.0)
    # a local dataset's stored references win (this one stores 0 / 10)
    ds = make_handmade()
    assert normalized_score("test/toy/handmade-v0", 5.0) == pytest.approx(50.0)
    assert normalized_score(ds, 2.5) == pytest.approx(25.0)
    assert minari.get_normalized_score(ds, np.array(5.0)) * 100 == pytest.approx(50.0)
    with pytest.raises(ValueError, match="no reference scores"):
        normalized_score("CartPole-v1", 1.0)


def test_discounted_returns_restart_at_each_episode():
    rew = np.array([1.0, 1.0, 1.0, 2.0])
    out = discounted_returns(rew, np.array([0, 3]), np.array([3, 1]), discount=0.5)
    np.testing.assert_allclose(out, [1.75, 1.5, 1.0, 2.0])
