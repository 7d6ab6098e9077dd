"""Decision Diffuser against the original (anuragajay/decision-diffuser@01ce528), update by update.

tests/fixtures/parity/decision_diffuser.npz holds the original's run (tools/parity/decision_diffuser.py): initial
weights, 21 updates of two micro-batches of 8 (the original's gradient accumulation 2 is one batch of 16 here),
every random draw, per-update losses, the weights after the last update (online; EMA after one copy and two
averages) and a CFG-guided DDPM plan and action. The agent runs the original's settings (`original_config`: the
`temporal_unet` backbone, `step_temperature`, `clip_denoised`, `inv_tanh: false`, `ema_rule: original`) from the same
weights, batches and draws (torch's random functions replaced by ones that return the recorded values in order)
and must match: float32, rtol 1e-4, atol 1e-6 (largest errors seen: weights 5e-5 relative, plans 2e-5, losses 3e-7).
Departures the test bridges: the original steps one Adam on (diffusion + inverse dynamics) / 2, the agent one Adam
per loss, which is the same update except Adam's eps, m / (sqrt v + 2 eps) against m / (sqrt v + eps): the test
sets eps 2e-8 (without it, weights whose gradients are near 1e-8, e.g. the time MLP's input from the slowest
sinusoid, miss by 1%). The agent scales the initial sampling noise by sigma_T = 0.999997 as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cleandiff_rl.agents import DecisionDiffuser

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "decision_diffuser.npz"
RTOL, ATOL = 1e-4, 1e-6


def original_config(horizon: int, dim: int, steps: int, inv_hidden: int) -> dict:
    """The original's Decision Diffuser (code/config/locomotion_config.py) at the fixture's sizes."""
    return {"horizon": horizon, "time": "discrete", "schedule": "cosine", "diffusion_steps": steps,
            "schedule_kwargs": {}, "predict": "eps", "solver": "ddpm", "sampling_steps": steps,
            "temperature": 0.5, "step_temperature": 0.5, "clip_denoised": True, "backbone": "temporal_unet",
            "model_dim": dim, "dim_mults": [1, 2], "next_state_weight": 1.0, "condition_dropout": 0.25,
            "return_scale": 1.0, "target_return": 0.9, "w_cfg": 1.2, "inv_hidden": inv_hidden, "inv_tanh": False,
            "lr": 2e-4, "inv_lr": 2e-4, "weight_decay": 0.0, "ema_rate": 0.995, "ema_every": 10,
            "ema_start": 10, "ema_rule": "original"}  # the fixture's EMA starts at step 10 (the original: 2000)


class Replay:
    """Stands in for torch.randint / randn_like / rand / randn, returning the recorded draws in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.queues: dict[str, list[torch.Tensor]] = {"randint": [], "randn_like": [], "rand": [], "randn": []}
        monkeypatch.setattr(torch, "randint", lambda low, high, size, **kw: self._pop("randint", size))
        monkeypatch.setattr(torch, "randn_like", lambda x, **kw: self._pop("randn_like", x.shape))
        monkeypatch.setattr(torch, "rand", lambda *size, **kw: self._pop("rand", size))
        monkeypatch.setattr(torch, "randn", lambda size, **kw: self._pop("randn", size))

    def _pop(self, name: str, size) -> torch.Tensor:
        size = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else tuple(size)
        value = self.queues[name].pop(0)
        assert tuple(value.shape) == size, (name, tuple(value.shape), size)
        return value.clone()

    def empty(self) -> bool:
        return not any(self.queues.values())


