"""Diffusion-QL and Diffusion BC update by update against the original code (Zhendong-Wang/
Diffusion-Policies-for-Offline-RL@d871f5c), whose runs tools/parity/dql.py recorded in fixtures/parity/dql.npz.

Both sides start from the same weights (obs 11, act 3, hidden 64, batch 16), see the same 25 batches and the same
random draws: torch.randn / randn_like / randint are replaced by a queue of the original's draws in the order this
project consumes them (a shape or kind out of order fails). Two draws are mapped, not dropped silently:
* the original draws x_T ~ N(0, I) unscaled, this project sigma_T * N(0, I) (sigma_T = 0.9968 on the 5-level VP
  table): the queue holds x_T / sigma_T, so both start the chain from the same x_T (a deliberate departure);
* the original draws ancestral noise at t = 0 too and masks it; this project's last step draws none: skipped.
The critic the Q loss maximizes is the original's np.random.uniform() > 0.5 (Q1), the project's randint 0.
The original's settings: `ema_warmup: hold` (its EMA keeps the initial weights until step_start_ema, here 10
for both sides, then averages after steps 10, 15, 20), Adam (AdamW with weight decay 0), grad_norm 0.5, no lr decay,
acting with softmax over 50 candidates of the online actor.

Tolerance: rtol 1e-4, atol 1e-6 in float32. The two sides order their float operations differently (the posterior
coefficients in float64 vs the original's float32 buffers, fused Adam, Mish from one sigmoid), and 25 Adam
steps carry those rounding differences along. Seen: losses within 3e-6 relative, every final weight within 3e-7,
the action within 1e-7; `-s` prints the largest relative error (|value| floored at atol / rtol).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cleandiff_rl.agents import get_algorithm
from cleandiff_rl.diffusion.solvers import level_at
from recorded_draws import Draws

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "dql.npz"
RTOL, ATOL = 1e-4, 1e-6
ACT_SEED = 1234  # the global seed before the original's multinomial draw (tools/parity/dql.py)
ACTOR = {"hidden_dim": 64, "time": "discrete", "schedule": "linear", "diffusion_steps": 5,
         "schedule_kwargs": {"beta_min": 0.1, "beta_max": 10.0}, "predict": "eps", "solver": "ddpm",
         "sampling_steps": 5, "lr": 3e-4, "weight_decay": 0.0}
DQL = {**ACTOR, "critic_hidden": 64, "critic_lr": 3e-4, "eta": 1.0, "grad_norm": 0.5, "tau": 0.005, "discount": 0.99,
       "ema_rate": 0.995, "ema_every": 5, "ema_start": 10, "ema_warmup": "hold", "critic_layer_norm": False,
       "bc_updates": 0, "selection": "softmax", "num_candidates": 50, "act_with_ema": False, "temperature": 1.0}


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def weights(fx: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) + 1:]: torch.from_numpy(value) for key, value in fx.items() if key.startswith(prefix + "/")}


def batch(fx: dict, k: int) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(fx[f"batch/{key}"][k]) for key in ("obs", "act", "next_obs", "rew", "terminal")}


def check(name: str, got, want, errors: dict) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)
    errors[name] = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), ATOL / RTOL)))


def test_dql_updates_and_action_match_the_original(fx, monkeypatch):
    torch.manual_seed(0)
    agent = get_algorithm("dql")(11, 3, DQL, device="cpu")
    actor = weights(fx, "init/actor")
    agent.actor.model["diffusion"].load_state_dict(actor)
    agent.actor.model_ema["diffusion"].load_state_dict(actor)
    agent.critic.load_state_dict(weights(fx, "init/critic"))
    agent.critic_target.load_state_dict(weights(fx, "init/critic"))
    sigma_T = level_at(agent.actor.schedule, 4).sigma
    draws = Draws(monkeypatch)

    n = len(fx["loss/critic"])
    metrics = []
    for k in range(n):
        draws.chain(fx["noise/tgt_xT"][k], fx["noise/tgt_z"][k], sigma_T)  # target actions (EMA actor)
        draws.add("randint", fx["noise/bc_t"][k])
        draws.add("randn", fx["noise/bc_eps"][k])
        draws.chain(fx["noise/pi_xT"][k], fx["noise/pi_z"][k], sigma_T)  # a_pi (online actor)
        draws.add("randint", torch.tensor(0 if fx["noise/coin"][k] > 0.5 else 1))  # original: > 0.5 maximizes Q1
        metrics.append(agent.update(batch(fx, k)))
        assert not draws.queue, f"update {k} left {len(draws.queue)} recorded draws unused"

    errors: dict[str, float] = {}
    per_update = {key: np.array([m[key] for m in metrics]) for key in metrics[0]}
    check("critic loss", per_update["critic/loss"], fx["loss/critic"], errors)
    check("bc loss", per_update["actor/bc_loss"], fx["loss/bc"], errors)
    check("q loss", per_update["actor/q_loss"], fx["loss/q"], errors)
    check("actor loss", per_update["actor/bc_loss"] + DQL["eta"] * per_update["actor/q_loss"], fx["loss/actor"], errors)
    check("critic grad norm", per_update["critic/grad_norm"], fx["grad_norm/critic"], errors)
    check("actor grad norm", per_update["actor/grad_norm"], fx["grad_norm/actor"], errors)
    check("target mean", per_update["critic/target_mean"], fx["target_mean"], errors)
    assert (fx["grad_norm/critic"] > DQL["grad_norm"]).mean() > 0.5 and (fx["grad_norm/actor"] > DQL["grad_norm"]).any()
    modules = {"actor": agent.actor.model["diffusion"], "actor_ema": agent.actor.model_ema["diffusion"],
               "critic": agent.critic, "critic_target": agent.critic_target}
    for name, module in modules.items():
        final = weights(fx, f"final/{name}")
        assert sorted(final) == sorted(dict(module.named_parameters()))
        for key, value in module.named_parameters():
            check(f"{name}.{key}", value.detach(), final[key], errors)
    init = weights(fx, "init/actor")  # the EMA has moved off its initial weights (3 averages), and not onto the actor
    assert not torch.allclose(modules["actor_ema"].net[0].weight, init["net.0.weight"], rtol=1e-5, atol=0)

    # acting: 50 candidates from the online actor, one drawn with probability softmax(min target Q)
    probs = []
    multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, *a, **kw: probs.append(p.clone()) or multinomial(p, *a, **kw))
    draws.chain(fx["act/xT"], fx["act/z"], sigma_T)
    action = agent.act(fx["act/state"], generator=torch.Generator().manual_seed(ACT_SEED))
    assert not draws.queue and len(probs) == 1
    check("candidate probabilities", probs[0].flatten(), fx["act/probs"], errors)
    check("action", action, fx["act/action"], errors)
    print(f"\nlargest relative error: {max(errors.values()):.2e} ({max(errors, key=errors.get)})")


def test_dql_parity_settings_are_the_defaults_but_for_the_fixture():
    """The settings the parity runs are this project's defaults except: the fixture's widths (the original: 256, the
    defaults), a grad_norm that clips (per task, 1-9), an EMA start reached within 25 updates and the original's
    EMA warm-up (`ema_warmup: copy` by default, a departure)."""
    import dataclasses

    default = dataclasses.asdict(get_algorithm("dql").Config())
    assert {key for key, value in DQL.items() if default[key] != value} == {
        "hidden_dim", "critic_hidden", "grad_norm", "ema_start", "ema_warmup"}
    assert (default["hidden_dim"], default["critic_hidden"], default["ema_start"]) == (256, 256, 1000)


def test_diffusion_bc_updates_match_the_original_bc_loss(fx, monkeypatch):
    """Diffusion BC's update is Diffusion-QL's BC term alone: the original's Diffusion_BC (no clipping, lr 3e-4)."""
    agent = get_algorithm("diffusion_bc")(11, 3, ACTOR, device="cpu")
    agent.actor.model["diffusion"].load_state_dict(weights(fx, "init/actor"))
    draws = Draws(monkeypatch)
    losses, errors = [], {}
    for k in range(len(fx["bc/loss"])):
        draws.add("randint", fx["bc/noise/t"][k])
        draws.add("randn", fx["bc/noise/eps"][k])
        losses.append(agent.update(batch(fx, k))["actor/bc_loss"])
        assert not draws.queue
    check("bc loss", losses, fx["bc/loss"], errors)
    final = weights(fx, "bc/final/actor")
    for key, value in agent.actor.model["diffusion"].named_parameters():
        check(key, value.detach(), final[key], errors)
    print(f"\nlargest relative error: {max(errors.values()):.2e} ({max(errors, key=errors.get)})")
