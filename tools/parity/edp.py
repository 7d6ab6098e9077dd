"""Record the original EDP's updates for tests/test_parity_edp.py (run by hand; the tests read the npz).

Compares: 22 updates of sail-sg/edp's `DiffusionQL` (diffusion/dql.py; repository commit b019648) in its two
policy objectives, `loss_type` TD3 (the paper's default: alpha 2, action approximation from the eps prediction,
DDPM target actions over the 100-level 'linear' table) and IQL (expectile value, advantage-weighted likelihood),
from the same initial weights, batches and random draws, plus its `ensemble` act (50 DDPM candidates, one drawn
with probability softmax(min Q)). Small networks (hidden 32), obs 11, act 3, batch 12, max_grad_norm 1.5 so that
clipping engages in some updates and not in others; the step counter starts at 990 so that the target policy
averages after updates 15 and 20 (the original starts it after update 1000, every 5).

The original runs eagerly (`jax.disable_jit`) so that every draw of jax.random (normal, randint, uniform,
categorical) is recorded as a value; the test feeds those values to this project's torch draws.

Run (a venv with jax 0.4.35, flax 0.10.2, optax 0.2.2, distrax, ml_collections; CPU):
    python tools/parity/edp.py --original /path/to/sail-sg/edp [--out tests/fixtures/parity/edp.npz]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np

OBS, ACT, HIDDEN, BATCH, UPDATES, START = 11, 3, 32, 12, 22, 990
GRAD_NORM = 1.5  # clips some updates, not all: Adam undoes a clip that scales every step alike


class _Anything(types.ModuleType):
    """A stand-in for the imports of diffusion/trainer.py that its SamplerPolicy does not use (gym, d4rl, absl...)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        return self


def build(original: str):
    import jax

    jax.tree_multimap = jax.tree_util.tree_map  # removed from jax after the original was written
    sys.path.insert(0, str(Path(original).resolve()))
    for name in ("gym", "absl", "absl.flags", "tqdm", "wandb", "d4rl"):  # third-party: stubbed where missing
        if name not in sys.modules and importlib.util.find_spec(name.split(".")[0]) is None:
            sys.modules.setdefault(name, _Anything(name))
    for name in ("data", "utilities.replay_buffer", "utilities.sampler", "utilities.utils", "viskit", "viskit.logging"):
        sys.modules.setdefault(name, _Anything(name))  # the original's dataset and logging code (tensorflow, d4rl)
    from diffusion.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
    from diffusion.dql import DiffusionQL
    from diffusion.nets import Critic, DiffusionPolicy, GaussianPolicy, Value
    from utilities.jax_utils import init_rng

    return GaussianDiffusion, LossType, ModelMeanType, ModelVarType, DiffusionQL, Critic, DiffusionPolicy, \
        GaussianPolicy, Value, init_rng


class Recorder:
    """Wraps jax.random's draws: while `on`, every drawn value is appended to `log` as (kind, array)."""

    def __init__(self):
        import jax

        self.log: list[tuple[str, np.ndarray]] = []
        self.on = False
        for kind in ("normal", "randint", "uniform", "categorical"):
            real = getattr(jax.random, kind)
            setattr(jax.random, kind, self._wrap(kind, real))

    def _wrap(self, kind, real):
        def draw(*args, **kwargs):
            out = real(*args, **kwargs)
            if self.on:
                self.log.append((kind, np.asarray(out)))
            return out
        return draw

    def take(self) -> list[tuple[str, np.ndarray]]:
        log, self.log = self.log, []
        return log


def linear(params: dict) -> tuple[np.ndarray, np.ndarray]:
    """A flax Dense's (kernel (in, out), bias) as torch's (weight (out, in), bias)."""
    return np.asarray(params["kernel"]).T.copy(), np.asarray(params["bias"]).copy()


