"""Parity fixture for FQL: runs the ORIGINAL's update (seohongpark/fql, agents/fql.py `FQLAgent.update`) and
records what tests/test_parity_fql.py replays through this project's `FQL.train_step`.

What it compares: from the same initial weights, batches and random draws, 20 updates of the original (the
critic loss, the flow BC loss, the distillation loss and the Q loss summed, one Adam step over all networks,
then the target critic from the pre-step critic), in two settings: `default` (the original's get_config:
q_agg mean, alpha 10, tau 0.005, lr 3e-4, no Q normalization) and `variant` (q_agg min, normalize_q_loss,
alpha 3, tau 0.1, lr 1e-3, so the target update and the other branches move the numbers). Recorded: the
per-update losses, every parameter after the last update, and, after it, the one-step actor's clipped action
for given states and noises. Networks: 2 x 64 hidden, batch 16,
observation dim 5, action dim 3.

Layout in the npz (float32): weights as torch Linear (out, in) and LayerNorm (weight, bias), under
`<prefix>/<net>/dense<i>_w|dense<i>_b|ln<i>_w|ln<i>_b`, nets `actor`, `flow`, `critic0`, `critic1`,
`target0`, `target1`; the flow's first layer has its input columns reordered from the original's
[obs, x, t] to this project's FlowMlp order [x, t, obs]. The random draws are re-derived from the agent's
key with the original's splits: `next_noise` (the critic target's next-action noise), `flow_x0` and `flow_t`
(the flow-matching noise and time, in the original's convention x_t = (1 - t) x0 + t x1, x0 noise), and
`distill_noise` (the actor's and the teacher's noise).

Run by hand (never by the tests), in a venv with a JAX stack the original's requirements allow (CPU):
jax==0.4.35 jaxlib==0.4.35 flax==0.10.2 optax==0.2.2 distrax==0.1.5 ml_collections numpy==1.26.4. Not the
minimum pins jax 0.4.26 (or 0.4.30) with flax 0.8.4: there, on the CPU, the jitted two-head critic (nn.vmap of
a LayerNorm MLP) returns a wrong second head (off by up to 1.1 from the same call without jit, numpy and torch).
    python tools/parity/fql.py --original /path/to/fql-checkout [--out tests/fixtures/parity/fql.npz]
Original: github.com/seohongpark/fql @ 719d04417cb0b206deddbc7d761b3e710c3d750c.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

OBS_DIM, ACT_DIM, BATCH, HIDDEN, UPDATES, SEED = 5, 3, 16, (64, 64), 20, 0
SETTINGS = {
    "default": {},
    "variant": {"q_agg": "min", "normalize_q_loss": True, "alpha": 3.0, "tau": 0.1, "lr": 1e-3},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", required=True, help="checkout of github.com/seohongpark/fql")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests/fixtures/parity/fql.npz"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.original).resolve()))
    import jax
    import jax.numpy as jnp
    from agents.fql import FQLAgent, get_config

    rs = np.random.default_rng(SEED)
    batches = {
        "obs": rs.normal(size=(UPDATES, BATCH, OBS_DIM)),
        "act": np.tanh(rs.normal(size=(UPDATES, BATCH, ACT_DIM)) * 1.5),
        "next_obs": rs.normal(size=(UPDATES, BATCH, OBS_DIM)),
        "rew": rs.normal(size=(UPDATES, BATCH)),
        "terminal": (rs.random((UPDATES, BATCH)) < 0.2).astype(np.float64),
    }
    batches = {k: v.astype(np.float32) for k, v in batches.items()}
    probe_obs = (rs.normal(size=(4, OBS_DIM)) * 6.0).astype(np.float32)  # wide enough that some actions clip
    probe_z = (rs.normal(size=(4, ACT_DIM)) * 6.0).astype(np.float32)

    def perturb(params: dict) -> dict:
        """Random biases and LayerNorm scales (flax starts them at 0 and 1), so that a swapped or dropped
        term in the conversion or the update shows."""
        def leaf(path, x):
            name = path[-1].key
            if name == "bias":
                return x + 0.1 * rs.normal(size=x.shape).astype(np.float32)
            if name == "scale":
                return x * (1.0 + 0.1 * rs.normal(size=x.shape).astype(np.float32))
            return x
        return jax.tree_util.tree_map_with_path(leaf, params)

    def dense_stack(tree: dict, ln: bool) -> list[tuple]:
        """[(kernel, bias, ln_scale, ln_bias)] per layer from an MLP's Dense_i/LayerNorm_i."""
        n = sum(k.startswith("Dense_") for k in tree)
        out = []
        for i in range(n):
            d, norm = tree[f"Dense_{i}"], tree.get(f"LayerNorm_{i}") if ln else None
            out.append((np.asarray(d["kernel"]), np.asarray(d["bias"]),
                        None if norm is None else np.asarray(norm["scale"]),
                        None if norm is None else np.asarray(norm["bias"])))
        return out

    def torch_layout(params: dict, prefix: str) -> dict:
        out = {}

        def put(net: str, layers: list[tuple]) -> None:
            for i, (k, b, s, nb) in enumerate(layers):
                out[f"{prefix}/{net}/dense{i}_w"] = k.T.copy()
                out[f"{prefix}/{net}/dense{i}_b"] = b
                if s is not None:
                    out[f"{prefix}/{net}/ln{i}_w"], out[f"{prefix}/{net}/ln{i}_b"] = s, nb

        put("actor", dense_stack(params["modules_actor_onestep_flow"]["mlp"], False))
        flow = dense_stack(params["modules_actor_bc_flow"]["mlp"], False)
        k0 = flow[0][0]  # rows: [obs, x, t] -> this project's [x, t, obs]
        flow[0] = (np.concatenate([k0[OBS_DIM:OBS_DIM + ACT_DIM], k0[-1:], k0[:OBS_DIM]]),) + flow[0][1:]
        put("flow", flow)
        for name, key in (("critic", "modules_critic"), ("target", "modules_target_critic")):
            tree = params[key]["value_net"]
            for head in range(2):
                head_tree = jax.tree_util.tree_map(lambda x, h=head: np.asarray(x)[h], tree)
                put(f"{name}{head}", dense_stack(head_tree, True))
        return out

    def draws(rng) -> dict:
        """The update's random draws, by the original's key splits (update, total_loss, critic_loss,
        sample_actions, actor_loss)."""
        _, rng = jax.random.split(rng)
        rng, actor_rng, critic_rng = jax.random.split(rng, 3)
        _, sample_rng = jax.random.split(critic_rng)
        action_seed, _ = jax.random.split(sample_rng)
        rng, x_rng, t_rng = jax.random.split(actor_rng, 3)
        _, noise_rng = jax.random.split(rng)
        return {"next_noise": jax.random.normal(action_seed, (BATCH, ACT_DIM)),
                "flow_x0": jax.random.normal(x_rng, (BATCH, ACT_DIM)),
                "flow_t": jax.random.uniform(t_rng, (BATCH, 1))[:, 0],
                "distill_noise": jax.random.normal(noise_rng, (BATCH, ACT_DIM))}

    fixture: dict[str, np.ndarray] = {k: v for k, v in batches.items()}
    fixture["probe_obs"], fixture["probe_z"] = probe_obs, probe_z
    init_params = None
    loss_keys = ("critic/critic_loss", "actor/bc_flow_loss", "actor/distill_loss", "actor/q_loss")
    fixture["loss_names"] = np.array(["critic_loss", "bc_flow_loss", "distill_loss", "q_loss"])
    for setting, overrides in SETTINGS.items():
        config = get_config()
        config.actor_hidden_dims, config.value_hidden_dims = HIDDEN, HIDDEN
        config.update(overrides)
        agent = FQLAgent.create(SEED, batches["obs"][0], batches["act"][0], config)
        if init_params is None:
            init_params = perturb(agent.network.params)
            init_params["modules_target_critic"] = init_params["modules_critic"]
            fixture.update(torch_layout(init_params, "init"))
        agent = agent.replace(network=agent.network.replace(params=init_params))
        losses, recorded = [], {k: [] for k in ("next_noise", "flow_x0", "flow_t", "distill_noise")}
        for i in range(UPDATES):
            for k, v in draws(agent.rng).items():
                recorded[k].append(np.asarray(v))
            batch = {"observations": batches["obs"][i], "actions": batches["act"][i],
                     "next_observations": batches["next_obs"][i], "rewards": batches["rew"][i],
                     "masks": 1.0 - batches["terminal"][i]}
            agent, info = agent.update(jax.tree_util.tree_map(jnp.asarray, batch))
            losses.append([float(info[k]) for k in loss_keys])
        fixture.update({f"{setting}/{k}": np.stack(v).astype(np.float32) for k, v in recorded.items()})
        fixture[f"{setting}/losses"] = np.asarray(losses, np.float32)
        fixture.update(torch_layout(agent.network.params, f"{setting}/final"))
        onestep = agent.network.select("actor_onestep_flow")(probe_obs, probe_z)
        fixture[f"{setting}/probe_action"] = np.asarray(jnp.clip(onestep, -1, 1))
        print(setting, "probe actions clipped:", int((np.abs(np.asarray(onestep)) > 1).sum()), "of", onestep.size)
        print(setting, "losses (first, last):", losses[0], losses[-1])
    for setting, overrides in SETTINGS.items():
        for key, value in {**get_config().to_dict(), **overrides}.items():
            if key in ("alpha", "tau", "lr", "discount", "q_agg", "normalize_q_loss", "flow_steps"):
                fixture[f"{setting}/config/{key}"] = np.asarray(value)
    fixture = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in fixture.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **fixture)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
