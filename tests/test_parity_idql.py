"""IDQL against the original JAX code (philippe-eecs/IDQL @ 7582571, `DDPMIQLLearner.update`), update by update.

The fixture (tools/parity/idql.py) holds the original's initial weights, 20 batches, every random draw (time
indices, noise, dropout masks), the losses, the weights after the last update and the action it chose. The
project's IDQL runs the same 20 updates with those draws served in order in place of torch.randint, randn_like and
the dropout masks, at the fixture's sizes (LN-ResNet width 32, 2 blocks, Fourier time features 8, critics 32) with
the original's settings: `time: discrete`, T = 5 vp, AdamW 1e-4 with cosine decay (over 40 updates in both, so
the schedule matters; the original's 3e6), EMA 0.999 from step 0, tau 0.005, expectile 0.7, rewards given scaled.

Bounds: float32 rtol 1e-4 with atol 1e-5 on the weights (values near 0) and 1e-4 on the losses. The behavior loss
averages over action dimensions (the original sums them, x 3 here); Adam is invariant to that up to its eps.
The weight decay (1e-4 x lr x 20 updates, ~6e-7 of a weight) is below these bounds: only its presence is run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cleandiff_rl.agents import common
from cleandiff_rl.agents.idql import IDQL
from cleandiff_rl.nn.mlp import IDQLMlp

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "idql.npz"
OBS, ACT, HIDDEN, TIME_DIM, BLOCKS, T = 5, 3, 32, 8, 2, 5
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def fx() -> dict:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def make_agent(fx: dict, monkeypatch: pytest.MonkeyPatch) -> IDQL:
    """The project's IDQL at the fixture's sizes, with the original's initial weights in online and EMA/target copies."""
    monkeypatch.setitem(common.ACTOR_BACKBONES, "resnet", lambda cfg, act_dim, obs_dim: IDQLMlp(
        act_dim, obs_dim, emb_dim=TIME_DIM, hidden_dim=cfg.hidden_dim, n_blocks=cfg.n_blocks, dropout=cfg.dropout))
    agent = IDQL(OBS, ACT, dict(time="discrete", diffusion_steps=T, hidden_dim=HIDDEN, n_blocks=BLOCKS, dropout=0.1,
                                critic_hidden=HIDDEN, lr_decay_steps=int(fx["meta:decay_steps"])), device="cpu")
    init = {key[len("init:"):]: torch.from_numpy(value) for key, value in fx.items() if key.startswith("init:")}
    copies = {key.replace(".model.", ".model_ema."): v for key, v in init.items() if key.startswith("actor.model.")}
    copies.update({key.replace("critic.", "critic_target.", 1): v for key, v in init.items() if key.startswith("critic.")})
    missing = agent.load_state_dict({**init, **copies}, strict=False).missing_keys
    assert set(missing) <= {"reward_scale", "probe_obs", "actor.x_min", "actor.x_max", "actor._extra_state"}, missing
    return agent


