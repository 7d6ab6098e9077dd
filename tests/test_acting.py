"""Acting rules (cleandiff_rl/agents/acting.py): each rule on hand-made candidates and Q, the papers' rules as
the defaults, and one rule flowing from every entry point to the agent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from offline_data import random_dataset
from torch import Tensor

from cleandiff_rl.agents import ALGORITHMS, get_algorithm, load_policy
from cleandiff_rl.agents.acting import (
    RULES,
    CandidateActing,
    SelectionConfig,
    act_only_settings,
    act_setting,
    mode_solver,
    select,
)
from cleandiff_rl.agents.base import Agent
from cleandiff_rl.agents.idql import expectile_weights
from cleandiff_rl.benchmarking import algo_overrides, check_acting, paper_acting
from cleandiff_rl.training import CONFIG_DIR, compose_config, train

SMALL = {"diffusion_bc": {"hidden_dim": 32}, "dql": {"hidden_dim": 32, "critic_hidden": 32},
         "edp": {"hidden_dim": 32, "critic_hidden": 32, "sampling_steps": 5},
         "idql": {"hidden_dim": 32, "critic_hidden": 32}, "fql": {"hidden_dim": 32},
         "dac": {"hidden_dim": 32, "critic_hidden": 32}}
# Each paper's acting (the defaults): /work/shared/reference_hyperparameters.md sections 1, 2, 3 and 9
PAPER = {"dql": {"selection": "softmax", "num_candidates": 50, "selection_temperature": 1.0, "temperature": 1.0,
                 "act_with_ema": False},
         "edp": {"selection": "softmax", "num_candidates": 50, "selection_temperature": 1.0, "temperature": 1.0,
                 "act_with_ema": False},
         "idql": {"selection": "argmax", "num_candidates": 64, "temperature": 1.0},
         "fql": {"selection": "sample", "temperature": 1.0, "acting": "onestep"},
         "dac": {"selection": "argmax", "num_candidates": 10, "temperature": 1.0, "act_with_ema": False},
         "diffusion_bc": {"selection": "sample", "temperature": 1.0, "act_with_ema": False},
         "diffuser": {"num_candidates": 64}}


# ---- each rule on hand-made candidates ----------------------------------------------------------

def test_argmax_picks_the_best_candidate_of_each_state_and_works_on_plans():
    actions = torch.arange(6.0).view(6, 1)  # two states x three candidates
    scores = torch.tensor([0.1, 5.0, 0.2, 3.0, 1.0, 2.0])
    assert select(actions, scores, 3, "argmax").flatten().tolist() == [1.0, 3.0]
    plans = torch.arange(24.0).view(6, 2, 2)  # a planner's (b * n, horizon, x_dim) candidates
    torch.testing.assert_close(select(plans, scores, 3, "argmax"), plans[[1, 3]])
    with pytest.raises(ValueError, match="unknown selection 'best'"):
        select(actions, scores, 3, "best")


def test_softmax_draws_each_candidate_with_its_softmax_probability():
    actions = torch.arange(3.0).view(3, 1)
    q = torch.tensor([0.0, 1.0, 2.0])
    gen = torch.Generator().manual_seed(0)
    draws = 20_000
    for temperature in (1.0, 0.5):
        picked = torch.stack([select(actions, q, 3, "softmax", temperature, gen) for _ in range(draws)]).flatten()
        freq = torch.bincount(picked.long(), minlength=3).float() / draws
        p = torch.softmax(q / temperature, 0)
        se = (p * (1 - p) / draws).sqrt()
        assert ((freq - p).abs() < 4 * se).all(), (temperature, freq, p)


def test_expectile_resamples_by_the_expectile_weights_of_the_advantage():
    """IDQL's implicit policy: weight tau = 0.7 where Q > V, 0.3 elsewhere, drawn in proportion."""
    q, v = torch.tensor([1.0, 2.0, 3.0, 4.0]), 2.5
    weights = expectile_weights(q - v, 0.7)
    assert weights.tolist() == pytest.approx([0.3, 0.3, 0.7, 0.7])
    gen = torch.Generator().manual_seed(0)
    draws = 20_000
    picked = torch.stack([select(torch.arange(4.0).view(4, 1), weights, 4, "expectile", generator=gen)
                          for _ in range(draws)]).flatten()
    freq = torch.bincount(picked.long(), minlength=4).float() / draws
    p = weights / weights.sum()  # 0.15, 0.15, 0.35, 0.35
    assert ((freq - p).abs() < 4 * (p * (1 - p) / draws).sqrt()).all(), freq


