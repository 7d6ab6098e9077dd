"""DAC against the original JAX code (Fang-Lin93/DAC @ e254357, `DACLearner.update`), update by update.

The fixture (tools/parity/dac.py) holds the original's initial weights, 24 batches, every random draw (the critic
target sampler's x_T and per-step z, the actor's time indices and noise), the losses, eta after each dual-ascent
step, the weights after the last update (online and target/EMA) and the action `sample_actions` chose. The project's
DAC runs the same updates with those draws served in order in place of torch.randn / randint / randn_like, at the
fixture's sizes (width 32, 10 Q heads, 4 target actions) with the original's settings there: T = 5 vp, Adam 3e-4
clipped at norm 1 with cosine decay over 40 updates, rho 1.5, eta_lr 0.05, bc_threshold 0.9, `ema_warmup: hold`
(EMA 0.995 every 2 updates after update 5), tau 0.005, rewards given unscaled.

Two draws are rescaled so the project's shared sampler makes the original's steps: its x_T is sigma_T N(0, I)
(the VP prior at the first level), so it is fed x_T / sigma_T; its DDPM step adds the posterior std times z where
the original adds sqrt(beta_t) z, so it is fed z sqrt(beta_t) / posterior std (the documented departure).

Bounds: float32 rtol 1e-4 with atol 1e-5 on losses and weights (values near 0; both run float32 with operations
ordered differently, and 24 Adam steps carry that rounding).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cleandiff_rl.agents.dac import DAC
from cleandiff_rl.diffusion.solvers import get_solver

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "dac.npz"
OBS, ACT, HIDDEN, HEADS, NQ, T = 5, 3, 32, 10, 4, 5
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def fx() -> dict:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def make_agent(fx: dict, **overrides) -> DAC:
    """The project's DAC at the fixture's sizes and settings, with the original's initial weights."""
    config = dict(hidden_dim=HIDDEN, critic_hidden=HIDDEN, num_qs=HEADS, num_q_samples=NQ,
                  rho=float(fx["meta:rho"]), eta=float(fx["meta:eta"]), eta_lr=float(fx["meta:eta_lr"]),
                  bc_threshold=float(fx["meta:bc_threshold"]), ema_warmup="hold",
                  ema_start=int(fx["meta:step_start_ema"]), ema_every=int(fx["meta:update_ema_every"]),
                  ema_rate=1.0 - float(fx["meta:ema_tau"]), tau=float(fx["meta:ema_tau"]),
                  lr=float(fx["meta:actor_lr"]), critic_lr=float(fx["meta:critic_lr"]),
                  grad_norm=float(fx["meta:clip_grad_norm"]), lr_decay_steps=int(fx["meta:decay_steps"]),
                  discount=float(fx["meta:discount"]), scale_rewards=False, num_candidates=10, selection="argmax")
    agent = DAC(OBS, ACT, {**config, **overrides}, device="cpu")
    init = {key[len("init:"):]: torch.from_numpy(value) for key, value in fx.items() if key.startswith("init:")}
    copies = {key.replace(".model.", ".model_ema."): v for key, v in init.items() if key.startswith("actor.model.")}
    copies.update({key.replace("critic.", "critic_target.", 1): v for key, v in init.items() if key.startswith("critic.")})
    missing = agent.load_state_dict({**init, **copies}, strict=False).missing_keys
    assert set(missing) <= {"eta", "reward_scale", "probe_obs", "actor.x_min", "actor.x_max", "actor._extra_state"}, missing
    return agent


def sampler_draws(agent: DAC, prior: np.ndarray, z: np.ndarray) -> list[torch.Tensor]:
    """The original's x_T and per-step z as the draws the project's DDPM sampler takes (see the module)."""
    levels, coefs = agent.actor.plan(get_solver("ddpm"), T, "uniform")
    draws = [torch.from_numpy(prior) / levels[0].sigma]
    for i in range(T - 1):  # the original's steps t = 5..2 add noise; t = 1 adds none
        beta = 1.0 - (levels[i].alpha / levels[i + 1].alpha) ** 2
        draws.append(torch.from_numpy(z[i]) * (math.sqrt(beta) / coefs[i].noise))
    return draws


