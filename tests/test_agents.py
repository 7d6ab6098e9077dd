"""Policies end to end on tiny datasets: training, checkpoints, resume, acting, clear errors."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from offline_data import PENDULUM_ENV_ID, RANDOM_PENDULUM_RETURN, pendulum_dataset, random_dataset

import cleandiff_rl
from cleandiff_rl.agents import ALGORITHMS, Agent, get_algorithm, load_policy
from cleandiff_rl.agents.acting import select
from cleandiff_rl.agents.idql import expectile_weights
from cleandiff_rl.agents.planning import Planner
from cleandiff_rl.benchmarking import algo_overrides, lr_overrides, report_page, resolve_datasets, suite_table
from cleandiff_rl.data import normalized_score, read_episodes
from cleandiff_rl.diffusion import DiffusionModel
from cleandiff_rl.diffusion.solvers import get_solver
from cleandiff_rl.evaluation import evaluate
from cleandiff_rl.training import compose_config, train
from cleandiff_rl.utils import load_checkpoint

SMALL = {  # tiny networks, so each test trains in seconds
    "bc": {"hidden_dim": 32},
    "diffusion_bc": {"hidden_dim": 32},
    "dql": {"hidden_dim": 32, "critic_hidden": 32, "num_candidates": 4},
    "edp": {"hidden_dim": 32, "critic_hidden": 32, "num_candidates": 4, "sampling_steps": 5},
    "idql": {"hidden_dim": 32, "critic_hidden": 32, "num_candidates": 4},
    "fql": {"hidden_dim": 32},
    "dac": {"hidden_dim": 32, "critic_hidden": 32, "num_candidates": 4},
    "diffuser": {"horizon": 8, "model_dim": 16, "dim_mults": [1, 2], "num_candidates": 4, "sampling_steps": 5},
    "decision_diffuser": {"horizon": 8, "d_model": 32, "n_heads": 2, "depth": 1, "inv_hidden": 32,
                          "sampling_steps": 5},
}
POLICIES = [name for name, cls in ALGORITHMS.items() if not issubclass(cls, Planner)]


def train_config(algo: str, dataset: str, run_dir, steps: int, **extra):
    overrides = [f"algo={algo}", f"dataset={dataset}", f"steps={steps}", "batch_size=64", "eval_every=0",
                 "log_every=5", "device=cpu", f"run_dir={run_dir}", f"checkpoint_every={extra.pop('every', steps)}"]
    overrides += [f"algo.params.{k}={v}" for k, v in SMALL[algo].items()]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return compose_config(overrides)


@pytest.fixture
def hopper_random(minari_root) -> str:
    random_dataset("test/hopper/random-v0", n_steps=600)
    return "test/hopper/random-v0"


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_train_save_load_act_round_trip(algo, hopper_random, tmp_path, monkeypatch):
    """The policy load_policy rebuilds from train's checkpoint is the agent train left in memory: the same
    weights, buffers, normalizer, action bounds and settings, so the same actions, for single and batch obs."""
    saved: list[Agent] = []
    save = Agent.save
    monkeypatch.setattr(Agent, "save", lambda self, path, **extra: saved.append(self) or save(self, path, **extra))
    path = train(train_config(algo, hopper_random, tmp_path / algo, steps=12))
    trained = saved[-1]
    state = load_checkpoint(path)
    assert state["step"] == 12 and state["algo"] == algo and state["env_id"] == "Hopper-v5"
    assert (tmp_path / algo / "tb").is_dir()
    policy = cleandiff_rl.load_policy(str(path))
    assert policy is not trained and type(policy) is type(trained) and policy.config == trained.config
    assert policy.updates == trained.updates == 12 and policy.action_bounds == trained.action_bounds
    obs = np.random.default_rng(0).normal(size=(3, 11)) * 5  # raw observations: the normalizer matters
    first = policy.act(obs, generator=torch.Generator().manual_seed(1))
    assert first.shape == (3, 3) and first.dtype == np.float32
    np.testing.assert_array_equal(first, trained.act(obs, generator=torch.Generator().manual_seed(1)))
    single = policy.act(obs[0], generator=torch.Generator().manual_seed(1))
    assert single.shape == (3,) and np.all(np.abs(single) <= 1.0)
    trained_state = trained.state_dict()
    assert policy.state_dict().keys() == trained_state.keys()
    for key, value in policy.state_dict().items():
        torch.testing.assert_close(value, trained_state[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_to_moves_every_tensor_the_policy_acts_with(algo):
    """`.to(device)` moves weights, the observation normalizer and the action bounds, so a policy built on
    one device acts on another (meta stands in for a GPU: it checks placement, not arithmetic)."""
    normalizer = {"kind": "gaussian", "shift": torch.zeros(11), "scale": torch.ones(11)}
    policy = get_algorithm(algo)(11, 3, SMALL[algo], obs_normalizer=normalizer,
                                 action_bounds=(-np.ones(3), np.ones(3)), device="cpu").to("meta")
    tensors = [*policy.parameters(), *policy.buffers(), policy.obs_normalizer.shift, policy.obs_normalizer.scale]
    assert policy.device.type == "meta" and {t.device.type for t in tensors} == {"meta"}
    assert policy.state_dict().keys() == get_algorithm(algo)(11, 3, SMALL[algo], device="cpu").state_dict().keys()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_policy_moved_to_cuda_acts_like_one_built_there(hopper_random, tmp_path):
    path = train(train_config("dql", hopper_random, tmp_path / "dql", steps=12))
    obs = np.random.default_rng(0).normal(size=(3, 11))
    moved = load_policy(str(path), "cpu", solver="ddim", temperature=0).to("cuda")
    built = load_policy(str(path), "cuda", solver="ddim", temperature=0)
    np.testing.assert_allclose(moved.act(obs), built.act(obs), atol=1e-6)


# dac: 12 updates from the original's init put every candidate on one corner of the box: argmax ignores the draw
@pytest.mark.parametrize("algo", [name for name in ALGORITHMS if name not in ("bc", "dac")])
def test_temperature_zero_with_an_ode_solver_acts_deterministically(algo, hopper_random, tmp_path):
    """From the mean of the noise, ddim maps an observation to one action whatever the generator draws;
    at temperature 1 the same policy's actions depend on the draw."""
    path = train(train_config(algo, hopper_random, tmp_path / algo, steps=12))
    obs = np.random.default_rng(0).normal(size=(3, 11))
    policy = load_policy(str(path), solver="ddim", temperature=0)  # each at its paper's acting
    first, second = (policy.act(obs, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2))
    np.testing.assert_array_equal(first, second)
    policy.set_sampling(temperature=1.0)
    third = policy.act(obs, generator=torch.Generator().manual_seed(2))
    assert np.abs(third - second).max() > 1e-3


@pytest.mark.parametrize("algo", ["dql", "edp", "idql", "fql", "dac"])
def test_resume_continues_exactly(algo, hopper_random, tmp_path):
    """Stopping at step 10 and rerunning to 20 gives the same weights as one run of 20 steps."""
    train(train_config(algo, hopper_random, tmp_path / "a", steps=10))
    resumed = load_checkpoint(train(train_config(algo, hopper_random, tmp_path / "a", steps=20)))
    straight = load_checkpoint(train(train_config(algo, hopper_random, tmp_path / "b", steps=20, every=10)))
    assert resumed["step"] == straight["step"] == 20
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)


