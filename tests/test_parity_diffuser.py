"""Parity of Diffuser with the original, jannerm/diffuser@7ea4228 (fixture: tools/parity/diffuser.py).

From the same initial weights (`init_weights`, rebuilt here), the fixture's batches and noise draws
(torch.randint / randn / randn_like replaced by the original's recorded draws, in order), this project's Diffuser
reproduces the original's (a) 22 diffusion-model losses, parameters and EMA, (b) 22 value losses and parameters,
(c) the guided plans at the initial weights (n_step_guided_p_sample: n_guide_steps, scale, t_stopgrad,
scale_grad_by_std, posterior mean + sigma z), their values, their order and the first action of the best, for two
guide settings, and (d) one forward pass of the U-Net with attention. The original's settings: time discrete, T = 20, its cosine table sampled from index 19
(`t_end: 1.0`), x0 prediction, ddpm, raw value targets; [a, s] windows are permuted to [s, a] in the fixture.
Tolerance, float64 on both sides (tools/parity/diffuser.py says why): rtol 1e-7, atol 1e-9 (seen: 1e-15 for the
diffusion model and its EMA, 1e-11 for the plans); the value network rtol 1e-5, atol 1e-5 (seen: loss 1e-7,
weights 1.2e-6): its loss is ~3e3 and its mid2 GroupNorms normalize two values each, so its updates amplify
float64 rounding about tenfold per update.
EMA: the original updates it after updates 1, 11, 21, ... (Trainer: `step % 10 == 0` before `step += 1`,
step_start_ema 0 in the fixture); this project after updates 10, 20, ... The test starts the model's update
counter at -1 (and ema_start at -1) to compare the same EMA arithmetic at the original's phase.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cleandiff_rl.agents import Diffuser
from cleandiff_rl.nn import JannerUNet1d

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "diffuser.npz"
OBS, ACT, PLANS = 4, 2, 8
GUIDES = [dict(scale=0.5, t_stopgrad=2, n_guide_steps=2, scale_grad_by_std=True),
          dict(scale=1.0, t_stopgrad=4, n_guide_steps=1, scale_grad_by_std=False)]
DRAWS_PER_PLAN = 21  # x_T and one draw per step; the original's last (t = 0) draw is zeroed, ours is not drawn


@pytest.fixture(scope="module", autouse=True)
def float64():
    """The fixture is float64 (see the module docstring); the agent and networks are built in it too."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def init_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fixture's initial weights (tools/parity/diffuser.py `init_weights`, the same rule): in sorted name order,
    from one seed-0 generator, matrices and kernels U(-1, 1) / sqrt(fan_in), 1-D weights 1 + U(-0.1, 0.1), biases
    U(-0.1, 0.1)."""
    g, state = torch.Generator().manual_seed(0), {}
    for name, p in sorted(module.state_dict().items()):
        u = torch.rand(p.shape, generator=g) * 2 - 1
        if p.dim() > 1:
            state[name] = u / math.sqrt(p[0].numel())
        else:
            state[name] = 1 + 0.1 * u if name.endswith("weight") else 0.1 * u
    module.load_state_dict(state, strict=True)
    return state


def draws(fx: dict, name: str) -> list[torch.Tensor]:
    return [torch.as_tensor(fx[f"{name}/{j}"]) for j in range(int(fx[f"{name}_count"]))]


class Replay:
    """torch.randint / randn / randn_like returning the original's recorded draws, in order."""

    def __init__(self, monkeypatch, queue: list[torch.Tensor]):
        self.queue = list(queue)
        monkeypatch.setattr(torch, "randint", lambda *a, size=None, **k: self.pop(size or a[-1]))
        monkeypatch.setattr(torch, "randn", lambda shape, **k: self.pop(shape))
        monkeypatch.setattr(torch, "randn_like", lambda x, **k: self.pop(x.shape))

    def pop(self, shape) -> torch.Tensor:
        draw = self.queue.pop(0)
        assert tuple(draw.shape) == tuple(shape), (draw.shape, shape)
        return draw.clone()


def make_agent(**overrides) -> Diffuser:
    config = dict(horizon=8, model_dim=16, dim_mults=[1, 4], time="discrete", diffusion_steps=20,
                  schedule_kwargs={"t_end": 1.0}, predict="x0", solver="ddpm", sampling_steps=20,
                  num_candidates=PLANS, ema_rate=0.995, ema_every=10, ema_start=-1, **overrides)
    return Diffuser(OBS, ACT, config, device="cpu")