@dataclass
class ToyConfig(SelectionConfig):
    temperature: float = act_setting(1.0)


class Toy(CandidateActing, Agent):
    """Candidate k of n at temperature T is the action T * k / (n - 1); Q1 = spread * a, Q2 = Q1 + 1: its rank
    ratio is spread * std(k / (n - 1)) over the critics' disagreement 1."""

    name = "toy"
    Config = ToyConfig
    is_diffusion = False
    selections = RULES
    auto_selection = "argmax"

    def __init__(self, spread: float, **config):
        super().__init__(2, 1, config, device="cpu")
        self._init_acting(2)
        self.spread, self.drawn = spread, []

    def draw(self, obs, n, *, temperature, solver, steps, generator) -> tuple[Tensor, dict]:
        self.drawn.append((n, temperature, solver))
        k = torch.arange(n, dtype=torch.float32).repeat(obs.shape[0]) / max(n - 1, 1)
        return (temperature * k)[:, None], {"nfe": 1}

    def rate(self, obs_rep, actions):
        q1 = self.spread * actions.sum(-1)
        return q1, q1, q1 + 1.0

    def implicit_weights(self, obs_rep, score):
        return (score > 0).float()


def test_auto_switches_from_selecting_to_the_mode_at_its_threshold():
    std = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).std().item()  # the candidates' spread per unit of `spread`
    obs = np.zeros((2, 2), np.float32)
    for margin, rule in ((1.01, "argmax"), (0.99, "mode")):
        toy = Toy(spread=margin * 0.75 / std, selection="auto", num_candidates=4)
        assert np.isnan(toy.rank_ratio())  # no probe states yet: `auto` selects, as before the rule
        toy.probe_obs.zero_()
        assert toy.rank_ratio() == pytest.approx(margin * 0.75, rel=1e-5)
        action = toy.act(obs)
        assert toy.chosen_settings() == {"selection": rule}
        np.testing.assert_allclose(action, 1.0 if rule == "argmax" else 0.0)  # the best candidate, or T=0's
        assert toy.last_sample_log["acting"] == ("argmax Q of 4" if rule == "argmax" else "mode (T=0)") + \
            f" (rank ratio {margin * 0.75:.2f})"
    toy.with_settings({"rank_threshold": 0.5})
    assert toy.chosen_settings() == {"selection": "argmax"}


def test_each_rule_draws_what_it_reads_and_records_only_that():
    toy = Toy(spread=1.0, num_candidates=4, temperature=0.5)
    obs = np.zeros((1, 2), np.float32)
    expected = {"sample": (1, 0.5, 0.0), "mode": (1, 0.0, 0.0), "argmax": (4, 0.5, 0.5), "softmax": (4, 0.5, None),
                "expectile": (4, 0.5, None)}
    for rule, (n, temperature, action) in expected.items():
        toy.drawn.clear()
        got = toy.with_settings({"selection": rule}).act(obs, generator=torch.Generator().manual_seed(0))
        assert toy.drawn == [(n, temperature, None)], rule
        if action is not None:
            assert got.item() == pytest.approx(action)
        assert "acting" not in toy.last_sample_log and toy.chosen_settings() == {}  # only `auto` decides
    assert toy.with_settings({"selection": "expectile"}).act(obs).item() > 0  # a weight-0 candidate is never drawn
    mode = toy.with_settings({"selection": "mode"}).act_settings()
    assert mode == {"solver": None, "steps": None, "selection": "mode"}
    assert toy.with_settings({"selection": "sample"}).act_settings() == {"solver": None, "steps": None,
                                                                        "selection": "sample", "temperature": 0.5}
    assert mode_solver("ddpm") == "ddim" and mode_solver("ode_dpmsolver++_2M") == "ode_dpmsolver++_2M"
    with pytest.raises(ValueError, match="unknown selection 'best'; valid: sample, mode"):
        toy.with_settings({"selection": "best"})
    with pytest.raises(ValueError, match="num_candidates must be >= 1"):
        Toy(1.0, num_candidates=0)


