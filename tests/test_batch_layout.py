"""Batches from a user's own loader: (B, 1) rewards, terminals and values (CORL's, d3rlpy's layout) train
exactly as (B,) do, and any other shape is one clear error naming the key, its shape and the expected one."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from offline_data import random_dataset

from cleandiff_rl.agents import ALGORITHMS, get_algorithm
from cleandiff_rl.agents.planning import Planner
from cleandiff_rl.data import TransitionDataset
from cleandiff_rl.training import compose_config, train

OBS, ACT, ROWS = 5, 2, 16
SMALL = {  # tiny networks: a few updates take milliseconds
    "bc": {"hidden_dim": 16},
    "diffusion_bc": {"hidden_dim": 16, "bc_updates": 1},
    "dql": {"hidden_dim": 16, "critic_hidden": 16},
    "edp": {"hidden_dim": 16, "critic_hidden": 16, "sampling_steps": 5},
    "idql": {"hidden_dim": 16, "critic_hidden": 16},
    "fql": {"hidden_dim": 16},
    "dac": {"hidden_dim": 16, "critic_hidden": 16},
    "diffuser": {"horizon": 8, "model_dim": 16, "dim_mults": [1, 2]},
    "decision_diffuser": {"horizon": 4, "d_model": 16, "n_heads": 2, "depth": 1, "inv_hidden": 16},
}
POLICIES = [name for name, cls in ALGORITHMS.items() if not issubclass(cls, Planner)]
PLANNERS = [name for name, cls in ALGORITHMS.items() if issubclass(cls, Planner)]
PER_SAMPLE = {"rew", "terminal", "values"}  # the keys a user's loader may shape (B, 1)


def make(algo: str):
    torch.manual_seed(0)
    return get_algorithm(algo)(OBS, ACT, SMALL[algo], device="cpu")


def batch_for(agent, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random batch in the (B,) layout, B = ROWS per batch the agent takes per step."""
    g = torch.Generator().manual_seed(seed)
    rows = ROWS * agent.batches_per_step
    if isinstance(agent, Planner):
        horizon = agent.config.horizon
        mask = torch.ones(rows, horizon)
        mask[::3, -1] = 0.0  # some windows run past their episode's end
        return {"obs": torch.randn(rows, horizon, OBS, generator=g),
                "act": torch.rand(rows, horizon, ACT, generator=g) * 2 - 1,
                "values": torch.randn(rows, generator=g) * 10, "mask": mask}
    return {"obs": torch.randn(rows, OBS, generator=g), "act": torch.rand(rows, ACT, generator=g) * 2 - 1,
            "rew": torch.randn(rows, generator=g), "next_obs": torch.randn(rows, OBS, generator=g),
            "terminal": (torch.rand(rows, generator=g) < 0.3).float()}


def as_columns(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value[:, None] if key in PER_SAMPLE else value for key, value in batch.items()}


