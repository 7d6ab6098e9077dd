"""Record Diffusion-QL's and Diffusion BC's updates and acting, run by the original code, for tests/test_parity_dql.py.

Original: github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL at d871f5c6b4a3a3a19a10c662a54f32d5819dfcdb
(agents/ql_diffusion.py `Diffusion_QL`, agents/bc_diffusion.py `Diffusion_BC`, agents/diffusion.py, agents/model.py).

What it runs, from fixed initial weights, on fixed random batches (obs 11, act 3, batch 16):
* `Diffusion_QL.train` for 25 updates: vp schedule, T = 5, eta 1, grad_norm 0.5 (clipping active in most
  updates), tau 0.005, EMA 0.995 every 5 steps from step_start_ema = 10 (the default 1000 is never reached in
  25 updates), no lr decay;
* `Diffusion_QL.sample_action` on one state after those updates (50 candidates, softmax over the target min Q);
* `Diffusion_BC.train` for 25 updates from the same initial actor (lr 3e-4, as main.py passes it).
The hidden layers are 64 wide instead of the original's hard-coded 256 (the fixture stays small): after
construction, the script swaps in the same Linear/Mish stacks at width 64 and rebuilds the optimizers, EMA
copy and target critic from them, as the constructor does.

It records every random draw in order (torch.randn / randn_like / randint and np.random.uniform: the initial
noise x_T, the ancestral noise of each step, including the one masked at t = 0, the BC times and noise, the
critic coin), the per-update losses and gradient norms (through a logging writer), the weights before and after
(actor, its EMA copy, critic, target critic; in this project's parameter names), the acting draws, candidate
probabilities, chosen index and action. The multinomial draw of acting uses the global torch generator seeded
with ACT_SEED right before `sample_action` (the noise draws are served from their own generator), so
`torch.Generator().manual_seed(ACT_SEED)` draws the same index.

Run by hand (CPU, a few seconds), never by the tests:
    python tools/parity/dql.py --original /path/to/Diffusion-Policies-for-Offline-RL \
        [--out tests/fixtures/parity/dql.npz]
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

OBS, ACT, BATCH, HIDDEN, UPDATES, T = 11, 3, 16, 64, 25, 5
GRAD_NORM, ETA, TAU, DISCOUNT, LR = 0.5, 1.0, 0.005, 0.99, 3e-4
EMA_DECAY, EMA_EVERY, EMA_START = 0.995, 5, 10
CANDIDATES, ACT_SEED = 50, 1234


def import_original(path: Path):
    """The original's agent classes; its logger (which needs `tabulate`) is not used by `train` and is stubbed."""
    sys.path.insert(0, str(path))
    logger = types.ModuleType("utils.logger")
    logger.logger = None
    sys.modules["utils.logger"] = logger
    from agents.bc_diffusion import Diffusion_BC
    from agents.ql_diffusion import Diffusion_QL
    return Diffusion_QL, Diffusion_BC