@pytest.mark.parametrize("algo", ["diffusion_bc", "dql", "idql", "dac"])
def test_mode_is_one_deterministic_temperature_zero_ode_sample(algo):
    """`selection: mode` is the actor's sample from zero noise by an ODE solver: DDIM in place of the stochastic
    DDPM, whatever the generator draws."""
    torch.manual_seed(0)
    agent = get_algorithm(algo)(5, 2, SMALL[algo], device="cpu").with_settings({"selection": "mode"})
    obs = torch.randn(3, 5)
    first, second = (agent.act(obs.numpy(), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    np.testing.assert_array_equal(first, second)
    use_ema = not (algo in ("dql", "dac") and not agent.config.act_with_ema)
    agent.eval()  # as `act` samples: no dropout (IDQL's LN-ResNet)
    with torch.no_grad():
        expected, _ = agent.actor.sample(torch.zeros(3, 2), solver="ddim", steps=agent.steps, condition_cfg=obs,
                                         temperature=0.0, use_ema=use_ema)
    np.testing.assert_allclose(first, expected.numpy(), atol=1e-6)
    assert agent.solver == "ddpm" and agent.act_settings()["solver"] == "ddim"


def test_fql_mode_is_mu_of_zero_noise_and_its_paper_acting_one_network_call():
    torch.manual_seed(0)
    agent = get_algorithm("fql")(5, 2, SMALL["fql"], device="cpu")
    calls = {"actor": 0, "critic": 0}
    agent.actor.register_forward_hook(lambda *_: calls.__setitem__("actor", calls["actor"] + 1))
    agent.critic.register_forward_hook(lambda *_: calls.__setitem__("critic", calls["critic"] + 1))
    obs = torch.randn(3, 5)
    sampled = agent.act(obs.numpy(), generator=torch.Generator().manual_seed(1))  # the default: mu(s, z)
    assert calls == {"actor": 1, "critic": 0}
    with torch.no_grad():
        z = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
        np.testing.assert_allclose(sampled, agent.one_step(obs, z).numpy(), atol=1e-6)
        np.testing.assert_allclose(agent.with_settings({"selection": "mode"}).act(obs.numpy()),
                                   agent.one_step(obs, torch.zeros(3, 2)).numpy(), atol=1e-6)


# ---- the papers' rules are the defaults ----------------------------------------------------------

@pytest.mark.parametrize("algo", list(PAPER))
def test_every_default_acting_is_the_papers(algo):
    config = get_algorithm(algo).Config()
    assert {key: getattr(config, key) for key in PAPER[algo]} == PAPER[algo]


@pytest.mark.parametrize("algo, online", [("dql", True), ("idql", False), ("diffusion_bc", True), ("dac", True)])
def test_the_default_candidates_come_from_the_papers_actor_and_are_rated_by_the_target_critics(algo, online):
    """Diffusion-QL and Diffusion BC sample the online actor (the originals' evaluation), IDQL the EMA model;
    Diffusion-QL and IDQL rank by the target critics' min Q."""
    agent = get_algorithm(algo)(5, 2, SMALL[algo], device="cpu")
    seen, sample = [], agent.actor.sample
    agent.actor.sample = lambda *args, **kwargs: seen.append(kwargs.get("use_ema", True)) or sample(*args, **kwargs)
    agent.act(np.zeros((2, 5), np.float32))
    assert seen == [not online]
    if algo == "dac":  # DAC ranks by the mean Q of its target critics' heads
        obs, act = torch.randn(4, 5), torch.rand(4, 2) * 2 - 1
        with torch.no_grad():
            agent.critic_target.biases[-1][3].add_(2.0)  # one target head differs from the online ones
            score, _, _ = agent.rate(obs, act)
            torch.testing.assert_close(score, agent.critic_target(obs, act).mean(0))
            assert not torch.allclose(score, agent.critic(obs, act).mean(0))
    elif algo != "diffusion_bc":
        obs, act = torch.randn(4, 5), torch.rand(4, 2) * 2 - 1
        with torch.no_grad():
            agent.critic_target.q1[-1].bias.add_(1.0)  # the target critics differ from the online ones
            score, q1, q2 = agent.rate(obs, act)
            torch.testing.assert_close(score, agent.critic_target.q_min(obs, act))


def test_task_files_hold_only_the_papers_per_task_settings():
    """No acting key in any task file; Diffusion-QL's block holds main.py's eta and grad_norm, DAC's runs.sh's rho,
    bc_threshold and eta; no IDQL, FQL or Diffusion BC block (their settings are the same on every task)."""
    acting_keys = {key for cls in ALGORITHMS.values() for key in act_only_settings(cls.Config)
                   if key in ("selection", "num_candidates", "selection_temperature", "rank_threshold", "temperature",
                              "act_with_ema", "acting")} | {"solver"}
    files = sorted((CONFIG_DIR / "task").glob("*.yaml"))
    assert len(files) == 9
    for path in files:
        task = yaml.safe_load(path.read_text())
        assert not {"idql", "fql", "diffusion_bc"} & task.keys(), path.name
        assert set(task["dql"]) == {"eta", "grad_norm"} and task["dql"]["eta"] == 1.0, path.name
        assert set(task["dac"]) == {"rho", "bc_threshold", "eta"} and task["dac"]["eta"] == 1.0, path.name  # runs.sh
        for name, block in task.items():
            if isinstance(block, dict):
                assert not acting_keys & block.keys(), (path.name, name)


# ---- one rule from every entry point ------------------------------------------------------------

@pytest.fixture
def dql_checkpoint(minari_root, tmp_path) -> Path:
    random_dataset("test/hopper/random-v0", n_steps=300)
    overrides = ["algo=dql", "dataset=test/hopper/random-v0", "steps=2", "batch_size=32", "eval_every=0",
                 "device=cpu", f"run_dir={tmp_path / 'run'}", "algo.params.selection=mode",
                 *(f"algo.params.{k}={v}" for k, v in {**SMALL["dql"], "num_candidates": 4}.items())]
    return train(compose_config(overrides))


def test_one_rule_flows_from_train_evaluate_sweep_and_load_policy_to_the_agent(dql_checkpoint, tmp_path,
                                                                                monkeypatch):
    from cleandiff_rl import evaluation

    assert load_policy(str(dql_checkpoint)).config.selection == "mode"  # train's algo.params.selection
    policy = load_policy(str(dql_checkpoint), selection="argmax", settings={"num_candidates": 3})
    assert (policy.config.selection, policy.config.num_candidates) == ("argmax", 3)
    with pytest.raises(ValueError, match="unknown selection 'expectile'"):
        load_policy(str(dql_checkpoint), selection="expectile")

    record = evaluation.evaluate_checkpoint(compose_config(
        [f"checkpoint={dql_checkpoint}", "selection=softmax", "episodes=1", "device=cpu",
         f"run_dir={tmp_path / 'eval'}"], config_name="evaluate"))
    assert record["act_settings"]["selection"] == "softmax"

    seen = []
    monkeypatch.setattr(evaluation, "sweep", lambda policy, *args, **kwargs: seen.append(policy.config.selection) or [])
    evaluation.run_sweep(compose_config([f"checkpoint={dql_checkpoint}", "selection=sample", "solvers=[ddim]", "steps=[2]",
                              "episodes=1", "device=cpu", f"run_dir={tmp_path / 'sweep'}"], config_name="sweep"))
    assert seen == ["sample"]


def test_a_preset_sets_one_acting_rule_per_algorithm_and_the_paper_is_evaluated_beside_it():
    cpu = compose_config(["suite=cpu"], config_name="benchmark_suite")
    assert set(cpu.acting) == {"dql", "idql", "fql", "diffusion_bc", "diffuser"}
    for algo, rule in cpu.acting.items():
        assert paper_acting(algo, rule) == {key: value for key, value in PAPER[algo].items()
                                            if key in ("selection", *rule)}
        if algo == "diffuser":  # a planner: its composition is its own test's (test_planners.py)
            continue
        for dataset in ("task=hopper-medium-expert", "task=walker2d-medium-replay", "dataset=mujoco/ant/expert-v0"):
            params = compose_config([*algo_overrides(cpu, algo), dataset]).algo.params  # the same on every dataset
            assert {key: params[key] for key in rule} == rule, (algo, dataset)
    for preset in ("gpu", "smoke"):
        assert not compose_config([f"suite={preset}"], config_name="benchmark_suite").acting  # the papers' rules
    assert paper_acting("bc", {}) == {}
    check_acting({"fql": {"selection": "mode"}, "bc": None})
    with pytest.raises(ValueError, match=r"acting.dql sets \['eta'\], which are not act-time settings"):
        check_acting({"dql": {"eta": 0.5}})
