"""FQL against the original (seohongpark/fql @ 719d044, agents/fql.py): 20 updates from the same weights,
batches and random draws (tests/fixtures/parity/fql.npz, written by tools/parity/fql.py from the original's
JAX code) give the same losses at every update, the same parameters after the last and the same one-step action.

Two settings: the original's defaults (q_agg mean, alpha 10, tau 0.005, lr 3e-4) and a variant (q_agg min,
normalize_q_loss, alpha 3, tau 0.1, lr 1e-3). The draws are injected by replacing torch.randn_like and
torch.rand with the recorded ones, in the order train_step draws them: the target's next-action noise, the
flow time, the flow noise, the distillation noise. The original's flow time s (noise at 0) is this project's
t = 1 - s, written through the schedule's t = t_min + (1 - t_min) u. Tolerance: float32, rtol 1e-4 with atol
1e-5 (losses) and 2e-5 (parameters, which Adam moves by about lr per update: an element whose gradient is
near zero takes a rounding-sized gradient to a step of up to lr in either framework).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cleandiff_rl.agents.fql import FQL

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "fql.npz"
LOSSES = ("critic/loss", "flow/bc_loss", "actor/distill_loss", "actor/q_loss")  # the fixture's loss columns


@pytest.fixture(scope="module")
def fixture() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return dict(data)


def _layers(agent: FQL) -> dict[str, tuple[torch.nn.Sequential, int, int]]:
    """Each fixture net: the Sequential, its Linear layers' stride and the LayerNorm's offset in it."""
    critic, target = agent.critic, agent.critic_target
    return {"actor": (agent.actor, 2, 0), "flow": (agent.flow.model["diffusion"].net, 2, 0),
            "critic0": (critic.q1, 3, 2), "critic1": (critic.q2, 3, 2),
            "target0": (target.q1, 3, 2), "target1": (target.q2, 3, 2)}


def _tensors(agent: FQL, fx: dict, prefix: str):
    """(name, this project's tensor, the fixture's array) for every parameter."""
    for net, (seq, stride, ln) in _layers(agent).items():
        i = 0
        while f"{prefix}/{net}/dense{i}_w" in fx:
            yield f"{net}/dense{i}_w", seq[stride * i].weight, fx[f"{prefix}/{net}/dense{i}_w"]
            yield f"{net}/dense{i}_b", seq[stride * i].bias, fx[f"{prefix}/{net}/dense{i}_b"]
            if f"{prefix}/{net}/ln{i}_w" in fx:
                yield f"{net}/ln{i}_w", seq[stride * i + ln].weight, fx[f"{prefix}/{net}/ln{i}_w"]
                yield f"{net}/ln{i}_b", seq[stride * i + ln].bias, fx[f"{prefix}/{net}/ln{i}_b"]
            i += 1


def _run(fx: dict, setting: str, monkeypatch, **options) -> tuple[FQL, np.ndarray]:
    """This project's FQL with the setting's config, the fixture's initial weights and draws; returns the agent
    after all updates and the losses per update."""
    torch.set_num_threads(1)
    config = {"hidden_dim": 64, "n_layers": 2, "q_agg": str(fx[f"{setting}/config/q_agg"]),
              "normalize_q_loss": bool(fx[f"{setting}/config/normalize_q_loss"]),
              "sampling_steps": int(fx[f"{setting}/config/flow_steps"])}
    for key in ("alpha", "tau", "discount"):
        config[key] = float(fx[f"{setting}/config/{key}"])
    config["lr"] = config["critic_lr"] = float(fx[f"{setting}/config/lr"])
    config.update(options)
    obs_dim, act_dim = fx["obs"].shape[-1], fx["act"].shape[-1]
    agent = FQL(obs_dim, act_dim, config, device="cpu")
    with torch.no_grad():
        for name, tensor, value in _tensors(agent, fx, "init"):
            assert tensor.shape == value.shape, name
            tensor.copy_(torch.from_numpy(value))

    schedule = agent.flow.schedule
    draws: list[tuple[str, torch.Tensor]] = []

    def pop(kind: str, shape: torch.Size) -> torch.Tensor:
        expected, value = draws.pop(0)
        assert expected == kind and value.shape == shape, (kind, expected, tuple(shape), tuple(value.shape))
        return value.clone()

    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: pop("randn", x.shape))
    monkeypatch.setattr(torch, "rand", lambda *size, **kw: pop("rand", torch.Size(size)))
    losses = []
    for i in range(len(fx["obs"])):
        u = (1.0 - fx[f"{setting}/flow_t"][i].astype(np.float64) - schedule.t_min) / (schedule.t_max - schedule.t_min)
        draws[:] = [("randn", torch.from_numpy(fx[f"{setting}/next_noise"][i])),
                    ("rand", torch.from_numpy(u.astype(np.float32))),
                    ("randn", torch.from_numpy(fx[f"{setting}/flow_x0"][i])),
                    ("randn", torch.from_numpy(fx[f"{setting}/distill_noise"][i]))]
        batch = {k: torch.from_numpy(fx[k][i]) for k in ("obs", "act", "next_obs", "rew", "terminal")}
        metrics = agent.update(batch)
        assert not draws, "train_step drew fewer random tensors than the original"
        losses.append([metrics[k] for k in LOSSES])
    monkeypatch.undo()
    return agent, np.asarray(losses)


@pytest.mark.parametrize("setting", ["default", "variant"])
def test_fql_update_matches_the_original(fixture, setting, monkeypatch):
    agent, losses = _run(fixture, setting, monkeypatch)
    np.testing.assert_allclose(losses, fixture[f"{setting}/losses"], rtol=1e-4, atol=1e-5)
    for name, tensor, value in _tensors(agent, fixture, f"{setting}/final"):
        np.testing.assert_allclose(tensor.detach().numpy(), value, rtol=1e-4, atol=2e-5, err_msg=name)
    with torch.no_grad():
        action = agent.one_step(torch.from_numpy(fixture["probe_obs"]), torch.from_numpy(fixture["probe_z"]))
    np.testing.assert_allclose(action.numpy(), fixture[f"{setting}/probe_action"], rtol=1e-4, atol=1e-5)
    assert (action.abs() == 1.0).any() and (action.abs() < 1.0).any()  # the probe exercises the clip


def test_fql_sequential_steps_is_not_the_originals_update(fixture, monkeypatch):
    """`sequential_steps` (the critic and the flow step before the actor's losses and the target read them)
    departs from the original in the actor's losses from the first update, by far more than the tolerance."""
    _, losses = _run(fixture, "variant", monkeypatch, sequential_steps=True)
    expected = fixture["variant/losses"]
    np.testing.assert_allclose(losses[0, :2], expected[0, :2], rtol=1e-4, atol=1e-5)  # critic and flow losses
    assert np.abs(losses[0, 2:] - expected[0, 2:]).min() > 1e-3  # the actor's read the stepped critic and flow
    assert np.abs(losses[1:] - expected[1:]).max() > 1e-2
