"""The D4RL-style builder (tiny Hopper-v5 build), SAC resume, atomic publishing and offline loading."""

from __future__ import annotations

import time
from pathlib import Path

import minari
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from cleandiff_rl.data import (
    LEVELS,
    TASKS,
    DatasetUnavailableError,
    SequenceDataset,
    TransitionDataset,
    build_command,
    load_dataset,
    loading,
    normalized_score,
)
from cleandiff_rl.data import sac as sac_module
from cleandiff_rl.data.builder import build_datasets, medium_checkpoint
from cleandiff_rl.utils import load_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IDS = [f"cleandiff/hopper/{level}-v0" for level in LEVELS]
HINT = "python pipelines/make_dataset.py env=hopper"


def tiny_cfg(run_dir: Path, *overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return compose("make_dataset", overrides=["make_dataset=tiny", f"run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """One tiny hopper build (300 SAC steps, 300 steps per dataset) shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(tmp / "minari"))
        summary = build_datasets(tiny_cfg(tmp / "run"))
        yield tmp, summary


def test_tiny_build_round_trips(tiny_build):
    tmp, summary = tiny_build
    assert sorted(minari.list_local_datasets()) == sorted(IDS)
    assert summary["medium_step"] == 100  # the tiny preset's target: the first checkpoint
    evals = load_checkpoint(tmp / "run" / "checkpoints" / "sac_last.pt")["record"]["evals"]
    best = max(r for _, r in evals)
    assert summary["expert_eval_return"] == best >= summary["medium_eval_return"]  # expert: the best checkpoint
    assert summary["expert_step"] == max(step for step, r in evals if r == best)
    ref_min, ref_max = TASKS["hopper"].ref_min_score, TASKS["hopper"].ref_max_score
    data = {i: load_dataset(i) for i in IDS}
    for ds_id, ds in data.items():
        level = ds_id.split("/")[-1][:-3]
        expected_steps = {"medium-replay": 100, "medium-expert": 600}.get(level, 300)
        assert ds.total_steps == summary["datasets"][ds_id]["steps"] == expected_steps
        assert ds.total_episodes == summary["datasets"][ds_id]["episodes"]
        meta = ds.storage.metadata
        assert (meta["ref_min_score"], meta["ref_max_score"]) == (ref_min, ref_max)
        assert level in meta["description"] and "SAC" in meta["algorithm_name"] and meta["code_permalink"]
        np.testing.assert_allclose(minari.get_normalized_score(ds, np.array([ref_min, ref_max])), [0.0, 1.0])
        assert normalized_score(ds_id, ref_max) == pytest.approx(100.0)
        assert ds.recover_environment().spec.id == "Hopper-v5"
        assert ds.recover_environment(eval_env=True).spec.id == "Hopper-v5"
        returns = []
        for ep in ds.iterate_episodes():
            n = len(ep.rewards)
            assert ep.observations.shape == (n + 1, 11) and ep.observations.dtype == np.float64
            assert ep.actions.shape == (n, 3) and ep.actions.dtype == np.float32
            assert np.all(np.abs(ep.actions) <= 1.0)
            # exactly one end, at the last step: a termination or a (time-limit / budget) truncation
            assert not (ep.terminations[:-1].any() or ep.truncations[:-1].any())
            assert ep.terminations[-1] != ep.truncations[-1]
            returns.append(ep.rewards.sum())
        assert np.mean(returns) == pytest.approx(summary["datasets"][ds_id]["mean_return"])

    # medium-replay is SAC's replay buffer up to the medium checkpoint, transition for transition
    replay = load_checkpoint(tmp / "run" / "checkpoints" / "sac_last.pt")["replay"]
    mr = list(data["cleandiff/hopper/medium-replay-v0"].iterate_episodes())
    np.testing.assert_array_equal(np.concatenate([e.observations[:-1] for e in mr]), replay["obs"][:100])
    np.testing.assert_array_equal(np.concatenate([e.actions for e in mr]), replay["act"][:100])
    # medium-expert is medium followed by expert
    medium = list(data["cleandiff/hopper/medium-v0"].iterate_episodes())
    expert = list(data["cleandiff/hopper/expert-v0"].iterate_episodes())
    me = list(data["cleandiff/hopper/medium-expert-v0"].iterate_episodes())
    assert len(me) == len(medium) + len(expert)
    for a, b in zip(me, medium + expert):
        np.testing.assert_array_equal(a.observations, b.observations)
    # progress artifacts: TensorBoard events, one actor snapshot per checkpoint
    assert list((tmp / "run" / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp / "run" / "policies").iterdir()) == [
        f"actor_{s:09d}.pt" for s in (0, 100, 200, 300)
    ]


def test_existing_ids_are_refused_before_training(tiny_build):
    tmp, _ = tiny_build
    with pytest.raises(FileExistsError, match="overwrite=true"):
        build_datasets(tiny_cfg(tmp / "other_run"))
    assert not (tmp / "other_run").exists()  # no SAC was started
    with pytest.raises(ValueError, match="unknown env"):
        build_datasets(tiny_cfg(tmp / "other_run", "env=humanoid"))


def test_interrupted_build_leaves_nothing_listed(tiny_build, minari_root, monkeypatch):
    tmp, _ = tiny_build  # reuses the finished SAC run: the build resumes straight to collection
    real = minari.create_dataset_from_buffers
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(kwargs["dataset_id"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(minari, "create_dataset_from_buffers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_datasets(tiny_cfg(tmp / "run"))
    assert len(calls) == 3
    assert minari.list_local_datasets() == {}
    assert [p.name for p in minari_root.iterdir() if p.name.startswith(".")] == []  # staging removed
    monkeypatch.setattr(minari, "create_dataset_from_buffers", real)
    build_datasets(tiny_cfg(tmp / "run"))
    assert sorted(minari.list_local_datasets()) == sorted(IDS)


def test_sac_resumes_after_interruption(tmp_path, monkeypatch):
    cfg = sac_module.SACConfig(
        total_steps=300, learning_starts=50, batch_size=32, checkpoint_every=100, eval_episodes=1
    )
    real_evaluate, evals = sac_module.evaluate, []

    def crash_at_second_eval(*args, **kwargs):
        evals.append(1)
        if len(evals) == 2:
            raise KeyboardInterrupt  # killed at step 200, before that checkpoint
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(sac_module, "evaluate", crash_at_second_eval)
    with pytest.raises(KeyboardInterrupt):
        sac_module.train_sac("Hopper-v5", cfg, tmp_path, seed=3, device="cpu")
    ck = load_checkpoint(tmp_path / "checkpoints" / "sac_last.pt")
    assert ck["step"] == 100 and ck["replay"]["size"] == 100
    monkeypatch.setattr(sac_module, "evaluate", real_evaluate)
    record = sac_module.train_sac("Hopper-v5", cfg, tmp_path, seed=3, device="cpu")
    assert [s for s, _ in record["evals"]] == [100, 200, 300]
    assert record["replay"]["size"] == 300
    np.testing.assert_array_equal(record["replay"]["obs"][:100], ck["replay"]["obs"])
    # the interrupted episode is closed at the resume point (its env state was not saved)
    assert record["replay"]["truncated"][99] or record["replay"]["terminated"][99]
    with pytest.raises(ValueError, match="cannot continue"):
        sac_module.train_sac("Hopper-v5", cfg, tmp_path, seed=4, device="cpu")


def test_sac_evaluates_on_its_own_grid_and_stops_at_the_first_evaluation_reaching_the_target(tmp_path):
    """`eval_every` (the grid `medium` is chosen on) is finer than the resume checkpoints; a stop at the
    target saves the resume state there, and the run continues from it."""
    cfg = sac_module.SACConfig(total_steps=200, learning_starts=40, batch_size=32, checkpoint_every=100,
                               eval_every=50, eval_episodes=1)
    record = sac_module.train_sac("Hopper-v5", cfg, tmp_path, seed=3, device="cpu", stop_return=-1e9)
    assert [s for s, _ in record["evals"]] == [50]
    assert load_checkpoint(tmp_path / "checkpoints" / "sac_last.pt")["step"] == 50
    record = sac_module.train_sac("Hopper-v5", cfg, tmp_path, seed=3, device="cpu")
    assert [s for s, _ in record["evals"]] == [50, 100, 150, 200]
    assert sorted(record["snapshots"]) == [0, 50, 100, 150, 200] and record["replay"]["size"] == 200


def test_sac_is_reproducible(tmp_path):
    cfg = sac_module.SACConfig(
        total_steps=120, learning_starts=50, batch_size=32, checkpoint_every=120, eval_episodes=1
    )
    a = sac_module.train_sac("Hopper-v5", cfg, tmp_path / "a", seed=5, device="cpu")
    b = sac_module.train_sac("Hopper-v5", cfg, tmp_path / "b", seed=5, device="cpu")
    np.testing.assert_array_equal(a["replay"]["obs"], b["replay"]["obs"])
    np.testing.assert_array_equal(a["replay"]["act"], b["replay"]["act"])
    assert a["evals"] == b["evals"]


def test_sac_fast_paths_change_no_numbers(tmp_path):
    """SAC's updates go through `optimizer_step` (fused Adam on the CPU): with the fast paths on or off the
    agent ends with the same weights and collected the same transitions, to float rounding."""
    from cleandiff_rl.utils import fast_paths, load_checkpoint

    cfg = sac_module.SACConfig(total_steps=120, learning_starts=40, batch_size=32, checkpoint_every=120,
                               eval_episodes=1)
    runs = {}
    for enabled in (True, False):
        with fast_paths(enabled):
            runs[enabled] = sac_module.train_sac("Hopper-v5", cfg, tmp_path / str(enabled), seed=3, device="cpu")
    # Fused and unfused Adam round differently, and the difference grows through the data each policy
    # collects: up to 1.4e-4 in actions and 1.4e-5 in weights after 80 updates on one machine, 1e-5 on
    # another. One Adam step moves a weight by about lr (3e-4), so a wrong update still fails these bounds.
    np.testing.assert_allclose(runs[True]["replay"]["act"], runs[False]["replay"]["act"], atol=1e-3)
    fast, slow = (load_checkpoint(tmp_path / str(e) / "checkpoints" / "sac_last.pt") for e in (True, False))
    for net in ("actor", "qf1", "qf2_target"):
        for key, value in fast[net].items():
            torch.testing.assert_close(value, slow[net][key], rtol=1e-3, atol=1e-4)
    assert not torch.equal(fast["qf1"]["net.0.weight"], fast["qf1_target"]["net.0.weight"])  # the updates ran


def test_sac_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    actor = sac_module.Actor(4, 2, 16, np.array([-2.0, -1.0]), np.array([2.0, 3.0]))
    obs = torch.randn(64, 4)
    torch.manual_seed(1)
    action, log_prob, _ = actor.sample(obs)
    torch.manual_seed(1)
    mean, log_std = actor(obs)
    normal = torch.distributions.Normal(mean, log_std.exp())
    u = normal.rsample()
    expected = (normal.log_prob(u) - torch.log(actor.scale * (1 - torch.tanh(u) ** 2) + 1e-6)).sum(-1)
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(action, torch.tanh(u) * actor.scale + actor.bias)
    assert bool(((action >= actor.bias - actor.scale) & (action <= actor.bias + actor.scale)).all())


def _assert_fast_build_hint(dataset_id: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as err:
        load_dataset(dataset_id)
    assert time.perf_counter() - t0 < 5.0
    msg = str(err.value)
    assert HINT in msg and "cleandiff/hopper/medium-replay-v0" in msg and "cleandiff/hopper/medium-expert-v0" in msg


def test_offline_load_fails_fast_with_build_hint(minari_root, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("minari's download must not be attempted offline")

    monkeypatch.setattr(minari.storage.hosting, "download_dataset", no_download)
    real_find_spec = loading.importlib.util.find_spec

    # 1) minari's hf extra is missing
    monkeypatch.setattr(
        loading.importlib.util, "find_spec", lambda n, *a: None if n == "huggingface_hub" else real_find_spec(n, *a)
    )
    _assert_fast_build_hint("cleandiff/hopper/medium-v0")

    # 2) the extra is installed but the network is a black hole: the probe gives up after its timeout
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda n, *a: object())

    def black_hole(address, timeout=None, *args, **kwargs):
        time.sleep(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(loading.socket, "create_connection", black_hole)
    _assert_fast_build_hint("cleandiff/hopper/medium-v0")
    assert not (minari_root / "cleandiff").exists()

    # 3) the network answers but minari's download fails (unknown remote id): same hint
    class Conn:
        def close(self):
            pass

    monkeypatch.setattr(loading.socket, "create_connection", lambda *a, **k: Conn())
    monkeypatch.setattr(loading.minari, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("404")))
    _assert_fast_build_hint("cleandiff/hopper/expert-v0")


def test_bad_ids_and_hints(tmp_path, monkeypatch):
    root = tmp_path / "fresh_root"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    for bad in ("hopper-medium", "cleandiff/hopper/medium", "cleandiff/hopper/medium-vX", "../x-v0"):
        with pytest.raises(ValueError, match="malformed dataset id"):
            load_dataset(bad)
    assert not root.exists()  # nothing written for a malformed id
    with pytest.raises(DatasetUnavailableError, match="cannot build this id"):
        load_dataset("D4RL/door/human-v2", download=False)
    assert build_command("cleandiff/walker2d/medium-expert-v0") == "python pipelines/make_dataset.py env=walker2d"
    assert (
        build_command("mujoco/ant/expert-v2") == "python pipelines/make_dataset.py env=ant namespace=mujoco version=2"
    )
    assert build_command("cleandiff/hopper/simple-v0") is None


def test_local_dataset_loads_without_network(tiny_build, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a local dataset must not touch the network")

    monkeypatch.setattr(loading.socket, "create_connection", no_network)
    ds = load_dataset("cleandiff/hopper/expert-v0")
    assert ds.spec.dataset_id == "cleandiff/hopper/expert-v0" and ds.total_steps == 300


def test_torch_datasets_on_built_data(tiny_build):
    episodes = list(load_dataset("cleandiff/hopper/medium-expert-v0").iterate_episodes())
    data = TransitionDataset("cleandiff/hopper/medium-expert-v0", device="cpu")
    assert len(data) == 600 and data.obs_dim == 11 and data.act_dim == 3
    assert data.data["terminal"].sum().item() == sum(bool(e.terminations[-1]) for e in episodes)
    assert data.data["timeout"].sum().item() == sum(bool(e.truncations[-1]) for e in episodes)
    seq = SequenceDataset("cleandiff/hopper/medium-expert-v0", horizon=8, device="cpu")
    batch = seq.sample(5)
    assert batch["obs"].shape == (5, 8, 11) and batch["act"].shape == (5, 8, 3) and batch["values"].shape == (5,)


def test_a_build_without_expert_levels_stops_sac_at_medium(tmp_path, monkeypatch):
    """SAC ends at the first checkpoint that reaches the medium target when no level needs the expert."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    summary = build_datasets(tiny_cfg(tmp_path / "run", "levels=[medium,medium-replay]"))
    record = load_checkpoint(tmp_path / "run" / "checkpoints" / "sac_last.pt")
    assert record["step"] == summary["medium_step"] == 100 and [s for s, _ in record["record"]["evals"]] == [100]
    assert summary["datasets"]["cleandiff/hopper/medium-replay-v0"]["steps"] == 100


def test_medium_is_the_checkpoint_closest_to_the_target_around_where_sac_first_reaches_it():
    jump = [(10_000, 231.0), (70_000, 1058.9), (80_000, 1060.1), (90_000, 2680.4), (100_000, 1075.0)]
    assert medium_checkpoint(jump, 1078.1) == (80_000, 1060.1)  # not 90k's 2680, nor the later 100k
    assert medium_checkpoint([(10, 900.0), (20, 1100.0)], 1078.1) == (20, 1100.0)
    assert medium_checkpoint([(100, 5.0), (200, 3.0)], -1e9) == (100, 5.0)  # the tiny preset: the first
    with pytest.warns(UserWarning, match="no SAC checkpoint reached the medium target"):
        assert medium_checkpoint([(10, 300.0), (20, 500.0), (30, 400.0)], 1078.1) == (20, 500.0)
