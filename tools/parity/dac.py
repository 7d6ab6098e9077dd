"""Record DAC's updates and acting, run by the original JAX code, for tests/test_parity_dac.py.

Original: github.com/Fang-Lin93/DAC at e254357144e3a6a28554861f06fe3c69d16977c6
(agents/dac.py `DACLearner.update` -> `_jit_update_critic`, `jit_update_actor`; `sample_actions`;
diffusions/diffusion.py `DDPM`, `ddpm_sampler`; networks/critics.py `EnsembleQ`).

What it runs (obs 5, act 3, batch 16), `DACLearner.update` 24 times:
* T = 5 'vp' betas, the original's actor (Fourier time features 16 -> MLP 32, 32 -> noise MLP) and a 10-head
  `EnsembleQ`, all at width 32 (`hidden_dims`), Adam 3e-4 with the global-norm clip 1 and cosine decay over
  `--decay-steps` (40: the factor falls to ~0.35 in 24 updates, so the schedule is tested; the original's max_steps);
  soft Q-guidance, lcb target with rho 1.5 over `num_q_samples` 4 next actions, eta 1 with dual ascent at
  eta_lr 0.05 and bc_threshold 0.9 (large enough that eta moves visibly in 24 updates; runs.sh: 0.001, 1),
  actor EMA (tau 0.005) every 2 updates after update 5 (the original's 5 and 1000), tau 0.005.
* `sample_actions` on 3 states afterwards: 10 candidates from the online actor by `ddpm_sampler`, argmax of the
  target critics' mean Q (temperature 0).
Random draws are this script's: JAX runs eagerly (`jax_disable_jit`, so that `lax.scan` runs its steps in Python)
with `jax.random.normal` / `randint` replaced by functions that serve numpy draws in order (the sampler's prior and
per-step z, the actor's time indices and noise); each is checked against the shape the original asks for and all
are consumed. Eager and jitted execution differ only in float rounding.
Weights are written in this project's parameter names (cleandiff_rl DAC state_dict keys): Dense kernels (in, out)
become Linear weights (out, in); the ensemble's stacked kernels (H, in, out) and biases (H, out) become the
project's `QEnsemble` weights (H, in, out) and biases (H, 1, out).

Run by hand (a JAX venv: jax/jaxlib 0.4.35, flax 0.10.2, optax 0.2.3, numpy < 2.1; CPU, about 20 s), never by tests:
    python tools/parity/dac.py --original /path/to/DAC [--out tests/fixtures/parity/dac.npz]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

OBS, ACT, BATCH, HIDDEN, HEADS, NQ, UPDATES, T, N_ACT, ACT_STATES = 5, 3, 16, 32, 10, 4, 24, 5, 10, 3
SETTINGS = dict(rho=1.5, eta=1.0, eta_lr=0.05, bc_threshold=0.9, step_start_ema=5, update_ema_every=2,
                ema_tau=0.005, discount=0.99, actor_lr=3e-4, critic_lr=3e-4, clip_grad_norm=1.0)


def stub_imports() -> None:
    """Modules the DAC learner's import chain names but the update never calls (tfp distributions, d4rl data)."""
    tfp = types.ModuleType("tensorflow_probability")
    substrates = types.ModuleType("tensorflow_probability.substrates")
    substrates.jax = types.SimpleNamespace(distributions=None)
    tfp.substrates = substrates
    sys.modules.update({"tensorflow_probability": tfp, "tensorflow_probability.substrates": substrates})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", required=True, type=Path, help="checkout of github.com/Fang-Lin93/DAC")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "tests/fixtures/parity/dac.npz")
    parser.add_argument("--decay-steps", type=int, default=40)
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(args.original), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "e254357144e3a6a28554861f06fe3c69d16977c6 (archive)"

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_disable_jit", True)
    stub_imports()
    sys.path.insert(0, str(args.original))
    agents_pkg = types.ModuleType("agents")  # the package without its __init__ (which imports every learner)
    agents_pkg.__path__ = [str(args.original / "agents")]
    sys.modules["agents"] = agents_pkg
    datasets_pkg = types.ModuleType("datasets")  # agents/base.py reads only `Batch` from it
    from networks.types import Batch

    datasets_pkg.Batch = Batch
    sys.modules["datasets"] = datasets_pkg
    from agents.dac import DACLearner

    agent = DACLearner(np.zeros((1, OBS), np.float32), np.zeros((1, ACT), np.float32), seed=0,
                       hidden_dims=(HIDDEN,) * 3, num_qs=HEADS, num_q_samples=NQ, num_action_samples=N_ACT, T=T,
                       lr_decay_steps=args.decay_steps, temperature=0.0, **SETTINGS)
    out: dict[str, np.ndarray] = {}
    out.update(project_weights("init", agent.actor.params, agent.critic.params))

    # --- the draws, served in order in place of jax.random.normal / randint --------------------------
    rng = np.random.default_rng(0)
    queue: list[np.ndarray] = []
    served = {"normal": 0, "randint": 0}

    def normal(key, shape=(), dtype=jnp.float32):
        value = queue.pop(0)
        assert value.shape == tuple(shape) and value.dtype == np.float32, (value.shape, shape)
        served["normal"] += 1
        return jnp.asarray(value)

    def randint(key, shape, minval, maxval, dtype=jnp.int32):
        value = queue.pop(0)
        assert value.shape == tuple(shape) and (minval, maxval) == (1, T + 1), (value.shape, shape, minval, maxval)
        served["randint"] += 1
        return jnp.asarray(value)

    jax.random.normal, jax.random.randint = normal, randint

    def draws_for_update() -> dict[str, np.ndarray]:
        return {"prior": rng.standard_normal((BATCH * NQ, ACT), dtype=np.float32),  # critic: sampler x_T
                "z": rng.standard_normal((T, BATCH * NQ, ACT), dtype=np.float32),  # its z at t = 5..1 (t = 1 unused)
                "time": rng.integers(1, T + 1, (BATCH,)).astype(np.int32),  # actor: t in 1..T
                "noise": rng.standard_normal((BATCH, ACT), dtype=np.float32)}

    records: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "next_obs", "terminal", "prior", "z", "time",
                                                 "noise", "critic_loss", "bc_loss", "guidance_loss", "eta", "q_mean")}
    for _ in range(UPDATES):
        batch = {"obs": rng.standard_normal((BATCH, OBS), dtype=np.float32),
                 "act": rng.uniform(-1, 1, (BATCH, ACT)).astype(np.float32),
                 "rew": rng.standard_normal(BATCH, dtype=np.float32),
                 "next_obs": rng.standard_normal((BATCH, OBS), dtype=np.float32),
                 "terminal": (rng.random(BATCH) < 0.2).astype(np.float32)}
        draws = draws_for_update()
        queue[:] = [draws["prior"], *draws["z"], draws["time"], draws["noise"]]
        info = agent.update(Batch(observations=batch["obs"], actions=batch["act"], rewards=batch["rew"],
                                  masks=1.0 - batch["terminal"], next_observations=batch["next_obs"]))
        assert not queue, f"{len(queue)} draws left unused"
        for key, value in {**batch, **draws}.items():
            records[key].append(value)
        records["critic_loss"].append(float(info["critic_loss"]))
        records["bc_loss"].append(float(info["bc_loss"]))
        records["guidance_loss"].append(float(info["guidance_loss"]))
        records["q_mean"].append(float(info["qs"]))
        records["eta"].append(float(agent.eta))  # after the dual ascent step
    assert served == {"normal": UPDATES * (T + 2), "randint": UPDATES}, served

    # --- acting: argmax of the target critics' mean Q over 10 online-actor candidates ------------------
    act_obs = rng.standard_normal((ACT_STATES, OBS), dtype=np.float32)
    act_prior = rng.standard_normal((ACT_STATES * N_ACT, ACT), dtype=np.float32)
    act_z = rng.standard_normal((T, ACT_STATES * N_ACT, ACT), dtype=np.float32)
    queue[:] = [act_prior, *act_z]
    action = np.asarray(agent.sample_actions(act_obs, batch_act=True))
    assert not queue, [v.shape for v in queue]
    obs_rep = np.repeat(act_obs, N_ACT, 0)
    queue[:] = [*act_z]  # the same candidates again (the prior is passed), to record them and their Q
    candidates, _ = agent.action_decoder(jax.random.PRNGKey(0), agent.actor.apply, agent.actor.params, obs_rep,
                                         jnp.asarray(act_prior), 1, True)
    assert not queue
    q = np.asarray(agent.critic_tar(obs_rep, candidates)).mean(0)

    for key, value in records.items():
        out[f"data:{key}"] = np.asarray(value, dtype=np.int64 if key == "time" else np.float32)
    out.update(project_weights("final", agent.actor.params, agent.critic.params))
    out.update(project_weights("final_target", agent.actor_tar.params, agent.critic_tar.params))
    out.update({"act:obs": act_obs, "act:prior": act_prior, "act:z": act_z, "act:candidates": np.asarray(candidates),
                "act:q": q.astype(np.float32), "act:action": action.astype(np.float32),
                "meta:decay_steps": np.array(args.decay_steps), "meta:commit": np.array(commit)})
    for key, value in SETTINGS.items():
        out[f"meta:{key}"] = np.array(value)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB); critic losses {records['critic_loss'][:3]}..., "
          f"eta {records['eta'][-1]:.4f}, action {action.tolist()}")