def serve(monkeypatch: pytest.MonkeyPatch, queue: list[torch.Tensor]) -> None:
    """torch.randn / randn_like / randint return the queue's tensors in order (the shapes are checked)."""

    def pop(shape) -> torch.Tensor:
        value = queue.pop(0)
        assert tuple(value.shape) == tuple(shape), (tuple(value.shape), tuple(shape))
        return value.clone()

    monkeypatch.setattr(torch, "randn", lambda *size, **kw: pop(size[0] if len(size) == 1 else size).float())
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: pop(x.shape).to(x.dtype))
    monkeypatch.setattr(torch, "randint", lambda low, high, size, **kw: pop(size).long())


def run_updates(fx: dict, monkeypatch: pytest.MonkeyPatch, **overrides) -> tuple[DAC, dict[str, list[float]]]:
    agent = make_agent(fx, **overrides)
    queue: list[torch.Tensor] = []
    serve(monkeypatch, queue)
    seen: dict[str, list[float]] = {"critic_loss": [], "bc_loss": [], "guidance_loss": [], "eta": [], "q_mean": []}
    for k in range(len(fx["data:obs"])):
        batch = {key: torch.from_numpy(fx[f"data:{key}"][k]) for key in ("obs", "act", "rew", "next_obs", "terminal")}
        queue[:] = [*sampler_draws(agent, fx["data:prior"][k], fx["data:z"][k]),
                    torch.from_numpy(fx["data:time"][k]) - 1,  # the original's t = 1..T is the project's index 0..T-1
                    torch.from_numpy(fx["data:noise"][k])]
        metrics = agent.update(batch)
        assert not queue
        for key, name in (("critic_loss", "critic/loss"), ("bc_loss", "actor/bc_loss"),
                          ("guidance_loss", "actor/guidance_loss"), ("eta", "actor/eta"), ("q_mean", "critic/q_mean")):
            seen[key].append(metrics[name])
    return agent, seen


def test_dac_updates_match_the_original(fx, monkeypatch):
    agent, seen = run_updates(fx, monkeypatch)
    worst = 0.0
    for key, values in seen.items():
        expected = fx[f"data:{key}"]
        np.testing.assert_allclose(values, expected, rtol=RTOL, atol=ATOL, err_msg=key)
        worst = max(worst, float(np.max(np.abs(np.asarray(values) - expected) / (np.abs(expected) + 1e-12))))
    assert seen["eta"][-1] != pytest.approx(1.0, abs=0.05)  # the dual ascent moved eta
    state = agent.state_dict()
    for prefix in ("final:", "final_target:"):
        for key, value in fx.items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                np.testing.assert_allclose(state[name].numpy(), value, rtol=RTOL, atol=ATOL, err_msg=name)
    print(f"largest relative loss error {worst:.2e}")


def test_dac_acting_matches_the_original(fx, monkeypatch):
    """The 10 candidates from the final online actor, their mean Q of the target critics, and the argmax."""
    agent, _ = run_updates(fx, monkeypatch)
    obs = torch.from_numpy(fx["act:obs"])
    queue = sampler_draws(agent, fx["act:prior"], fx["act:z"])
    serve(monkeypatch, queue)
    candidates, _ = agent.draw(obs, 10, temperature=1.0, solver="ddpm", steps=T, generator=None)
    np.testing.assert_allclose(candidates.numpy(), fx["act:candidates"], rtol=RTOL, atol=ATOL)
    score, _, _ = agent.rate(obs.repeat_interleave(10, 0), candidates)
    np.testing.assert_allclose(score.detach().numpy(), fx["act:q"], rtol=RTOL, atol=ATOL)
    queue[:] = sampler_draws(agent, fx["act:prior"], fx["act:z"])
    np.testing.assert_allclose(agent.act(fx["act:obs"]), fx["act:action"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("change", [{"rho": 1.0}, {"tau": 0.01}, {"eta_lr": 0.0}, {"ema_warmup": "copy"}])
def test_dac_parity_fails_when_a_setting_changes(fx, monkeypatch, change):
    """The comparison is sharp: one setting off and the updates no longer match."""
    agent, seen = run_updates(fx, monkeypatch, **change)
    state = agent.state_dict()
    close = all(np.allclose(seen[key], fx[f"data:{key}"], rtol=RTOL, atol=ATOL) for key in seen) and all(
        np.allclose(state[key.split(":", 1)[1]].numpy(), value, rtol=RTOL, atol=ATOL)
        for key, value in fx.items() if key.startswith("final_target:"))
    assert not close