def updates(agent, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    torch.manual_seed(2)  # the same noise draws for both layouts
    return [agent.update(batch) for batch in batches]


@pytest.mark.parametrize("algo", POLICIES + PLANNERS)
def test_column_rewards_terminals_and_values_train_exactly_as_flat_ones(algo):
    flat, column = make(algo), make(algo)
    batches = [batch_for(flat, seed) for seed in (1, 2, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no broadcasting warning either
        flat_metrics, column_metrics = updates(flat, batches), updates(column, [as_columns(b) for b in batches])
    assert flat_metrics == column_metrics  # every loss, to the last bit
    for key, value in flat.state_dict().items():
        torch.testing.assert_close(column.state_dict()[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert flat.updates == 3


@pytest.mark.parametrize("algo", ["dql", "edp", "idql", "fql"])
def test_the_check_is_what_keeps_a_column_from_broadcasting(algo):
    """Passed to `train_step` unchecked, a (B, 1) reward broadcasts the TD target to (B, B) and the critic
    loss changes; through `update` it is the flat batch's loss."""
    loss = "critic/loss"
    checked, unchecked = make(algo), make(algo)
    batch = batch_for(checked)
    torch.manual_seed(2)
    right = checked.update(as_columns(batch))[loss]
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's broadcasting warning, all a user saw of it
        wrong = float(unchecked.train_step(as_columns(batch))[loss])
    assert abs(wrong - right) > 1e-4 * abs(right), (wrong, right)


@pytest.mark.parametrize("algo", POLICIES)
@pytest.mark.parametrize("key,shape,expected", [  # B: the rows of the agent's batch
    ("rew", ("B", 2), "(B,) or (B, 1)"),
    ("terminal", (1, "B"), "(B,) or (B, 1)"),
    ("rew", ("B", 1, 1), "(B,) or (B, 1)"),
    ("obs", ("B", OBS + 1), f"(B, {OBS})"),
    ("next_obs", ("B-1", OBS), f"(B, {OBS})"),
    ("act", ("B", ACT, 1), f"(B, {ACT})"),
])
def test_any_other_policy_batch_shape_is_one_clear_error(algo, key, shape, expected):
    agent = make(algo)
    before = copy.deepcopy(agent.state_dict())
    batch = batch_for(agent)
    rows = len(batch["obs"])
    shape = tuple({"B": rows, "B-1": rows - 1}.get(size, size) for size in shape)
    batch[key] = torch.zeros(shape)
    with pytest.raises(ValueError) as error:
        agent.update(batch)
    assert str(error.value) == (f"batch[{key!r}] has shape {shape}; {algo} expects {expected.replace('B', str(rows))} "
                                f"(B = {rows}, the rows of batch['obs'])")
    assert agent.updates == 0
    torch.testing.assert_close(agent.state_dict(), before, rtol=0, atol=0, equal_nan=True)  # refused before any step


@pytest.mark.parametrize("algo", PLANNERS)
def test_any_other_planner_batch_shape_is_one_clear_error(algo):
    agent = make(algo)
    horizon = agent.config.horizon
    for key, shape, expected in (("values", (ROWS, 3), f"({ROWS},) or ({ROWS}, 1)"),
                                 ("obs", (ROWS, horizon + 1, OBS), f"({ROWS}, {horizon}, {OBS})"),
                                 ("act", (ROWS, ACT), f"({ROWS}, {horizon}, {ACT})"),
                                 ("mask", (ROWS, horizon, 1), f"({ROWS}, {horizon})")):
        batch = batch_for(agent)
        batch[key] = torch.zeros(shape)
        with pytest.raises(ValueError, match=rf"^batch\['{key}'\] has shape \({shape[0]}, .*; {algo} expects "
                                             rf"{expected.replace('(', '[(]').replace(')', '[)]')} \(B = {ROWS}"):
            agent.update(batch)


def test_missing_keys_numpy_values_and_uneven_batches_are_refused():
    dql, bc = make("dql"), make("bc")
    batch = batch_for(dql)
    with pytest.raises(ValueError, match=r"^the dql batch has no \['rew', 'terminal'\]; train_step reads"):
        dql.update({key: value for key, value in batch.items() if key not in ("rew", "terminal")})
    assert bc.update({"obs": batch["obs"], "act": batch["act"]})["actor/bc_loss"] > 0  # BC reads obs and act alone
    with pytest.raises(ValueError, match=r"^batch\['rew'\] is a ndarray; train_step takes torch tensors"):
        dql.update({**batch, "rew": batch["rew"].numpy()})
    stacked = make("diffusion_bc")  # 1 + bc_updates = 2 batches per step, stacked
    with pytest.raises(ValueError, match=rf"^batch\['obs'\] has {2 * ROWS + 1} rows; diffusion_bc takes a positive "
                                         "multiple of its 2 batches per step"):
        stacked.update({key: torch.cat([value, value[:1]]) for key, value in batch_for(stacked).items()})


def test_bool_terminals_train_as_float_ones():
    flat, boolean = make("fql"), make("fql")
    batch = batch_for(flat)
    assert updates(flat, [batch]) == updates(boolean, [{**batch, "terminal": batch["terminal"].bool()}])


def test_the_training_loop_checks_its_batches_too(minari_root, tmp_path, monkeypatch):
    """`train` calls `train_step` directly (a CUDA graph captures it): a data set whose batches hold
    (B, 1) rewards and terminals trains exactly as the flat ones."""
    random_dataset("test/hopper/random-v0", n_steps=200)

    def run(folder: str) -> dict:
        overrides = ["algo=fql", "dataset=test/hopper/random-v0", "steps=3", "batch_size=16", "eval_every=0",
                     "device=cpu", "algo.params.hidden_dim=16", f"run_dir={tmp_path / folder}"]
        return torch.load(train(compose_config(overrides)), weights_only=True)["model"]

    flat = run("flat")
    sample = TransitionDataset.sample
    monkeypatch.setattr(TransitionDataset, "sample", lambda self, *args: as_columns(sample(self, *args)))
    column = run("column")
    torch.testing.assert_close(column, flat, rtol=0, atol=0, equal_nan=True)
    monkeypatch.setattr(TransitionDataset, "sample", lambda self, *args: {**sample(self, *args), "rew": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"^batch\['rew'\] has shape \(2,\); fql expects \(16,\) or \(16, 1\)"):
        run("wrong")
