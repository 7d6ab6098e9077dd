"""Diffuser and Decision Diffuser on tiny data: inpainting, value guidance, inverse dynamics, odd
horizons, the sweep's network-call count and the planned-vs-executed picture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from offline_data import random_dataset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_agents import SMALL, train_config

from cleandiff_rl.agents import DecisionDiffuser, Diffuser, load_policy
from cleandiff_rl.evaluation import plan_figure, sweep, sweep_table
from cleandiff_rl.training import train

PLANNERS = ["diffuser", "decision_diffuser"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hopper_random(tmp_path_factory) -> str:
    """600 random Hopper steps (episodes of ~20-60 steps) in a module-wide Minari root."""
    root = tmp_path_factory.mktemp("minari")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root))
        random_dataset("test/hopper/random-v0", n_steps=600)
    return str(root)


@pytest.fixture(scope="module")
def trained(hopper_random, tmp_path_factory) -> dict:
    """Both planners trained for 40 updates (tiny networks); name -> checkpoint path."""
    out = tmp_path_factory.mktemp("planners")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", hopper_random)
        return {name: train(train_config(name, "test/hopper/random-v0", out / name, steps=40)) for name in PLANNERS}


@pytest.mark.parametrize("name", PLANNERS)
def test_plans_start_exactly_at_the_observation(name, trained, hopper_random, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", hopper_random)
    policy = load_policy(str(trained[name]))
    obs = torch.randn(3, 11)
    for solver in ("ddpm", "ode_dpmsolver++_2M"):
        plans = policy.sample_plans(obs, 2, solver, 4, torch.Generator().manual_seed(0))
        assert plans.shape == (6, 8, policy.x_dim)
        assert torch.equal(plans[:, 0, :11], obs.repeat_interleave(2, 0))
    figure = plan_figure(policy, seed=3)  # the env's first observation, planned from, is where the plan starts
    planned, executed = (line.get_ydata() for line in figure.axes[0].get_lines())
    assert planned[0] == pytest.approx(executed[0], abs=1e-5)


class _FirstStateCoordinate(torch.nn.Module):
    """A known value: the plan's mean first state coordinate after s_0 (guidance must raise it)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return x[:, 1:, 0].mean(1)