def load(agent: DecisionDiffuser, params: dict[str, np.ndarray]) -> None:
    """Weights in the fixture's (project) names into the agent's model, its EMA copy and inverse dynamics."""
    model = {k: torch.from_numpy(v) for k, v in params.items() if not k.startswith("inverse_dynamics.")}
    agent.model.model.load_state_dict(model)
    agent.model.model_ema.load_state_dict(model)
    inverse_dynamics = {k.removeprefix("inverse_dynamics."): torch.from_numpy(v)
                        for k, v in params.items() if k.startswith("inverse_dynamics.")}
    agent.inverse_dynamics.load_state_dict(inverse_dynamics)
    agent.inverse_dynamics_ema.load_state_dict(inverse_dynamics)


def assert_params(actual: dict[str, torch.Tensor], expected: dict[str, np.ndarray], what: str) -> None:
    """Every tensor equal to the fixture's (which may hold the first entries of the flattened tensor only)."""
    assert actual.keys() == expected.keys(), what
    for name, value in actual.items():
        value = value.detach().numpy()
        value = value if value.shape == expected[name].shape else value.ravel()[:expected[name].size]
        np.testing.assert_allclose(value, expected[name], rtol=RTOL, atol=ATOL, err_msg=f"{what} {name}")


def section(fix, prefix: str) -> dict[str, np.ndarray]:
    return {k.removeprefix(prefix): fix[k] for k in fix.files if k.startswith(prefix)}


def test_decision_diffuser_matches_original(monkeypatch):
    torch.set_num_threads(1)
    fix = np.load(FIXTURE)
    obs_dim, act_dim, horizon, dim, steps, inv_hidden, batch = (int(v) for v in fix["settings"])
    agent = DecisionDiffuser(obs_dim, act_dim, original_config(horizon, dim, steps, inv_hidden), device="cpu")
    load(agent, section(fix, "init/"))
    for optimizer in agent.optimizers().values():  # Adam on g with eps 2e-8 = Adam on g / 2 with eps 1e-8 (docstring)
        for group in optimizer.param_groups:
            group["eps"] = 2e-8
    replay = Replay(monkeypatch)

    losses = []
    for i in range(len(fix["losses"])):
        replay.queues["randint"].append(torch.from_numpy(fix["draw/t"][i]))
        replay.queues["randn_like"].append(torch.from_numpy(fix["draw/noise"][i]))
        # label dropout: the agent keeps a row where rand >= 0.25, the original where its Bernoulli(0.75) drew 1;
        # draws at the threshold's two sides, so that any other dropout probability fails
        keep = fix["draw/mask"][i] > 0
        replay.queues["rand"].append(torch.from_numpy(np.where(keep, 0.25, 0.249).astype(np.float32)))
        out = agent.update({"obs": torch.from_numpy(fix["batch/obs"][i]), "act": torch.from_numpy(fix["batch/act"][i]),
                            "values": torch.from_numpy(fix["batch/returns"][i]),
                            "mask": torch.ones(batch, horizon)})
        losses.append([out["model/loss"], out["inverse_dynamics/loss"]])
        assert replay.empty()
    np.testing.assert_allclose(losses, fix["losses"], rtol=RTOL, atol=ATOL)

    online = {**{k: v for k, v in agent.model.model.named_parameters()},
              **{f"inverse_dynamics.{k}": v for k, v in agent.inverse_dynamics.named_parameters()}}
    assert_params(online, section(fix, "final/"), "online")
    ema = {**{k: v for k, v in agent.model.model_ema.named_parameters()},
           **{f"inverse_dynamics.{k}": v for k, v in agent.inverse_dynamics_ema.named_parameters()}}
    assert_params(ema, section(fix, "ema/"), "EMA")

    noise = torch.from_numpy(fix["act/noise"])
    replay.queues["randn"] += list(noise[:-1])  # the original also draws noise at its last step (t = 0), unused
    with torch.no_grad():
        action = agent._act(torch.from_numpy(fix["act/obs"]), "ddpm", steps, None)
    assert replay.empty()
    np.testing.assert_allclose(agent.last_plan.numpy(), fix["act/plans"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(action.numpy(), fix["act/action"], rtol=RTOL, atol=ATOL)