def replay_draws(fx: dict, monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Serve the original's draws in order: time indices (randint), noise (randn_like), dropout keep masks."""
    queues = {"time": list(torch.from_numpy(fx["draw:time"])), "noise": list(torch.from_numpy(fx["draw:noise"])),
              "keep": [torch.from_numpy(m) for update in fx["draw:dropout_keep"] for m in update]}

    def randint(low, high, size, **kwargs):
        assert (low, high, tuple(size)) == (0, T, tuple(queues["time"][0].shape))
        return queues["time"].pop(0)

    def randn_like(x, **kwargs):
        assert x.shape == queues["noise"][0].shape
        return queues["noise"].pop(0).to(x.dtype)

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return x
        keep = queues["keep"].pop(0)
        assert keep.shape == x.shape
        return torch.where(keep, x / (1.0 - p), torch.zeros_like(x))  # flax: where(mask, x / keep_prob, 0)

    monkeypatch.setattr(torch, "randint", randint)
    monkeypatch.setattr(torch, "randn_like", randn_like)
    monkeypatch.setattr(F, "dropout", dropout)
    return queues


def run_updates(fx: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[IDQL, dict[str, np.ndarray], list[float]]:
    torch.manual_seed(0)
    agent = make_agent(fx, monkeypatch)
    queues = replay_draws(fx, monkeypatch)
    metrics: dict[str, list] = {"actor_loss": [], "value_loss": [], "critic_loss": [], "v": []}
    lrs = []
    for u in range(len(fx["batch:obs"])):
        lrs.append(float(agent.actor.optimizer.param_groups[0]["lr"]))
        batch = {key: torch.from_numpy(fx[f"batch:{key}"][u]) for key in ("obs", "act", "rew", "next_obs", "terminal")}
        out = agent.update(batch)
        metrics["actor_loss"].append(out["actor/bc_loss"] * ACT)  # the original sums over action dimensions
        metrics["value_loss"].append(out["value/loss"])
        metrics["critic_loss"].append(out["critic/loss"])
        metrics["v"].append(out["value/v_mean"])
    assert not any(queues.values()), {key: len(q) for key, q in queues.items()}
    return agent, {key: np.asarray(v) for key, v in metrics.items()}, lrs


@pytest.fixture
def trained(fx: dict, monkeypatch: pytest.MonkeyPatch):
    torch.set_num_threads(1)
    return run_updates(fx, monkeypatch)


def test_losses_match_the_original(fx: dict, trained) -> None:
    _, metrics, lrs = trained
    np.testing.assert_allclose(lrs, fx["actor_lr"], rtol=1e-6)
    for key, values in metrics.items():
        np.testing.assert_allclose(values, fx[f"loss:{key}"], rtol=RTOL, atol=1e-4, err_msg=key)


def test_weights_after_20_updates_match_the_original(fx: dict, trained) -> None:
    agent, _, _ = trained
    state = agent.state_dict()
    finals = {key[len("final:"):]: value for key, value in fx.items() if key.startswith("final:")}
    assert {key.split(".")[0] for key in finals} == {"actor", "critic", "critic_target", "value"}
    for key, expected in finals.items():
        np.testing.assert_allclose(state[key].numpy(), expected, rtol=RTOL, atol=ATOL, err_msg=key)


def test_action_matches_the_original(fx: dict, trained) -> None:
    """The original's DDPM recurrence (variance beta_t, x clipped each step) run with this project's EMA actor and
    schedule on the original's noise gives its candidates; the target critic's argmax min Q picks its action."""
    agent, _, _ = trained
    schedule = agent.actor.schedule
    abar = schedule.alphas_cumprod
    alphas = abar / torch.cat([abar.new_ones(1), abar[:-1]])
    np.testing.assert_allclose((1 - alphas).numpy(), fx["betas"], rtol=1e-6)
    obs = torch.from_numpy(fx["act:state"]).expand(len(fx["act:x_T"]), -1)
    net = agent.actor.model_ema["diffusion"]
    x = torch.from_numpy(fx["act:x_T"])
    with torch.no_grad():
        for k, step in enumerate(range(T - 1, -1, -1)):
            np.testing.assert_allclose(x.numpy(), fx["act:trajectory"][k], rtol=RTOL, atol=ATOL)
            eps = net(x, torch.full((len(x),), step), obs)
            a, ab = alphas[step].float(), abar[step].float()
            x = (x - (1 - a) / (1 - ab).sqrt() * eps) / a.sqrt()
            x = (x + (step > 0) * (1 - a).sqrt() * torch.from_numpy(fx["act:z"][k])).clamp(-1, 1)
        np.testing.assert_allclose(x.numpy(), fx["act:candidates"], rtol=RTOL, atol=ATOL)
        q = agent.critic_target.q_min(obs, torch.from_numpy(fx["act:candidates"]))
    np.testing.assert_allclose(q.numpy(), fx["act:q"], rtol=RTOL, atol=ATOL)
    index = int(q.argmax())
    assert index == int(fx["act:index"])
    np.testing.assert_array_equal(fx["act:candidates"][index], fx["act:action"])