@pytest.mark.parametrize("solver", ["ddim", "ode_dpmsolver++_2M", "ddpm"])
def test_value_guidance_raises_the_predicted_value(solver, trained, hopper_random, monkeypatch):
    """From the same noise, plans guided by the value gradient score higher, more so with a larger w_cg."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", hopper_random)
    policy: Diffuser = load_policy(str(trained["diffuser"]))
    policy.model.classifier = value = _FirstStateCoordinate()
    prior = torch.zeros(16, 8, policy.x_dim)
    prior[:, 0, :11] = torch.randn(16, 11)
    x_T = torch.randn(16, 8, policy.x_dim)
    scores = []
    for w in (0.0, 0.5, 2.0):
        plans, log = policy.model.sample(prior, solver=solver, steps=5, x_T=x_T, w_cg=w,
                                         generator=torch.Generator().manual_seed(0))
        scores.append(float(value(plans, None).mean()))
        assert log["classifier_calls"] == (5 if w else 0)
    assert scores[0] < scores[1] < scores[2], scores
    assert scores[2] - scores[0] > 0.05, scores


def test_inverse_dynamics_beats_the_mean_action(hopper_random, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", hopper_random)
    torch.manual_seed(0)
    config = DecisionDiffuser.Config(**{**SMALL["decision_diffuser"], "inv_hidden": 128, "inv_lr": 1e-3})
    data = DecisionDiffuser.training_data("test/hopper/random-v0", config, device=torch.device("cpu"))
    agent = DecisionDiffuser(11, 3, config, device="cpu")
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        agent.update(data.sample(64, generator))
    batch = data.sample(512, generator)
    valid = batch["mask"][:, 1:] > 0
    actions = batch["act"][:, :-1][valid]
    mean_action_error = ((actions - actions.mean(0)) ** 2).mean()
    with torch.no_grad():
        assert agent.inverse_dynamics_loss(batch) < 0.7 * mean_action_error


@pytest.mark.parametrize("name, params", [
    ("diffuser", {"horizon": 6, "dim_mults": [1, 2, 4]}),
    ("decision_diffuser", {"horizon": 7, "backbone": "unet", "model_dim": 8, "dim_mults": [1, 2]}),
])
def test_unet_planners_at_horizons_that_are_not_powers_of_two(name, params, hopper_random, monkeypatch, tmp_path):
    monkeypatch.setenv("MINARI_DATASETS_PATH", hopper_random)
    cfg = train_config(name, "test/hopper/random-v0", tmp_path, steps=3, eval_every=3, eval_episodes=1,
                       **{f"algo.params.{k}": v for k, v in params.items()})
    policy = load_policy(str(train(cfg)))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert "eval/plan" in events.Tags()["images"] and "eval/score" in events.Tags()["scalars"]
    obs = np.random.default_rng(0).normal(size=(2, 11))
    actions = policy.act(obs)
    assert actions.shape == (2, 3) and np.all(np.abs(actions) <= 1.0)
    assert policy.last_plan.shape == (2, params["horizon"], 11)


@pytest.mark.slow
def test_sweep_counts_guidance_and_cfg_calls(trained, hopper_random, monkeypatch, tmp_path):
    monkeypatch.setenv("MINARI_DATASETS_PATH", hopper_random)
    diffuser, dd = (load_policy(str(trained[name])) for name in PLANNERS)
    rows = sweep(diffuser, solvers=["ddim", "ode_dpmsolver_2M"], steps=[2, 3], episodes=2, progress=False)
    # Diffuser: n_guide_steps (2) value gradients before every denoising step, as the original
    assert [(r["steps"], r["nfe"], r["guidance_calls"]) for r in rows] == [(2, 6, 4), (3, 9, 6)] * 2
    rows = sweep(dd, solvers=["ddim"], steps=[2, 3], episodes=2, out_dir=tmp_path, progress=False)
    assert [(r["nfe"], r["guidance_calls"], r["cfg_batched"]) for r in rows] == [(2, 0, True), (3, 0, True)]
    assert "one batched call per step" in sweep_table(rows)
    assert "cfg_batched" in (tmp_path / "sweep.csv").read_text().splitlines()[0]


@pytest.mark.slow
def test_benchmark_acting_times_every_pair(trained, hopper_random, tmp_path):
    """The planning-time pipeline runs on a planner checkpoint and records the network calls it timed."""
    env = {**os.environ, "MINARI_DATASETS_PATH": hopper_random, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(REPO / "pipelines" / "benchmark_acting.py"), f"checkpoint={trained['diffuser']}",
                    "solvers=[ddim,ddpm]", "steps=[2,3]", "min_seconds=0.01", "repeats=1", f"run_dir={tmp_path}"],
                   check=True, env=env, capture_output=True)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["solver"], r["steps"], r["nfe"]) for r in rows] == [("ddim", 2, 6), ("ddim", 3, 9), ("ddpm", 2, 6),
                                                                   ("ddpm", 3, 9)]
    assert all(r["ms_per_action"] > 0 for r in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", PLANNERS)
def test_planner_updates_replay_as_cuda_graphs(name):
    """Training on a GPU captures the planners' updates too: replays stay finite and keep moving the
    plan model, its EMA (after `ema_start`) and the value / inverse-dynamics nets."""
    from cleandiff_rl.agents import get_algorithm
    from cleandiff_rl.utils import CudaGraphStep

    torch.manual_seed(0)
    agent = get_algorithm(name)(11, 3, {**SMALL[name], "ema_start": 0, "ema_every": 1}, device="cuda")
    step = CudaGraphStep(agent.train_step, agent.optimizers().values())
    horizon = SMALL[name]["horizon"]
    for _ in range(6):
        batch = {"obs": torch.randn(16, horizon, 11, device="cuda"),
                 "act": torch.rand(16, horizon, 3, device="cuda") * 2 - 1,
                 "values": torch.randn(16, device="cuda"), "mask": torch.ones(16, horizon, device="cuda")}
        before = {k: v.clone() for k, v in agent.state_dict().items() if torch.is_tensor(v)}
        metrics = step(batch)
        agent.after_step()
        assert all(torch.isfinite(v) for v in metrics.values())
    moved = {k for k, v in agent.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert any("model_ema" in k for k in moved)
    assert any(k.startswith("value." if name == "diffuser" else "inverse_dynamics.") for k in moved)