def mish_stack(sizes: list[int], last_act: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_act:
            layers.append(nn.Mish())
    return nn.Sequential(*layers)


def narrow_actor(model: nn.Module) -> None:
    """The original MLP's mid_layer and final_layer at width HIDDEN (agents/model.py builds them at 256)."""
    model.mid_layer = mish_stack([ACT + 16 + OBS, HIDDEN, HIDDEN, HIDDEN], last_act=True)
    model.final_layer = nn.Linear(HIDDEN, ACT)


# original parameter name -> this project's (DQLMlp: time_mlp.{1,3}, net.{0,2,4,6}; TwinQ: q1.*, q2.*)
def actor_name(name: str) -> str:
    name = name.removeprefix("model.")
    if name.startswith("mid_layer."):
        return "net." + name.removeprefix("mid_layer.")
    if name.startswith("final_layer."):
        return "net.6." + name.removeprefix("final_layer.")
    return name


def critic_name(name: str) -> str:
    return name.replace("q1_model.", "q1.").replace("q2_model.", "q2.")


def weights(prefix: str, module: nn.Module, rename) -> dict[str, np.ndarray]:
    return {f"{prefix}/{rename(k)}": v.detach().numpy().copy() for k, v in module.named_parameters()}


class Recorder:
    """Wraps torch.randn / randn_like / randint and np.random.uniform, logging each draw in order."""

    def __init__(self, source: torch.Generator | None = None):
        self.draws: list[tuple[str, np.ndarray]] = []
        self.source = source  # None: the global generators (training); else serve randn from it (acting)
        self.saved = {}

    def __enter__(self):
        self.saved = {"randn": torch.randn, "randn_like": torch.randn_like, "randint": torch.randint,
                      "uniform": np.random.uniform}
        randn, randn_like, randint, uniform = (self.saved[k] for k in ("randn", "randn_like", "randint", "uniform"))

        def log(kind, value):
            self.draws.append((kind, value.detach().numpy().copy() if torch.is_tensor(value) else np.asarray(value)))
            return value

        def rec_randn(*shape, **kw):
            if self.source is not None:
                shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
                return log("randn", randn(tuple(shape), generator=self.source))
            return log("randn", randn(*shape, **kw))

        def rec_randn_like(x, **kw):
            if self.source is not None:
                return log("randn", randn(tuple(x.shape), generator=self.source))
            return log("randn", randn_like(x, **kw))

        torch.randn, torch.randn_like = rec_randn, rec_randn_like
        torch.randint = lambda *a, **kw: log("randint", randint(*a, **kw))
        np.random.uniform = lambda *a, **kw: log("uniform", uniform(*a, **kw))
        return self

    def __exit__(self, *exc):
        torch.randn, torch.randn_like = self.saved["randn"], self.saved["randn_like"]
        torch.randint, np.random.uniform = self.saved["randint"], self.saved["uniform"]


class Buffer:
    """`replay_buffer.sample(batch_size)` serving the fixed batches in order, laid out as the original's sampler."""

    def __init__(self, batches: dict[str, np.ndarray]):
        self.batches, self.i = batches, 0

    def sample(self, batch_size: int):
        b = {k: torch.as_tensor(v[self.i]) for k, v in self.batches.items()}
        self.i += 1
        return b["obs"], b["act"], b["next_obs"], b["rew"][:, None], (1.0 - b["terminal"])[:, None]


class Writer:
    """A log writer collecting the scalars `train` logs per update."""

    def __init__(self):
        self.scalars: dict[str, list[float]] = {}

    def add_scalar(self, key: str, value: float, step: int) -> None:
        self.scalars.setdefault(key, []).append(float(value))


def take(draws: list, kind: str, n: int) -> list[np.ndarray]:
    got = [draws.pop(0) for _ in range(n)]
    assert all(k == kind for k, _ in got), f"expected {n} {kind} draws, got {[k for k, _ in got]}"
    return [v for _, v in got]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--original", type=Path, required=True, help="checkout of Diffusion-Policies-for-Offline-RL")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[2] / "tests/fixtures/parity/dql.npz")
    args = parser.parse_args()
    torch.set_num_threads(1)
    Diffusion_QL, Diffusion_BC = import_original(args.original)

    # data: fixed batches (terminal in a few rows), actions inside the box with some at its edge
    rng = np.random.default_rng(0)
    f32 = np.float32
    batches = {"obs": rng.normal(size=(UPDATES, BATCH, OBS)).astype(f32),
               "act": np.clip(rng.normal(scale=0.7, size=(UPDATES, BATCH, ACT)), -1, 1).astype(f32),
               "next_obs": rng.normal(size=(UPDATES, BATCH, OBS)).astype(f32),
               "rew": rng.normal(size=(UPDATES, BATCH)).astype(f32),
               "terminal": (rng.random((UPDATES, BATCH)) < 0.1).astype(f32)}
    act_state = rng.normal(size=OBS).astype(f32)

    # 1. Diffusion-QL, the original's class at width HIDDEN
    torch.manual_seed(0)
    np.random.seed(0)
    agent = Diffusion_QL(OBS, ACT, max_action=1.0, device="cpu", discount=DISCOUNT, tau=TAU, eta=ETA,
                         beta_schedule="vp", n_timesteps=T, ema_decay=EMA_DECAY, step_start_ema=EMA_START,
                         update_ema_every=EMA_EVERY, lr=LR, lr_decay=False, grad_norm=GRAD_NORM)
    narrow_actor(agent.model)
    agent.actor_optimizer = torch.optim.Adam(agent.actor.parameters(), lr=LR)
    agent.ema_model = copy.deepcopy(agent.actor)
    agent.critic.q1_model = mish_stack([OBS + ACT, HIDDEN, HIDDEN, HIDDEN, 1], last_act=False)
    agent.critic.q2_model = mish_stack([OBS + ACT, HIDDEN, HIDDEN, HIDDEN, 1], last_act=False)
    agent.critic_target = copy.deepcopy(agent.critic)
    agent.critic_optimizer = torch.optim.Adam(agent.critic.parameters(), lr=3e-4)
    init_actor = copy.deepcopy(agent.actor.state_dict())
    out = {**weights("init/actor", agent.actor, actor_name), **weights("init/critic", agent.critic, critic_name)}

    writer = Writer()
    with Recorder() as rec:
        metric = agent.train(Buffer(batches), iterations=UPDATES, batch_size=BATCH, log_writer=writer)
    draws = list(rec.draws)
    per_update = {k: [] for k in ("tgt_xT", "tgt_z", "bc_t", "bc_eps", "pi_xT", "pi_z", "coin")}
    for _ in range(UPDATES):
        per_update["tgt_xT"] += take(draws, "randn", 1)
        per_update["tgt_z"].append(np.stack(take(draws, "randn", T)))  # for t = T-1 .. 0 (the last one masked)
        per_update["bc_t"] += take(draws, "randint", 1)
        per_update["bc_eps"] += take(draws, "randn", 1)
        per_update["pi_xT"] += take(draws, "randn", 1)
        per_update["pi_z"].append(np.stack(take(draws, "randn", T)))
        per_update["coin"] += take(draws, "uniform", 1)
    assert not draws, f"{len(draws)} draws left over"
    out.update({f"noise/{k}": np.stack(v) for k, v in per_update.items()})
    out.update({
        "loss/critic": np.array(metric["critic_loss"]), "loss/bc": np.array(metric["bc_loss"]),
        "loss/q": np.array(metric["ql_loss"]), "loss/actor": np.array(metric["actor_loss"]),
        "grad_norm/critic": np.array(writer.scalars["Critic Grad Norm"]),
        "grad_norm/actor": np.array(writer.scalars["Actor Grad Norm"]),
        "target_mean": np.array(writer.scalars["Target_Q Mean"]),
    })
    out.update({**weights("final/actor", agent.actor, actor_name),
                **weights("final/actor_ema", agent.ema_model, actor_name),
                **weights("final/critic", agent.critic, critic_name),
                **weights("final/critic_target", agent.critic_target, critic_name)})

    # 2. acting: 50 candidates from the online actor, index ~ softmax(min target Q), drawn by the global generator
    probs: list[torch.Tensor] = []
    chosen: list[torch.Tensor] = []
    multinomial = torch.multinomial

    def rec_multinomial(p, n, *a, **kw):
        probs.append(p.detach().clone())
        chosen.append(multinomial(p, n, *a, **kw))
        return chosen[-1]

    torch.multinomial = rec_multinomial
    with Recorder(torch.Generator().manual_seed(7)) as rec:
        torch.manual_seed(ACT_SEED)
        action = agent.sample_action(act_state)
    torch.multinomial = multinomial
    act_draws = list(rec.draws)
    out.update({"act/state": act_state, "act/xT": take(act_draws, "randn", 1)[0],
                "act/z": np.stack(take(act_draws, "randn", T)), "act/probs": probs[0].numpy(),
                "act/action": action.astype(f32)})
    assert not act_draws
    out["act/index"] = chosen[0].numpy()

    # 3. Diffusion BC from the same initial actor
    torch.manual_seed(1)
    bc = Diffusion_BC(OBS, ACT, max_action=1.0, device="cpu", discount=DISCOUNT, tau=TAU, beta_schedule="vp",
                      n_timesteps=T, lr=LR)
    narrow_actor(bc.model)
    bc.actor.load_state_dict(init_actor)
    bc.actor_optimizer = torch.optim.Adam(bc.actor.parameters(), lr=LR)
    with Recorder() as rec:
        bc_metric = bc.train(Buffer(batches), iterations=UPDATES, batch_size=BATCH)
    draws = list(rec.draws)
    bc_t, bc_eps = [], []
    for _ in range(UPDATES):
        bc_t += take(draws, "randint", 1)
        bc_eps += take(draws, "randn", 1)
    assert not draws
    out.update({"bc/noise/t": np.stack(bc_t), "bc/noise/eps": np.stack(bc_eps),
                "bc/loss": np.array(bc_metric["bc_loss"]),
                **weights("bc/final/actor", bc.actor, actor_name)})

    commit = subprocess.run(["git", "-C", str(args.original), "rev-parse", "HEAD"], capture_output=True, text=True)
    out["meta/commit"] = np.array(commit.stdout.strip() or "unknown (not a git checkout)")
    out.update({f"batch/{k}": v for k, v in batches.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB); critic loss {out['loss/critic'][[0, -1]]}, "
          f"bc loss {out['loss/bc'][[0, -1]]}, q loss {out['loss/q'][[0, -1]]}, "
          f"grad norms critic {out['grad_norm/critic'].min():.2f}-{out['grad_norm/critic'].max():.2f} "
          f"actor {out['grad_norm/actor'].min():.2f}-{out['grad_norm/actor'].max():.2f}, action {action}")


if __name__ == "__main__":
    main()