def test_rerunning_a_finished_training_trains_nothing_and_logs_nothing(hopper_random, tmp_path, capsys):
    path = train(train_config("bc", hopper_random, tmp_path / "bc", steps=10))
    events, written = sorted((tmp_path / "bc" / "tb").iterdir()), path.stat().st_mtime_ns
    assert train(train_config("bc", hopper_random, tmp_path / "bc", steps=10)) == path
    assert "already holds 10 updates (steps=10): nothing to train" in capsys.readouterr().out
    assert sorted((tmp_path / "bc" / "tb").iterdir()) == events and path.stat().st_mtime_ns == written


def test_diffusion_bc_beats_random_on_inverted_pendulum(minari_root, tmp_path):
    """Cloning a scripted balancing controller for a short run balances far longer than random actions."""
    pendulum_dataset("test/pendulum/expert-v0", n_steps=3000)
    cfg = train_config("diffusion_bc", "test/pendulum/expert-v0", tmp_path / "dbc", steps=600, batch_size=256)
    policy = load_policy(str(train(cfg)))
    assert policy.env_id == PENDULUM_ENV_ID
    result = evaluate(policy, episodes=3, seed=0)
    assert result["return_mean"] > 20 * RANDOM_PENDULUM_RETURN, result["returns"]
    assert result["nfe"] == policy.steps == 5


def test_losses_fall(minari_root):
    """Each policy's training losses drop over 150 updates on the pendulum data."""
    from cleandiff_rl.data import TransitionDataset

    pendulum_dataset("test/pendulum/expert-v0", n_steps=2000)
    data = TransitionDataset("test/pendulum/expert-v0", device="cpu")
    env_actions = data.data["act"]
    torch.manual_seed(0)
    for name in POLICIES:
        agent = ALGORITHMS[name](4, 1, SMALL[name], action_bounds=([-3.0], [3.0]), device="cpu")
        data.data["act"] = agent.normalize_action(env_actions)
        agent.prepare(data)
        gen = torch.Generator().manual_seed(0)
        key = "flow/bc_loss" if name == "fql" else "actor/bc_loss"
        history = [agent.update(data.sample(128, gen))[key] for _ in range(150)]
        assert np.mean(history[-20:]) < 0.7 * np.mean(history[:5]), (name, history[:5], history[-20:])