def close(actual, expected, rtol: float = 1e-7, atol: float = 1e-9, what: str = "") -> None:
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


@pytest.fixture(scope="module")
def trained(fx):
    """The agent after the fixture's 22 updates, and its per-update losses."""
    torch.set_num_threads(1)
    agent = make_agent()
    agent.model.model_ema["diffusion"].load_state_dict(init_weights(agent.model.model["diffusion"]))
    init_weights(agent.value.net)
    agent.model.updates = -1  # the original's EMA phase (module docstring)
    mp = pytest.MonkeyPatch()
    replay = Replay(mp, draws(fx, "train_draws"))
    losses = []
    try:
        for k in range(len(fx["model_losses"])):
            batch = {"obs": torch.as_tensor(fx["obs"][k]), "act": torch.as_tensor(fx["act"][k]),
                     "values": torch.as_tensor(fx["values"][k]), "mask": torch.ones(fx["obs"].shape[1:3])}
            m = agent.update(batch)
            losses.append((m["model/loss"], m["value/loss"]))
    finally:
        mp.undo()
    assert not replay.queue
    return agent, np.array(losses)


def test_diffusion_model_updates_match_the_original(fx, trained):
    agent, losses = trained
    close(losses[:, 0], fx["model_losses"], what="diffusion losses")
    for name, p in agent.model.model["diffusion"].state_dict().items():
        close(p.reshape(-1)[::5][:48], fx[f"unet_final/{name}"], what=name)
    for name, p in agent.model.model_ema["diffusion"].state_dict().items():
        close(p.reshape(-1)[::5][:48], fx[f"unet_ema/{name}"], what=f"EMA {name}")


def test_value_updates_match_the_original(fx, trained):
    agent, losses = trained
    close(losses[:, 1], fx["value_losses"], rtol=1e-5, what="value losses")
    for name, p in agent.value.net.state_dict().items():
        close(p.reshape(-1)[::5][:48], fx[f"value_final/{name}"], rtol=1e-5, atol=1e-5, what=name)


def plan(agent: Diffuser, fx: dict, case: int, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    queue = draws(fx, "plan_draws")[case * DRAWS_PER_PLAN:(case + 1) * DRAWS_PER_PLAN]
    with monkeypatch.context() as mp:
        replay = Replay(mp, queue)
        plans, values = agent.plan(torch.as_tensor(fx["plan_obs"]), "ddpm", 20)
    assert len(replay.queue) == 1  # the original's t = 0 draw
    order = values[0].argsort(descending=True)
    return plans[0, order], values[0, order]


@pytest.mark.parametrize("case", [0, 1])
def test_guided_plans_and_action_match_the_original(fx, case, monkeypatch):
    agent = make_agent()
    init_weights(agent.model.model_ema["diffusion"])  # the fixture plans with networks at the initial weights
    init_weights(agent.value.net)
    for key, value in GUIDES[case].items():
        setattr(agent.config, key, value)
    plans, values = plan(agent, fx, case, monkeypatch)
    close(values, fx[f"plan_values{case}"], what="plan values")
    close(plans, fx[f"plans{case}"], what="plans, best first")
    close(plans[0, 0, OBS:], fx[f"action{case}"], what="first action of the best plan")
    queue = draws(fx, "plan_draws")[case * DRAWS_PER_PLAN:(case + 1) * DRAWS_PER_PLAN]
    with monkeypatch.context() as mp:
        Replay(mp, queue)
        action = agent._act(torch.as_tensor(fx["plan_obs"]), "ddpm", 20, None)
    close(action[0], np.clip(fx[f"action{case}"], -1, 1), what="_act")
    # the guidance is visible at this tolerance: unguided plans from the same draws differ
    agent.config.scale = 0.0
    unguided, _ = plan(agent, fx, case, monkeypatch)
    assert (unguided - torch.as_tensor(fx[f"plans{case}"])).abs().max() > 1e-2


def test_attention_unet_matches_the_original(fx):
    net = JannerUNet1d(OBS + ACT, model_dim=8, dim_mults=(1, 2), attention=True)
    init_weights(net)
    with torch.no_grad():
        y = net(torch.as_tensor(fx["attn_x"]), torch.as_tensor(fx["attn_t"]))
    close(y, fx["attn_y"], what="attention U-Net output")