def project_weights(prefix: str, actor_params, critic_params) -> dict[str, np.ndarray]:
    """The original's parameters under this project's DAC state_dict names (`prefix:` + name; `final_target`: the
    EMA actor and target critics)."""
    target = prefix == "final_target"
    actor_key = "actor.model_ema.diffusion" if target else "actor.model.diffusion"
    weights: dict[str, np.ndarray] = {}
    actor = actor_params["params"]
    for mlp, names in (("MLP_0", ("time_mlp.0", "time_mlp.2")),
                       ("MLP_1", ("net.0", "net.2", "net.4", "net.6"))):
        for i, name in enumerate(names):
            dense = actor[mlp][f"Dense_{i}"]
            weights[f"{prefix}:{actor_key}.{name}.weight"] = np.asarray(dense["kernel"]).T.copy()
            weights[f"{prefix}:{actor_key}.{name}.bias"] = np.asarray(dense["bias"])
    critic_key = "critic_target" if target else "critic"
    (ensemble,) = critic_params["params"].values()
    layers = ensemble["MLP_0"]
    for i in range(len(layers)):
        dense = layers[f"Dense_{i}"]
        weights[f"{prefix}:{critic_key}.weights.{i}"] = np.asarray(dense["kernel"])
        weights[f"{prefix}:{critic_key}.biases.{i}"] = np.asarray(dense["bias"])[:, None, :]
    return weights


if __name__ == "__main__":
    main()