def test_fql_distils_the_flow_into_a_one_step_actor_that_acts_in_one_call(minari_root):
    """FQL's one-step actor learns the BC flow's ODE map (noise -> action) while the flow learns the data;
    `act` then makes one network call, recorded as 1 NFE, and `acting: flow` samples the flow instead."""
    from cleandiff_rl.data import TransitionDataset
    from cleandiff_rl.evaluation import network_calls

    pendulum_dataset("test/pendulum/expert-v0", n_steps=2000)
    data = TransitionDataset("test/pendulum/expert-v0", device="cpu")
    torch.manual_seed(0)
    agent = get_algorithm("fql")(4, 1, {**SMALL["fql"], "alpha": 100.0}, action_bounds=([-3.0], [3.0]),
                                 device="cpu")
    data.data["act"] = agent.normalize_action(data.data["act"])
    gen = torch.Generator().manual_seed(0)
    history = [agent.update(data.sample(128, gen)) for _ in range(300)]
    distill = [m["actor/distill_loss"] for m in history]
    assert np.mean(distill[-20:]) < 0.3 * np.max(distill[:20]), (distill[:5], distill[-5:])
    batch = data.sample(256, gen)
    noise = torch.randn(256, 1, generator=gen)
    with torch.no_grad():
        teacher, _ = agent.flow.sample(torch.zeros(256, 1), solver="ddim", steps=10, x_T=noise * 0.99,
                                       condition_cfg=batch["obs"])
        gap = (agent.one_step(batch["obs"], noise) - teacher.clamp(-1, 1)).abs().mean().item()
    assert gap < 0.1 * teacher.std().item() + 0.05, gap

    calls = {"actor": 0, "flow": 0}
    agent.actor.register_forward_hook(lambda *_: calls.__setitem__("actor", calls["actor"] + 1))
    agent.flow.model_ema["diffusion"].register_forward_hook(lambda *_: calls.__setitem__("flow", calls["flow"] + 1))
    agent.act(np.zeros((5, 4)))
    assert calls == {"actor": 1, "flow": 0} and network_calls(agent)["nfe"] == 1
    agent.config.acting = "flow"
    assert agent.is_diffusion
    agent.act(np.zeros((5, 4)), solver="ode_dpmsolver++_2M", steps=3)
    assert calls == {"actor": 1, "flow": 3} and network_calls(agent)["nfe"] == 3

    agent.with_settings({"acting": "onestep", "selection": "argmax", "num_candidates": 8})  # best of 8: one batched call
    obs = torch.randn(3, 4)
    picked = agent.act(obs.numpy(), generator=torch.Generator().manual_seed(1))
    assert calls["actor"] == 2 and network_calls(agent)["nfe"] == 1 and agent.obs_normalizer is None
    noise = torch.randn(24, 1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        obs_rep = obs.repeat_interleave(8, 0)  # this agent has no observation normalizer
        candidates = agent.one_step(obs_rep, noise)
        q = sum(agent.critic(obs_rep, candidates)).view(3, 8)
    best = agent.unnormalize_action(candidates.view(3, 8, 1)[torch.arange(3), q.argmax(-1)])
    assert np.allclose(picked, best.numpy(), atol=1e-6) and q.std(-1).min() > 0


def test_fql_distillation_pulls_back_an_actor_output_outside_the_action_box():
    """The clip to [-1, 1] passes no gradient outside the box, so FQL distils the actor's unclipped output
    (as the original): an actor whose output has left the box is still pulled back toward its teacher."""
    torch.manual_seed(0)
    agent = get_algorithm("fql")(4, 1, {**SMALL["fql"], "alpha": 100.0}, device="cpu")
    with torch.no_grad():
        agent.actor[-1].bias.fill_(5.0)  # every mu(s, z) far above the box, where Q sees 1.0
    batch = {"obs": torch.randn(64, 4), "act": torch.rand(64, 1) * 2 - 1, "rew": torch.randn(64),
             "next_obs": torch.randn(64, 4), "terminal": torch.zeros(64)}
    before = agent.actor[-1].bias.item()
    for _ in range(5):
        agent.update(batch)
    assert agent.actor[-1].bias.item() < before - 4 * agent.config.lr, (before, agent.actor[-1].bias.item())


def test_fql_checkpoint_sweeps_its_flow_policy_and_a_rerun_replaces_the_sweep_logs(hopper_random, tmp_path):
    """An FQL checkpoint acts in one step (evaluate: nfe 1); the sweep needs `acting: flow` (refused without
    it, writing nothing) and then counts the flow's calls; sweeping again into the same folder leaves one TensorBoard event file."""
    from cleandiff_rl.evaluation import sweep_checkpoint

    path = train(train_config("fql", hopper_random, tmp_path / "fql", steps=12))
    assert evaluate(load_policy(str(path)), episodes=2)["nfe"] == 1
    with pytest.raises(ValueError, match="settings.acting=flow"):
        sweep_checkpoint(path, tmp_path / "sweep", tmp_path / "sweep" / "tb", episodes=1, progress=False)
    assert not (tmp_path / "sweep").exists()  # refused before anything is written
    for _ in range(2):
        rows = sweep_checkpoint(path, tmp_path / "sweep", tmp_path / "sweep" / "tb", settings={"acting": "flow"},
                                solvers=["ddim", "heun"], steps=[2], episodes=1, progress=False)
        assert [row["nfe"] for row in rows] == [2, 3]
    assert len(list((tmp_path / "sweep" / "tb").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("algo,nfe", [("dql", 2), ("idql", 1)])
def test_distill_pipeline_writes_a_student_that_acts_in_nfe_calls_per_candidate(algo, nfe, hopper_random, tmp_path):
    """pipelines/distill.py: the student checkpoint is the parent (critic, selection, normalizer) with its
    behavior model replaced, acting with DDIM at `nfe` steps; parent and student are evaluated alike."""
    path = train(train_config(algo, hopper_random, tmp_path / algo, steps=12, **{"algo.params.selection": "auto"}))
    out = tmp_path / "distilled"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = Path(__file__).resolve().parents[1] / "pipelines" / "distill.py"
    subprocess.run([sys.executable, str(script), f"checkpoint={path}", f"nfe={nfe}", "updates=20", "batch_size=32",
                    "episodes=2", "device=cpu", f"run_dir={out}"], check=True, env=env, capture_output=True)
    result = json.loads((out / "evaluation.json").read_text())
    assert result["parent"]["nfe"] == 5 and result["student"]["nfe"] == nfe
    student, parent = load_policy(str(out / "checkpoint.pt")), load_policy(str(path))
    assert (student.solver, student.steps) == ("ddim", nfe) and student.name == algo
    # `auto`'s choice is the parent's, fixed in the student's settings: it decides nothing of its own
    assert parent.chosen_settings() and not student.chosen_settings()
    # and it learned the teacher's map at the noise it acts from (zero where the parent acts at its mode)
    assert result["temperature"] == (0.0 if parent.chosen_settings()["selection"] == "mode" else parent.config.temperature)
    assert student.act_settings() == parent.with_settings(parent.chosen_settings()).set_sampling("ddim", nfe).act_settings()
    critic = "critic" if algo == "dql" else "value"
    for key, value in parent.state_dict().items():
        if key.startswith(critic):
            torch.testing.assert_close(student.state_dict()[key], value, rtol=0, atol=0)
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in parent.state_dict().items()
               if "actor" in k and torch.is_tensor(v))
    bad = subprocess.run([sys.executable, str(script), f"checkpoint={train(train_config('bc', hopper_random, tmp_path / 'bc', steps=2))}",
                          f"run_dir={tmp_path / 'bad'}"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "distill needs a policy that samples a diffusion actor" in bad.stderr
    assert not (tmp_path / "bad").exists()
    bad = subprocess.run([sys.executable, str(script), f"checkpoint={path}", "temperature=-1", f"run_dir={tmp_path / 'bad'}"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "temperature=-1 is out of range" in bad.stderr and not (tmp_path / "bad").exists()


def test_dql_q_loss_only_reaches_levels_the_bc_loss_trains():
    """DQL's Q loss backpropagates through the sampler's network calls. Each call's time must be one the
    BC loss trains, else the Q term rewrites the network there unopposed (with continuous time the
    hopper-medium actor collapsed to a corner of the action box at 5 steps, yet was fine at 4)."""
    agent = get_algorithm("dql")(5, 2, device="cpu")
    cfg = agent.config
    levels, _ = agent.actor.plan(get_solver(cfg.solver), cfg.sampling_steps, "uniform")
    called = {level.t for level in levels[:-1]}  # the last level is the clean target, not a network call
    assert len(called) == cfg.sampling_steps
    assert called <= set(agent.actor.schedule.sample_t(10_000).tolist())


def test_dql_layer_norm_critic_bounds_q_far_from_the_data(hopper_random, tmp_path):
    """`critic_layer_norm=true`: each hidden layer's output is normalized, so |Q| stays under the last layer's
    weight norm times sqrt(width) however far an action lies from the data; the original's critic grows with
    the action's scale. The setting trains and reloads with the checkpoint."""
    obs, act = torch.randn(16, 11), torch.rand(16, 3) * 2 - 1
    for layer_norm in (False, True):
        critic = get_algorithm("dql")(11, 3, {**SMALL["dql"], "critic_layer_norm": layer_norm}, device="cpu").critic
        last = critic.q1[-1]
        with torch.no_grad():
            near, far = critic.q1(torch.cat([obs, act], -1)), critic.q1(torch.cat([obs, 1e4 * act], -1))
        bound = last.weight.abs().sum() * 32 ** 0.5 + last.bias.abs()
        assert (far.abs().max() <= bound) == layer_norm, layer_norm
        assert (far.abs().max() > 100 * near.abs().max()) != layer_norm, layer_norm
    path = train(train_config("dql", hopper_random, tmp_path, steps=4, **{"algo.params.critic_layer_norm": "true"}))
    policy = load_policy(str(path))
    assert policy.config.critic_layer_norm and any(isinstance(m, torch.nn.LayerNorm) for m in policy.critic.modules())


def test_idql_expectile_weights_depend_only_on_the_sign_of_the_advantage():
    """|f'(A)| / |A| for the expectile loss is tau or 1 - tau: a candidate barely above V weighs as much
    as one far above."""
    adv = torch.tensor([-100.0, -1e-3, 0.0, 1e-3, 100.0])
    assert expectile_weights(adv, 0.7).tolist() == pytest.approx([0.3, 0.3, 0.3, 0.7, 0.7])


def test_idql_critic_updates_give_the_critics_their_own_budget(hopper_random, tmp_path):
    """`critic_updates=k`: train() samples k batches per step; value and critics step k times on them,
    the behavior model once, on the first."""
    path = train(train_config("idql", hopper_random, tmp_path, steps=4, **{"algo.params.critic_updates": 3}))
    state = load_checkpoint(path)

    def adam_steps(name: str) -> set[int]:
        return {int(s["step"]) for s in state["optimizers"][name]["state"].values()}

    assert adam_steps("critic") == adam_steps("value") == {12} and adam_steps("actor") == {4}
    agent = get_algorithm("idql")(11, 3, {**SMALL["idql"], "critic_updates": 2}, device="cpu")
    assert agent.batches_per_step == 2
    batch = {"obs": torch.randn(64, 11), "act": torch.rand(64, 3) * 2 - 1, "next_obs": torch.randn(64, 11),
             "rew": torch.randn(64), "terminal": torch.zeros(64)}
    loss = agent.actor.loss
    seen = []
    agent.actor.loss = lambda act, obs: seen.append(len(act)) or loss(act, obs)
    agent.update(batch)
    assert seen == [32]
    with pytest.raises(ValueError, match="critic_updates must be >= 1"):
        get_algorithm("idql")(11, 3, {"critic_updates": 0}, device="cpu")


@pytest.mark.parametrize("algo", ["dql", "diffusion_bc"])
def test_bc_updates_add_denoising_steps_on_batches_of_their_own(algo, hopper_random, tmp_path):
    """`bc_updates=k`: train() samples 1 + k batches per step and the actor takes k more denoising steps, one per
    extra batch (Diffusion-QL's critic and Q term use the first); its BC loss falls faster than without them."""
    path = train(train_config(algo, hopper_random, tmp_path, steps=4, **{"algo.params.bc_updates": 2}))
    steps = {name: {int(s["step"]) for s in opt["state"].values()} for name, opt in load_checkpoint(path)["optimizers"].items()}
    assert steps == ({"actor": {12}, "critic": {4}} if algo == "dql" else {"actor": {12}})
    torch.manual_seed(0)
    batch = {"obs": torch.randn(512, 11), "act": torch.rand(512, 3) * 2 - 1, "next_obs": torch.randn(512, 11),
             "rew": torch.randn(512), "terminal": torch.zeros(512)}
    fits = []
    for bc_updates in (0, 3):
        torch.manual_seed(1)
        agent = get_algorithm(algo)(11, 3, {**SMALL[algo], "bc_updates": bc_updates}, device="cpu")
        seen, loss = [], agent.actor.loss
        agent.actor.loss = lambda act, obs: seen.append(len(act)) or loss(act, obs)
        for _ in range(60):
            agent.update({key: value[: 128 * agent.batches_per_step] for key, value in batch.items()})
        assert seen == [128] * (60 * (1 + bc_updates))
        torch.manual_seed(2)
        fits.append(sum(loss(batch["act"], batch["obs"]).item() for _ in range(20)))
    assert fits[1] < 0.5 * fits[0], fits
    with pytest.raises(ValueError, match="bc_updates must be >= 0"):
        get_algorithm(algo)(11, 3, {"bc_updates": -1}, device="cpu")


@pytest.mark.parametrize("algo, backbone", [("diffusion_bc", "resnet"), ("dql", "resnet"), ("idql", "mlp")])
def test_actor_backbone_is_a_setting_that_trains_and_round_trips(algo, backbone, minari_root, tmp_path):
    """`backbone` swaps any diffusion actor's denoiser (Diffusion-QL's MLP, IDQL's LN-ResNet): the BC loss
    falls, a checkpoint rebuilds that network and acts exactly as the trained one; an unknown name is one
    clear error."""
    from cleandiff_rl.data import TransitionDataset
    from cleandiff_rl.nn import DQLMlp, IDQLMlp

    cls = get_algorithm(algo)
    assert isinstance(cls(4, 1, SMALL[algo], device="cpu").actor.model["diffusion"], IDQLMlp if algo == "idql" else DQLMlp)
    pendulum_dataset("test/pendulum/expert-v0", n_steps=2000)
    data = TransitionDataset("test/pendulum/expert-v0", device="cpu")
    torch.manual_seed(0)
    agent = cls(4, 1, {**SMALL[algo], "backbone": backbone, "n_blocks": 1}, action_bounds=([-3.0], [3.0]),
                device="cpu")
    assert isinstance(agent.actor.model["diffusion"], IDQLMlp if backbone == "resnet" else DQLMlp)
    data.data["act"] = agent.normalize_action(data.data["act"])
    agent.prepare(data)
    gen = torch.Generator().manual_seed(0)
    history = [agent.update(data.sample(128, gen))["actor/bc_loss"] for _ in range(150)]
    assert np.mean(history[-20:]) < 0.7 * np.mean(history[:5]), (history[:5], history[-20:])
    agent.save(tmp_path / "checkpoint.pt")
    loaded = load_policy(str(tmp_path / "checkpoint.pt"), "cpu")
    assert loaded.config.backbone == backbone and isinstance(loaded.actor.model["diffusion"], type(agent.actor.model["diffusion"]))
    obs = data.sample(8, gen)["obs"].numpy()
    np.testing.assert_array_equal(loaded.act(obs, generator=torch.Generator().manual_seed(1)),
                                  agent.eval().act(obs, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="unknown backbone 'unet'; valid: mlp, resnet"):
        cls(4, 1, {"backbone": "unet"}, device="cpu")


class StubCritic(torch.nn.Module):
    """Twin Q of a fixed form: q1 = scale * sum(a) and q2 = q1 + gap (their disagreement)."""

    def __init__(self, scale: float, gap: float):
        super().__init__()
        self.scale, self.gap = scale, gap

    def forward(self, obs, act):
        q1 = self.scale * act.sum(-1)
        return q1, q1 + self.gap

    def q_min(self, obs, act):
        return torch.minimum(*self(obs, act))


@pytest.mark.parametrize("algo, critic, always, labels", [
    ("idql", "critic_target", {"selection": "argmax"}, ("argmax Q of 4", "behavior mode (ddim")),
    ("dql", "critic_target", {"selection": "softmax"}, ("softmax Q of 4", "actor's mode (ddim")),
    ("fql", "critic", {"selection": "argmax"}, ("argmax Q of 4", "mode (T=0)")),
])
def test_auto_selection_selects_only_where_the_critics_rank_candidates(algo, critic, always, labels,
                                                                       hopper_random, tmp_path):
    """`selection: auto` (opt-in for IDQL, Diffusion-QL and FQL) measures once per weights how far a
    state's candidates' Q values spread against the twin critics' disagreement, on dataset states fixed
    before training: above the threshold it selects among the candidates as `always` does, else it
    acts at the mode (one ODE sample from zero noise; FQL's mu(s, 0)). A policy whose probe states were never
    drawn (NaN: `prepare` never ran) selects."""
    otherwise = {"selection": "mode"}
    path = train(train_config(algo, hopper_random, tmp_path, steps=4))
    policy = load_policy(str(path), "cpu").with_settings({"num_candidates": 4})
    assert not policy.probe_obs.isnan().any()
    data = read_episodes(hopper_random)
    assert any(torch.allclose(policy.probe_obs[0], policy.obs_normalizer.normalize(torch.as_tensor(o)), atol=1e-5)
               for o in data.obs.astype(np.float32))
    obs = data.obs[:8]

    def acts(**settings):
        return policy.with_settings({"selection": "auto", "temperature": 1.0, "num_candidates": 4, **settings}).act(
            obs, generator=torch.Generator().manual_seed(1))

    fallback = acts(**otherwise)
    setattr(policy, critic, StubCritic(scale=10.0, gap=0.01))  # Q spread across candidates >> disagreement
    best = acts(**always)
    np.testing.assert_array_equal(acts(), best)
    assert policy.rank_ratio() > 2 and policy.last_sample_log["acting"].startswith(labels[0])
    assert policy.chosen_settings() == always  # what the suite's evaluation records as `acts_as`
    assert not np.allclose(best, fallback)
    setattr(policy, critic, StubCritic(scale=0.01, gap=5.0))  # the critics disagree more than candidates differ
    policy.updates += 1  # new weights: measured again
    np.testing.assert_array_equal(acts(), fallback)
    assert policy.rank_ratio() < 0.5 and policy.last_sample_log["acting"].startswith(labels[1])
    assert policy.chosen_settings() == otherwise
    np.testing.assert_array_equal(acts(**policy.chosen_settings()), fallback)
    np.testing.assert_array_equal(acts(num_candidates=1), acts(**always, num_candidates=1))  # one: its own pick
    assert "acting" not in policy.last_sample_log and policy.chosen_settings() == {}
    if algo != "fql":  # a sweep's ODE solver samples the mode itself
        ode_mode = acts(**{**otherwise, "solver": "ode_dpmsolver++_2M"})
        acts()
        np.testing.assert_array_equal(policy.act(obs, solver="ode_dpmsolver++_2M"), ode_mode)
        policy.set_sampling(solver=get_algorithm(algo).Config.solver)
    state = load_checkpoint(path)
    state["model"]["probe_obs"].fill_(float("nan"))
    old = get_algorithm(algo).from_checkpoint(state, "cpu")
    setattr(old, critic, StubCritic(scale=0.01, gap=5.0))
    settings = {"num_candidates": 4, "temperature": 1.0}
    best = old.with_settings({**settings, **always}).act(obs, generator=torch.Generator().manual_seed(1))
    auto = old.with_settings({**settings, "selection": "auto"}).act(obs, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(auto, best)
    assert old.last_sample_log["acting"].startswith(labels[0]) and old.last_sample_log["acting"].endswith("(rank ratio nan)")


@pytest.mark.parametrize("algo, bad", [("idql", {"selection": "best"}), ("dql", {"selection": "expectile"}),
                                       ("fql", {"selection": "best"}), ("fql", {"acting": "bogus"})])
def test_with_settings_refuses_what_the_constructor_refuses_and_changes_nothing(algo, bad):
    """An act setting is checked as at construction (`check_config`): a bad one is one clear error and
    leaves the policy acting as before, whatever else the same call asked for."""
    cls = get_algorithm(algo)
    with pytest.raises(ValueError, match=f"{next(iter(bad.values()))!r}"):
        cls(11, 3, bad, device="cpu")
    agent = cls(11, 3, device="cpu")
    before = agent.act_settings()
    with pytest.raises(ValueError, match=f"{next(iter(bad.values()))!r}"):
        agent.with_settings({"num_candidates": 7, **bad})
    assert agent.act_settings() == before
    with pytest.raises(ValueError, match="has no setting 'nope'"):
        agent.with_settings({"nope": 1})


def test_select_modes():
    actions = torch.arange(6.0).view(6, 1)  # two observations x three candidates
    scores = torch.tensor([0.1, 5.0, 0.2, 3.0, 1.0, 2.0])
    assert select(actions, scores, 3, "argmax").flatten().tolist() == [1.0, 3.0]
    weights = torch.tensor([1.0, 0.0, 3.0, 0.0, 0.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([select(actions, weights, 3, "expectile", generator=gen) for _ in range(2000)]).squeeze(-1)
    assert set(draws[:, 1].tolist()) == {5.0}
    assert abs((draws[:, 0] == 2.0).float().mean().item() - 0.75) < 0.04  # drawn in proportion to the weights
    with pytest.raises(ValueError, match="unknown selection"):
        select(actions, scores, 3, "best")


def test_load_policy_leaves_the_thread_count_to_the_caller(hopper_random, tmp_path):
    """Loading a policy changes no process-wide setting: torch's thread count is the caller's."""
    path = train(train_config("bc", hopper_random, tmp_path, steps=2))
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            load_policy(str(path), "cpu")
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(1)


def test_clear_errors(hopper_random, tmp_path):
    with pytest.raises(ValueError, match="unknown algorithm 'sac'.*diffusion_bc"):
        get_algorithm("sac")
    with pytest.raises(ValueError, match="unknown DiffusionQLConfig settings \\['etta'\\]"):
        get_algorithm("dql")(11, 3, {"etta": 1.0}, device="cpu")
    path = train(train_config("idql", hopper_random, tmp_path / "idql", steps=2))
    with pytest.raises(ValueError, match="unknown solver 'dpm'"):
        load_policy(str(path), solver="dpm")
    policy = load_policy(str(path))
    with pytest.raises(ValueError, match="unknown solver 'ddim2'"):
        policy.act(np.zeros(11), solver="ddim2")
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        policy.set_sampling(temperature=-0.5)
    bc = train(train_config("bc", hopper_random, tmp_path / "bc", steps=2))
    with pytest.raises(ValueError, match="bc policy has no sampling temperature"):
        load_policy(str(bc), temperature=0)
    with pytest.raises(ValueError, match=r"expects observations of shape \(11,\)"):
        policy.act(np.zeros(4))
    mismatch = (r"^policy \(obs dim 11, act dim 3, trained on test/hopper/random-v0\) does not fit env "
                r"InvertedPendulum-v5 \(observation shape \(4,\), action shape \(1,\)\)$")
    with pytest.raises(ValueError, match=mismatch):
        evaluate(policy, PENDULUM_ENV_ID, episodes=1)
    with pytest.raises(FileNotFoundError):
        load_policy(str(tmp_path / "missing.pt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("algo", POLICIES)
def test_cuda_graph_replay_trains_like_eager_updates(algo):
    """A replayed graph trains on each new batch: BC (no randomness) matches eager updates to float
    precision; the diffusion agents keep moving their weights, EMA and target copies at every replay."""
    from cleandiff_rl.utils import CudaGraphStep

    torch.manual_seed(0)
    eager = get_algorithm(algo)(11, 3, SMALL[algo], device="cuda")
    graphed = copy.deepcopy(eager)
    step = CudaGraphStep(graphed.train_step, graphed.optimizers().values())
    batches = [{"obs": torch.randn(64, 11, device="cuda"), "act": torch.rand(64, 3, device="cuda") * 2 - 1,
                "next_obs": torch.randn(64, 11, device="cuda"), "rew": torch.randn(64, device="cuda"),
                "terminal": torch.zeros(64, device="cuda")} for _ in range(8)]
    for batch in batches:
        eager.update(batch)
        before = {k: v.clone() for k, v in graphed.state_dict().items() if torch.is_tensor(v)}
        metrics = step(batch)
        graphed.after_step()
        assert all(torch.isfinite(v) for v in metrics.values())
    moved = [k for k, v in graphed.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any("ema" in k for k in moved) or algo == "bc"
    assert any("target" in k for k in moved) or algo in ("bc", "diffusion_bc")
    if algo == "bc":
        for key, value in eager.state_dict().items():
            if torch.is_tensor(value):
                torch.testing.assert_close(graphed.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("algo", ["dql", "edp", "idql", "fql", "dac", "diffusion_bc", "bc"])
def test_cpu_fast_paths_leave_losses_weights_and_actions_unchanged(algo):
    """The CPU speed-ups (Mish from one sigmoid, fused Adam: `utils.fast`) train and act like torch's
    default kernels to float rounding: the same metrics, weights and actions after a few updates."""
    from cleandiff_rl.utils import fast_paths

    batches = [{"obs": torch.randn(64, 11), "act": torch.rand(64, 3) * 2 - 1, "next_obs": torch.randn(64, 11),
                "rew": torch.randn(64), "terminal": (torch.rand(64) < 0.1).float()} for _ in range(6)]
    obs = np.random.default_rng(0).normal(size=(5, 11))

    def run(enabled: bool) -> tuple[list[dict], dict, np.ndarray]:
        with fast_paths(enabled):
            torch.manual_seed(0)
            agent = get_algorithm(algo)(11, 3, {**SMALL[algo], "ema_start": 0} if algo != "bc" else SMALL[algo],
                                        device="cpu")
            metrics = [agent.update(batch) for batch in batches]
            return metrics, agent.state_dict(), agent.act(obs, generator=torch.Generator().manual_seed(3))

    fast, slow = run(True), run(False)
    for step_fast, step_slow in zip(fast[0], slow[0]):
        assert step_fast.keys() == step_slow.keys()
        for key in step_fast:
            assert step_fast[key] == pytest.approx(step_slow[key], rel=1e-4, abs=1e-5), key
    for key, value in slow[1].items():
        torch.testing.assert_close(fast[1][key], value, rtol=1e-4, atol=1e-5, equal_nan=True, msg=key)
    np.testing.assert_allclose(fast[2], slow[2], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_critic_diagnostics_pipeline(hopper_random, tmp_path):
    """critic_diagnostics runs on each Q-learning checkpoint and refuses a policy without a critic."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    critics = {name for name, cls in ALGORITHMS.items() if cls.has_critics}  # what each agent says of itself
    assert {"dql", "edp", "idql", "fql", "dac"} <= critics and not critics & {"bc", "diffusion_bc", "diffuser", "decision_diffuser"}
    script = Path(__file__).resolve().parents[1] / "pipelines" / "critic_diagnostics.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for algo in ("dql", "fql", "bc"):
        path = train(train_config(algo, hopper_random, tmp_path / algo, steps=4))
        run = subprocess.run([sys.executable, str(script), f"checkpoint={path}", "transitions=200", "states=20", "rollout_states=3",
                              "rollout_every=2", "rollout_steps=4", "device=cpu"],
                             env=env, capture_output=True, text=True)
        if algo == "bc":
            assert run.returncode != 0 and "has no critic" in run.stderr
            continue
        assert run.returncode == 0, run.stderr
        n = 4 if algo == "dql" else 5
        assert "correlation(Q, MC return)" in run.stdout and f"Q over {n} candidates" in run.stdout
        assert f"rollouts: 3 states x {n} candidates, then {algo} for 3 steps" in run.stdout


@pytest.mark.parametrize("algo", [name for name in ALGORITHMS if name != "bc"])
def test_default_ema_forgets_the_initial_weights_within_a_cpu_budget(algo):
    """Acting uses the EMA model, so its averaging window (ema_every / (1 - ema_rate) updates) must be
    short next to a CPU-sized run. CleanDiffuser's Decision Diffuser EMA (0.9999 every update) still
    held 74% of the random initial weights after 3k updates, and its plans fell over at once."""
    agent = get_algorithm(algo)(11, 3)
    models = [module for module in agent.modules() if isinstance(module, DiffusionModel)]
    assert models
    for model in models:
        window = model.ema_every / (1.0 - model.ema_rate)
        assert model.ema_start + 3 * window <= 10_000, (model.ema_rate, model.ema_every, model.ema_start)


@pytest.mark.parametrize("algo", [name for name in ALGORITHMS if name != "bc"])
def test_after_step_advances_the_ema_of_every_diffusion_model(algo):
    """`ema_models` names every DiffusionModel an agent holds, so `after_step` keeps each one's EMA."""
    agent = get_algorithm(algo)(11, 3, {**SMALL[algo], "ema_start": 10}, device="cpu")
    models = [module for module in agent.modules() if isinstance(module, DiffusionModel)]
    assert sorted(map(id, models)) == sorted(id(getattr(agent, name)) for name in agent.ema_models)
    with torch.no_grad():
        for model in models:
            for p in model.model.parameters():
                p.add_(1.0)  # online weights away from the EMA copy
    agent.after_step()
    assert agent.updates == 1
    for model in models:
        assert model.updates == 1  # before ema_start (10) the EMA copies the online weights
        for ema, online in zip(model.model_ema.parameters(), model.model.parameters()):
            assert torch.equal(ema, online)


def test_evaluate_pipeline_acts_at_the_given_temperature(hopper_random, tmp_path):
    """evaluate.py temperature=0 loads the policy at that temperature and records it in evaluation.json."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = train(train_config("idql", hopper_random, tmp_path / "idql", steps=4))
    script = Path(__file__).resolve().parents[1] / "pipelines" / "evaluate.py"
    run = subprocess.run([sys.executable, str(script), f"checkpoint={path}", "episodes=2", "solver=ddim", "temperature=0",
                          "device=cpu", f"run_dir={tmp_path / 'eval'}"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "solver ddim, 5 steps (nfe 5), temperature 0" in run.stdout
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["temperature"] == 0.0 and result["solver"] == "ddim" and result["episodes"] == 2


@pytest.mark.slow
def test_benchmark_suite_builds_trains_tabulates_and_reruns_for_free(hopper_random, minari_root, tmp_path):
    """The suite builds a missing dataset, writes one row per dataset x (algorithm, act variant) beside each
    dataset's own average, a CSV, a PNG and TensorBoard; a rerun trains and evaluates nothing again; a
    bad dataset entry is one clear error."""
    script = Path(__file__).resolve().parents[1] / "pipelines" / "benchmark_suite.py"
    out = tmp_path / "suite"
    command = [sys.executable, str(script), "suite=smoke", f"datasets=[{hopper_random},test/hopper/medium-v0]",
               "algos=[diffusion_bc,bc]", f"run_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True)
    assert (minari_root / "test/hopper/medium-v0").is_dir() and (out / "builds" / "test-hopper-v0" / "log.txt").is_file()
    rows = json.loads((out / "results.json").read_text())["rows"]
    names = ["test_hopper_random-v0", "test_hopper_medium-v0"]
    assert [(r["dataset"], r["label"]) for r in rows] == [
        *((name, "dataset average") for name in names),
        *((name, label) for name in names for label in ("diffusion_bc", "diffusion_bc (paper)",
                                                             "diffusion_bc (mode)")),
        *((name, "bc") for name in names)]
    for name, dataset_id in zip(names, [hopper_random, "test/hopper/medium-v0"]):
        data = read_episodes(dataset_id)
        returns = np.add.reduceat(data.rew.astype(np.float64), data.starts)
        assert rows[names.index(name)]["score_mean"] == pytest.approx(float(np.mean(normalized_score(dataset_id,
                                                                                                      returns))))
    trained = rows[2:]
    assert all(r["train_minutes"] > 0 and r["updates_per_second"] > 0 and np.isfinite(r["score_mean"])
               and r["episodes"] == 2 for r in trained)
    assert len((out / "results.csv").read_text().splitlines()) == 1 + len(rows)
    assert (out / "scores.png").stat().st_size > 10_000 and any((out / "tb").iterdir())
    done = sorted([*out.glob("*/*/checkpoint.pt"), *out.glob("*/*/evaluations/*/evaluation.json")])
    assert len(done) == 4 + 8
    # the smoke preset acts by the paper's rule: the paper's row is the default's evaluation, not a second one
    assert [r["same_as_default"] for r in rows if r["label"] == "diffusion_bc (paper)"] == [True, True]
    assert all((path.parent / "log.txt").is_file() for path in done)  # each training and evaluation logs beside it
    written = [path.stat().st_mtime_ns for path in done]
    subprocess.run(command, check=True, env=env, capture_output=True)
    assert [path.stat().st_mtime_ns for path in done] == written
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    stale = out / names[0] / "diffusion_bc" / "evaluations" / "diffusion_bc" / "evaluation.json"
    record = json.loads(stale.read_text())
    assert record["act_settings"] == {"solver": "ddpm", "steps": 5, "selection": "sample", "temperature": 1.0,
                                      "act_with_ema": False}
    record["act_settings"]["temperature"] = 0.5  # as if the default had changed since this evaluation
    stale.write_text(json.dumps(record))
    subprocess.run(command, check=True, env=env, capture_output=True)
    again = [path.stat().st_mtime_ns for path in done]
    assert [path for path, before, after in zip(done, written, again) if before != after] == [stale]
    assert json.loads(stale.read_text())["act_settings"]["temperature"] == 1.0
    bad = subprocess.run([*command[:3], "datasets=[hopper-mediun]", f"run_dir={tmp_path / 'bad'}"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown dataset 'hopper-mediun': neither a task" in bad.stderr
    assert not (tmp_path / "bad").exists()

@pytest.mark.slow
def test_suite_evaluates_each_acting_once(hopper_random, tmp_path):
    """Where `selection: auto` (here the preset's rule) chose one of the act variants for a checkpoint, the suite records the default's
    evaluation as that variant's instead of running it again; evaluated on its own, the variant scores the
    same episodes exactly. A rerun reuses all of it."""
    from cleandiff_rl.evaluation import evaluate_checkpoint

    script = Path(__file__).resolve().parents[1] / "pipelines" / "benchmark_suite.py"
    out = tmp_path / "suite"
    command = [sys.executable, str(script), "suite=smoke", f"datasets=[{hopper_random}]", "algos=[fql,idql]",
               "~act_variants.idql.expectile", "+acting.fql.selection=auto", "+acting.idql.selection=auto",
               f"run_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True)
    rows = json.loads((out / "results.json").read_text())["rows"]
    for algo, variants in [("fql", ("paper", "best_of_5", "mode")), ("idql", ("paper", "mode"))]:
        folder = out / "test_hopper_random-v0" / algo / "evaluations"
        default = json.loads((folder / algo / "evaluation.json").read_text())
        copies = [v for v in variants if "same_as" in json.loads((folder / f"{algo}_{v}_" / "evaluation.json").read_text())]
        assert len(copies) == 1, (algo, default["acting"], copies)  # best_of_5 / the paper's argmax, or the mode
        record = json.loads((folder / f"{algo}_{copies[0]}_" / "evaluation.json").read_text())
        assert record["acting"] is None and record["act_settings"] == default["acts_as"] != default["act_settings"]
        again = evaluate_checkpoint(compose_config([f"checkpoint={out / 'test_hopper_random-v0' / algo / 'checkpoint.pt'}",
                                                    f"run_dir={tmp_path / algo}", "episodes=2", "seed=1000",
                                                    "device=cpu", *(f"+settings.{k}={v}" for k, v in
                                                                    record["settings"].items())],
                                                   config_name="evaluate"))
        assert again["returns"] == record["returns"] == default["returns"]
        assert again["act_settings"] == record["act_settings"]
        [row] = [r for r in rows if r["label"] == f"{algo} ({copies[0]})"]
        assert row["same_as_default"] and row["score_mean"] == default["score_mean"]
    done = sorted(out.glob("*/*/evaluations/*/evaluation.json"))
    written = [path.stat().st_mtime_ns for path in done]
    subprocess.run(command, check=True, env=env, capture_output=True)
    assert [path.stat().st_mtime_ns for path in done] == written


@pytest.mark.slow
def test_suite_pools_the_last_checkpoints_evaluations(hopper_random, tmp_path):
    """checkpoints=2: each act setting is evaluated on the last two kept checkpoints, each on its half of the
    env seeds, and the table pools their episodes; a rerun reuses it all; episodes that do not split evenly
    are one clear error before anything runs."""
    script = Path(__file__).resolve().parents[1] / "pipelines" / "benchmark_suite.py"
    out = tmp_path / "suite"
    command = [sys.executable, str(script), "suite=smoke", f"datasets=[{hopper_random}]", "algos=[fql,bc]",
               "+acting.fql.selection=auto", "checkpoints=2", "episodes=4", f"run_dir={out}"]  # checkpoints every 5 updates
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True)
    rows = json.loads((out / "results.json").read_text())["rows"]
    for row in rows[1:]:
        folder = out / "test_hopper_random-v0" / row["algo"] / "evaluations" / re.sub(r"[^A-Za-z0-9.=_-]+", "_",
                                                                                   row["label"])
        records = [json.loads((folder / name / "evaluation.json").read_text()) for name in ("000000005", "000000010")]
        assert [(r["updates"], r["episodes"], r["seed"]) for r in records] == [(5, 2, 1000), (10, 2, 1002)]
        assert row["score_mean"] == pytest.approx(np.mean([r["score_mean"] for r in records]))
        assert row["steps"] == 10 and row["episodes"] == 4
    [fql] = [r for r in rows if r["label"] == "fql"]
    assert fql["acting"].startswith("5: ") and "; 10: " in fql["acting"]  # `auto`'s choice at each checkpoint
    done = sorted(out.glob("*/*/evaluations/*/*/evaluation.json")) + sorted(out.glob("*/*/checkpoint.pt"))
    written = [path.stat().st_mtime_ns for path in done]
    page = tmp_path / "results" / "smoke.md"  # the results page, written from the finished run folder
    subprocess.run([*command, f"report={page}"], check=True, env=env, capture_output=True)
    assert [path.stat().st_mtime_ns for path in done] == written  # nothing trained or evaluated again
    text = page.read_text()
    assert page.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![normalized score per algorithm and dataset, s.e. as error bars](smoke.png)" in text
    assert "- command: `python " in text and f"episodes=4 run_dir={out} report={page}`" in text
    assert "- preset: `smoke`" in text and "torch " in text and " cores" in text
    assert "one training seed (0): ± is the standard error over its 4 evaluation episodes, pooled over the last 2" in text
    main, against = text.split("## Against BC")
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in main.splitlines()
             if line.startswith("| ") and "---" not in line}
    average = rows[0]["score_mean"]
    assert lines["dataset average (reference)"] == ["", "", f"{average:.1f}"]
    for row in rows[1:]:
        label = f"{row['label']} (reference)" if row["algo"] == "bc" else row["label"]
        assert lines[label][1:] == ["10", f"{row['score_mean']:.1f} ± {row['score_se']:.1f}"], label
    assert lines["fql"][0] == "preset: selection=auto" and lines["fql (paper)"][0] == "paper's: selection=sample"
    assert list(lines)[:3] == ["algo", "dataset average (reference)", "bc (reference)"]
    versus = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in against.splitlines()
              if line.startswith("| ") and "---" not in line}
    [bc] = [r for r in rows if r["label"] == "bc"]
    for row in rows[1:]:
        if row["label"] != "bc":  # the test data's name gives no level: the difference alone
            assert versus[row["label"]].split(" ± ")[0] == f"{row['score_mean'] - bc['score_mean']:+.1f}", row["label"]
    bad = subprocess.run([*command[:-2], "episodes=3", f"run_dir={tmp_path / 'bad'}"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "episodes=3 must split evenly over checkpoints=2" in bad.stderr
    for setting, error in [("checkpoints=x", "checkpoints='x' is not a number; accepted: an integer >= 1"),
                           ("max_minutes=0", "max_minutes=0 is out of range; accepted: a number > 0 or null"),
                           ("report=results.txt", "report=results.txt: the results page is a Markdown file")]:
        bad = subprocess.run([*command[:-1], setting, f"run_dir={tmp_path / 'bad'}"], env=env, capture_output=True,
                             text=True)
        assert bad.returncode != 0 and error in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_fql_config_holds_only_what_fql_reads():
    """FQL's networks are its own MLPs: the actor-backbone settings of the diffusion actors are no FQL settings."""
    import dataclasses

    assert not {"backbone", "n_blocks", "dropout"} & {f.name for f in dataclasses.fields(get_algorithm("fql").Config)}
    assert {"backbone", "n_blocks", "dropout"} <= {f.name for f in dataclasses.fields(get_algorithm("idql").Config)}
    with pytest.raises(ValueError, match=r"unknown FQLConfig settings \['backbone'\]"):
        get_algorithm("fql")(11, 3, {"backbone": "resnet"}, device="cpu")


def test_the_results_page_averages_over_training_seeds_with_the_references_first():
    """Several training seeds: each cell is the mean ± s.e. (sample std / sqrt(n)) of the seeds' scores, and the
    page says so; the dataset's average and BC lead the table; the page names its figure, command, machine, date."""
    cfg = compose_config(["suite=smoke", "seeds=[0,1,2]", "algos=[idql,bc]"], config_name="benchmark_suite")
    [dataset] = resolve_datasets(["hopper-medium"])

    def row(label: str, algo: str | None, seed: int | None, score: float, rule: str = "") -> dict:
        return {"label": label, "algo": algo, "dataset": dataset.name, "seed": seed, "score_mean": score,
                "score_se": None if algo is None else 9.9, "steps": 0 if algo is None else 10,
                "updates_per_second": None, "acting": None, "same_as_default": False, "rule": rule}

    rows = [row("dataset average", None, None, 44.3)]
    rows += [row("idql", "idql", seed, score, "paper's: selection=expectile")
             for seed, score in zip((0, 1, 2), (50.0, 56.0, 59.0))]
    rows += [row("bc", "bc", seed, score) for seed, score in zip((0, 1, 2), (40.0, 44.0, 51.0))]
    text = report_page(rows, [dataset], cfg, "cpu.png", "python pipelines/benchmark_suite.py seeds=[0,1,2]",
                       "a CPU, 2 cores, no GPU; torch 2", "2026-01-01 00:00 UTC")
    main, against = text.split("## Against BC")
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in main.splitlines() if line.startswith("| ")]
    assert table == [["algo", "acting", "updates", "hopper-medium"],
                     ["dataset average (reference)", "", "", "44.3"],
                     ["bc (reference)", "", "10", f"45.0 ± {np.std([40, 44, 51], ddof=1) / np.sqrt(3):.1f}"],
                     ["idql", "paper's: selection=expectile", "10", f"55.0 ± {np.std([50, 56, 59], ddof=1) / np.sqrt(3):.1f}"]]
    assert "mean ± standard error over 3 training seeds (0, 1, 2)" in text and "](cpu.png)" in text
    assert "- command: `python pipelines/benchmark_suite.py seeds=[0,1,2]`" in text and "- date: 2026-01-01" in text
    assert "- machine: a CPU, 2 cores, no GPU; torch 2" in text and "- preset: `smoke`" in text
    versus = [[c.strip() for c in line.split("|")[1:-1]] for line in against.splitlines() if line.startswith("| ")]
    se = np.hypot(np.std([50, 56, 59], ddof=1), np.std([40, 44, 51], ddof=1)) / np.sqrt(3)
    assert versus == [["algo", "hopper-medium"], ["idql", f"+10.0 ± {se:.1f}"]]  # medium data: no target


def test_the_results_page_says_where_a_policy_misses_its_target_against_bc():
    """On data whose name gives its level the page names the target margin over BC and whether it is met."""
    from cleandiff_rl.benchmarking import bc_margin
    assert [bc_margin(n) for n in ("hopper-medium-replay", "x_medium-expert-v0", "heldout_hopper_expert-v0",
                                   "hopper-medium", "mine/robot/v0")] == [5.0, -2.0, -2.0, None, None]
    cfg = compose_config(["suite=smoke", "algos=[dql,bc]"], config_name="benchmark_suite")
    datasets = resolve_datasets(["hopper-medium-replay", "hopper-medium-expert"])
    scores = {("bc", 0): 20.0, ("bc", 1): 90.0, ("dql", 0): 24.0, ("dql", 1): 89.0}
    rows = [{"label": algo, "algo": algo, "dataset": d.name, "seed": 0, "score_mean": scores[algo, i],
             "score_se": 1.0, "steps": 10, "updates_per_second": None, "acting": None, "same_as_default": False,
             "rule": ""} for algo in ("dql", "bc") for i, d in enumerate(datasets)]
    against = report_page(rows, datasets, cfg, "f.png", "cmd", "host", "date").split("## Against BC")[1]
    assert "| dql  | +4.0 ± 1.4 (misses +5) | -1.0 ± 1.4 (meets -2) |" in against


def test_suite_presets_state_one_budget_and_scale_learning_rates_with_the_batch():
    """Every preset gives each algorithm a budget; the GPU preset reaches the papers' order of updates;
    a batch size other than an algorithm's default scales each of its learning rates by (B / B0)^p."""
    for preset in ("cpu", "gpu", "smoke"):
        cfg = compose_config([f"suite={preset}"], config_name="benchmark_suite")
        assert cfg.suite_name == preset and all(cfg.steps[a] > 0 for a in ALGORITHMS)
        assert all(cfg.checkpoints * cfg.checkpoint_every[a] <= cfg.steps[a] for a in ALGORITHMS)  # all kept in time
        assert len({cfg.steps[a] for a in ("bc", "diffusion_bc", "dql", "idql")}) == 1  # the same for all
        for algo in ALGORITHMS:  # what the suite passes to train.py composes there, typed by the algo's schema
            train_cfg = compose_config([*algo_overrides(cfg, algo), "task=walker2d-medium-replay"])
            assert train_cfg.steps == cfg.steps[algo] and train_cfg.algo.name == algo
            assert train_cfg.compile == (algo in cfg.compile)
            assert (train_cfg.keep_checkpoints, train_cfg.checkpoint_every) == (cfg.checkpoints, cfg.checkpoint_every[algo])
    timed = compose_config(["suite=smoke", "max_minutes=2.5"], config_name="benchmark_suite")
    assert compose_config(algo_overrides(timed, "bc")).max_minutes == 2.5
    assert compose_config(algo_overrides(cfg, "bc")).max_minutes is None
    gpu = compose_config(["suite=gpu"], config_name="benchmark_suite")
    assert gpu.device == "cuda" and gpu.steps.dql >= 500_000 and gpu.jobs > 2 and gpu.lr_scaling == "sqrt"
    assert not gpu.compile  # CUDA graphs instead
    assert lr_overrides("dql", 1024, "sqrt") == ["algo.params.lr=0.0006", "algo.params.critic_lr=0.0006"]
    assert lr_overrides("idql", 256, "linear") == ["algo.params.lr=0.00015", "algo.params.critic_lr=0.00015"]
    assert lr_overrides("idql", 512, "sqrt") == lr_overrides("dql", 1024, "none") == []
    datasets = resolve_datasets(["hopper-medium-replay", "cleandiff/walker2d/medium-v0", "mujoco/ant/expert-v0"])
    assert [(d.name, d.id, d.task) for d in datasets] == [
        ("hopper-medium-replay", "cleandiff/hopper/medium-replay-v0", "hopper-medium-replay"),
        ("cleandiff_walker2d_medium-v0", "cleandiff/walker2d/medium-v0", "walker2d-medium"),
        ("mujoco_ant_expert-v0", "mujoco/ant/expert-v0", None)]
    with pytest.raises(ValueError, match="twice"):
        resolve_datasets(["hopper-medium", "cleandiff/hopper/medium-v0"])
    rows = [{"label": "idql", "algo": "idql", "dataset": d.name, "score_mean": score, "score_se": 0.5, "steps": steps,
             "updates_per_second": 10.0, "acting": acting, "same_as_default": False}
            for d, score, steps, acting in zip(datasets[:2], (43.7, 32.0), (30_000, 12_400), ("mode (ratio 0.46)", None))]
    rows.append({**rows[0], "label": "idql (mode)", "acting": None, "same_as_default": True})
    assert suite_table(rows, datasets[:2]).splitlines() == [
        "| algo        | updates | updates/s | hopper-medium-replay | cleandiff_walker2d_medium-v0 |",
        "|-------------|--------:|----------:|---------------------:|-----------------------------:|",
        "| idql        | 12k-30k |      10.0 |           43.7 ± 0.5 |                   32.0 ± 0.5 |",
        "| idql (mode) |     30k |      10.0 |           43.7 ± 0.5 |                              |", "",
        "acting chosen per checkpoint:",
        "- idql on hopper-medium-replay: mode (ratio 0.46) (the same evaluation as idql (mode))"]
