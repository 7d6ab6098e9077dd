"""`compile=true` (`Agent.compile_networks`): torch.compile'd networks train like eager ones, and checkpoints
do not change. Tiny networks, a few updates: compiling them takes 10-40 s on one CPU core (less when
inductor's cache under /tmp already holds the graphs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from offline_data import random_dataset
from test_agents import SMALL, train_config

from cleandiff_rl.agents import get_algorithm, load_policy
from cleandiff_rl.training import train
from cleandiff_rl.utils import load_checkpoint


@pytest.mark.slow  # 20 s, about a minute with an empty inductor cache
def test_compiled_diffusion_ql_trains_and_acts_like_eager_and_saves_the_same_keys(minari_root, tmp_path):
    hopper_random = "test/hopper/random-v0"
    random_dataset(hopper_random, n_steps=600)
    batches = [{"obs": torch.randn(64, 11), "act": torch.rand(64, 3) * 2 - 1, "next_obs": torch.randn(64, 11),
                "rew": torch.randn(64), "terminal": (torch.rand(64) < 0.1).float()} for _ in range(4)]
    obs = np.random.default_rng(0).normal(size=(5, 11))

    def run(compiled: bool) -> tuple[list[dict], dict, np.ndarray, list[str]]:
        torch.manual_seed(0)
        agent = get_algorithm("dql")(11, 3, {**SMALL["dql"], "ema_start": 0}, device="cpu")
        names = agent.compile_networks() if compiled else []
        metrics = [agent.update(batch) for batch in batches]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs or not compiled
        actions = agent.act(obs, generator=torch.Generator().manual_seed(3))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # acting stays eager
        return metrics, agent.state_dict(), actions, names

    compiled, eager = run(True), run(False)
    assert compiled[3] == ["actor.model.diffusion", "actor.model_ema.diffusion", "critic", "critic_target"]
    for step_compiled, step_eager in zip(compiled[0], eager[0]):
        assert step_compiled.keys() == step_eager.keys()
        for key in step_compiled:
            assert step_compiled[key] == pytest.approx(step_eager[key], rel=1e-4, abs=1e-5), key
    assert list(compiled[1]) == list(eager[1])  # no `_orig_mod.` prefixes
    for key, value in eager[1].items():
        torch.testing.assert_close(compiled[1][key], value, rtol=1e-4, atol=1e-5, equal_nan=True, msg=key)  # probe_obs: NaN
    np.testing.assert_allclose(compiled[2], eager[2], rtol=1e-4, atol=1e-5)

    # through train(): the same checkpoint keys and (nearly) the same weights; load_policy reads it
    paths = {flag: train(train_config("dql", hopper_random, tmp_path / flag, steps=3, compile=flag))
             for flag in ("true", "false")}
    states = {flag: load_checkpoint(path)["model"] for flag, path in paths.items()}
    assert list(states["true"]) == list(states["false"])
    for key, value in states["false"].items():
        torch.testing.assert_close(states["true"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert load_policy(str(paths["true"]), "cpu").act(obs).shape == (5, 3)