def policy_to_torch(p: dict) -> dict[str, np.ndarray]:
    """The original's PolicyNet (input [s, a, t_emb]) in DQLMlp's layout (input [a, t_emb, s])."""
    base = p["params"]["base_net"]
    out = {}
    for src, dst in (("Dense_0", "time_mlp.1"), ("Dense_1", "time_mlp.3")):
        out[f"{dst}.weight"], out[f"{dst}.bias"] = linear(base["TimeEmbedding_0"][src])
    for i, dst in enumerate(("net.0", "net.2", "net.4", "net.6")):
        out[f"{dst}.weight"], out[f"{dst}.bias"] = linear(base[f"Dense_{i}"])
    w = out["net.0.weight"]
    out["net.0.weight"] = np.concatenate([w[:, OBS:OBS + ACT], w[:, OBS + ACT:], w[:, :OBS]], 1)
    return out


def mlp_to_torch(p: dict, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for i in range(4):
        out[f"{prefix}{2 * i}.weight"], out[f"{prefix}{2 * i}.bias"] = linear(p["params"][f"Dense_{i}"])
    return out


def critics_to_torch(q1: dict, q2: dict) -> dict[str, np.ndarray]:
    return {**mlp_to_torch(q1, "q1."), **mlp_to_torch(q2, "q2.")}


def run(original: str, loss_type: str, batches: list[dict], rec: Recorder, seed: int) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp

    (GaussianDiffusion, LossType, ModelMeanType, ModelVarType, DiffusionQL, Critic, DiffusionPolicy, GaussianPolicy,
     Value, init_rng) = build(original)
    from diffusion.trainer import SamplerPolicy

    init_rng(seed)
    gd = GaussianDiffusion(num_timesteps=100, schedule_name="linear", model_mean_type=ModelMeanType.EPSILON,
                           model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE, min_value=-1.0,
                           max_value=1.0)
    arch = (HIDDEN,) * 3
    policy = DiffusionPolicy(diffusion=gd, observation_dim=OBS, action_dim=ACT, arch=arch, time_embed_size=16)
    qf, vf = Critic(OBS, ACT, arch), Value(OBS, arch)
    settings = DiffusionQL.get_default_config({"loss_type": loss_type, "max_grad_norm": GRAD_NORM})
    agent = DiffusionQL(settings, policy, qf, vf, GaussianPolicy(ACT))
    agent._total_steps = START
    out: dict[str, np.ndarray] = {"alphas_cumprod": np.asarray(gd.alphas_cumprod, np.float32)}
    params = agent.train_params
    out.update({f"init/actor/{k}": v for k, v in policy_to_torch(params["policy"]).items()})
    out.update({f"init/critic/{k}": v for k, v in critics_to_torch(params["qf1"], params["qf2"]).items()})
    if loss_type == "IQL":
        out.update({f"init/value/{k}": v for k, v in mlp_to_torch(params["vf"], "").items()})

    records: dict[str, list] = {}
    with jax.disable_jit():
        for k, batch in enumerate(batches):
            agent._total_steps += 1
            tgt_update = agent._total_steps > 1000 and agent._total_steps % agent.config.policy_tgt_freq == 0
            jb = {key: jnp.asarray(value) for key, value in batch.items()}
            rec.on = True
            agent._train_states, agent._tgt_params, metrics = getattr(agent, f"_train_step_{loss_type.lower()}")(
                agent._train_states, agent._tgt_params, jax.random.PRNGKey(1000 + k), jb, tgt_update)
            rec.on = False
            draws = rec.take()
            for key, value in metrics.items():
                records.setdefault(f"metric/{key}", []).append(np.asarray(value))
            if loss_type == "TD3":
                chain = 1 + gd.num_timesteps  # x_T and one noise per level; drawn twice (one gradient per critic)
                assert [d[0] for d in draws] == ["normal"] * 2 * chain + ["randint", "normal", "uniform"], draws
                assert all(np.array_equal(a[1], b[1]) for a, b in zip(draws[:chain], draws[chain:2 * chain]))
                records.setdefault("noise/tgt_xT", []).append(draws[0][1])
                records.setdefault("noise/tgt_z", []).append(np.stack([d[1] for d in draws[1:chain]]))
                draws = draws[2 * chain:]
                records.setdefault("noise/coin", []).append(draws[2][1])
            else:  # the policy loss runs twice (policy and policy_dist gradients) from the same key
                assert [d[0] for d in draws] == ["randint", "normal"] * 2, [d[0] for d in draws]
                assert np.array_equal(draws[0][1], draws[2][1]) and np.array_equal(draws[1][1], draws[3][1])
            records.setdefault("noise/t", []).append(draws[0][1])
            records.setdefault("noise/eps", []).append(draws[1][1])
        out.update({key: np.stack(value) for key, value in records.items()})

        params = agent.train_params
        out.update({f"final/actor/{k}": v for k, v in policy_to_torch(params["policy"]).items()})
        out.update({f"final/actor_ema/{k}": v for k, v in policy_to_torch(agent._tgt_params["policy"]).items()})
        out.update({f"final/critic/{k}": v for k, v in critics_to_torch(params["qf1"], params["qf2"]).items()})
        out.update({f"final/critic_target/{k}": v for k, v in
                    critics_to_torch(agent._tgt_params["qf1"], agent._tgt_params["qf2"]).items()})
        if loss_type == "IQL":
            out.update({f"final/value/{k}": v for k, v in mlp_to_torch(params["vf"], "").items()})
            return out

        # acting: the original's `ensemble` act on one state, with the trained (online) parameters
        state = np.random.default_rng(seed).standard_normal((1, OBS)).astype(np.float32)
        sampler = SamplerPolicy(policy, qf)
        rec.on = True
        action = sampler.ensemble_act(params, jax.random.PRNGKey(7), jnp.asarray(state), False, 50)
        rec.on = False
        draws = rec.take()
        assert [d[0] for d in draws] == ["normal"] * (1 + gd.num_timesteps) + ["categorical"], [d[0] for d in draws]
        candidates = policy.apply(params["policy"], jax.random.split(jax.random.PRNGKey(7))[1], jnp.asarray(state),
                                  False, repeat=50)
        q = jnp.minimum(qf.apply(params["qf1"], jnp.asarray(state), candidates),
                        qf.apply(params["qf2"], jnp.asarray(state), candidates))
    out.update({"act/state": state[0], "act/xT": draws[0][1].reshape(50, ACT),
                "act/z": np.stack([d[1].reshape(50, ACT) for d in draws[1:-1]]), "act/index": draws[-1][1].reshape(()),
                "act/probs": np.asarray(jax.nn.softmax(q[0])), "act/candidates": np.asarray(candidates[0]),
                "act/action": np.asarray(action).reshape(ACT)})
    return out


def batches(seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"observations": rng.standard_normal((BATCH, OBS)).astype(np.float32),
             "actions": rng.uniform(-0.999, 0.999, (BATCH, ACT)).astype(np.float32),
             "rewards": rng.standard_normal(BATCH).astype(np.float32),
             "next_observations": rng.standard_normal((BATCH, OBS)).astype(np.float32),
             "dones": (rng.uniform(size=BATCH) < 0.2).astype(np.float32)} for _ in range(UPDATES)]


def record(original: str, out_path: str) -> None:
    rec = Recorder()
    out: dict[str, np.ndarray] = {}
    for loss_type, seed in (("TD3", 0), ("IQL", 1)):
        data = batches(seed)
        prefix = loss_type.lower()
        for key in ("observations", "actions", "rewards", "next_observations", "dones"):
            out[f"{prefix}/batch/{key}"] = np.stack([b[key] for b in data])
        out.update({f"{prefix}/{key}": value for key, value in run(original, loss_type, data, rec, seed).items()})
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **out)
    print(f"wrote {out_path}: {Path(out_path).stat().st_size / 1e3:.0f} kB, {len(out)} arrays")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", required=True, help="checkout of sail-sg/edp")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests/fixtures/parity/edp.npz"))
    cli = parser.parse_args()
    record(cli.original, cli.out)
