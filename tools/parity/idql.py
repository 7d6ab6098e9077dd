"""Record IDQL's updates and acting, run by the original JAX code, for tests/test_parity_idql.py.

Original: github.com/philippe-eecs/IDQL at 7582571ce686c77b4ee0f592dd639ab8151295fa
(jaxrl5/agents/ddpm_iql_simple/ddpm_iql_learner.py `DDPMIQLLearner`, jaxrl5/networks/{diffusion,resnet,mlp}.py).

What it runs (obs 5, act 3, batch 16), with `DDPMIQLLearner.create` and its jitted `update`, 20 times:
* T = 5 'vp' betas, learnable Fourier time features of size 8 (-> MLP 16, 16, swish), the LN-ResNet at width 32
  with 2 blocks and dropout 0.1 (the script narrows `MLPResNet`'s hard-coded width 256 with functools.partial),
  critics and value MLP(32, 32); actor AdamW (optax default weight decay 1e-4) with cosine decay over
  `--decay-steps` (40: the factor falls to 0.5 in 20 updates, so the schedule is tested; the original's 3e6
  leaves it at 1 - 1e-10), EMA actor_tau 0.001, tau 0.005, expectile 0.7, rewards given already scaled.
* `eval_actions` on one state afterwards: N = 8 candidates from the EMA actor by `ddpm_sampler` (variance beta_t,
  x clipped to [-1, 1] at every step), argmax of min(Q1, Q2) of the target critic.
Random draws are re-derived from the learner's keys exactly as it splits them (`update_actor`: time indices, noise,
the dropout key; `ddpm_sampler`: x_T and the per-step z); the dropout masks by an eager apply of the actor under
that key, with `jax.random.bernoulli` wrapped to record them. The script checks that these draws reproduce the
jitted update's actor loss and the sampler's candidates before writing anything.
Weights are written in this project's parameter names (cleandiff_rl IDQL state_dict keys): Dense kernels (in, out)
become Linear weights (out, in); LayerNorm scale/bias become weight/bias; the actor's first layer is permuted from
the original's input [a, s, time] to the project's [x, time, condition].

Run by hand (a JAX venv: jax/jaxlib 0.4.20, flax 0.7.5, optax 0.1.7, numpy < 2; CPU, about 10 s), never by tests:
    python tools/parity/idql.py --original /path/to/IDQL [--out tests/fixtures/parity/idql.npz]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np

OBS, ACT, BATCH, HIDDEN, TIME_DIM, BLOCKS, UPDATES, T, N = 5, 3, 16, 32, 8, 2, 20, 5, 8
DROPOUT, SEED = 0.1, 0


def import_learner(original: Path):
    """The original's learner module, importing only what it needs (gym and the other agents stubbed out)."""
    root = str(original.resolve())
    sys.path.insert(0, root)

    def stub(name: str, path: str | None = None, **attrs) -> None:
        module = types.ModuleType(name)
        if path:
            module.__path__ = [os.path.join(root, path)]
        module.__dict__.update(attrs)
        sys.modules[name] = module

    stub("gym", spaces=types.SimpleNamespace(Space=object, Box=object))
    stub("jaxrl5.agents", "jaxrl5/agents")
    stub("jaxrl5.agents.ddpm_iql_simple", "jaxrl5/agents/ddpm_iql_simple")
    stub("jaxrl5.data", "jaxrl5/data")
    stub("jaxrl5.data.dataset", DatasetDict=dict)
    from jaxrl5.agents.ddpm_iql_simple import ddpm_iql_learner
    return ddpm_iql_learner


class Box:
    """What `create` reads of a gym space: shape and a sample to trace the networks' input sizes."""

    def __init__(self, dim: int):
        self.shape = (dim,)

    def sample(self) -> np.ndarray:
        return np.zeros(self.shape, np.float32)


def dense(out: dict, name: str, p: dict, index: int | None = None) -> None:
    kernel, bias = np.asarray(p["kernel"]), np.asarray(p["bias"])
    if index is not None:
        kernel, bias = kernel[index], bias[index]
    out[name + ".weight"], out[name + ".bias"] = kernel.T.copy(), bias.copy()


def actor_to_torch(p: dict, prefix: str) -> dict:
    """DDPM(FourierFeatures, MLP, MLPResNet) params -> IDQLMlp state_dict entries under `prefix`."""
    out: dict = {}
    out[prefix + "time_mlp.0.weight"] = np.asarray(p["FourierFeatures_0"]["kernel"])[:, 0].copy()
    dense(out, prefix + "time_mlp.1", p["MLP_0"]["Dense_0"])
    dense(out, prefix + "time_mlp.3", p["MLP_0"]["Dense_1"])
    res = p["MLPResNet_0"]
    dense(out, prefix + "net.0", res["Dense_0"])
    w = out[prefix + "net.0.weight"]  # columns [a, s, time] -> [x, time, condition]
    out[prefix + "net.0.weight"] = np.concatenate([w[:, :ACT], w[:, ACT + OBS:], w[:, ACT:ACT + OBS]], 1)
    for i in range(BLOCKS):
        block = res[f"MLPResNetBlock_{i}"]
        out[prefix + f"net.{i + 1}.body.1.weight"] = np.asarray(block["LayerNorm_0"]["scale"]).copy()
        out[prefix + f"net.{i + 1}.body.1.bias"] = np.asarray(block["LayerNorm_0"]["bias"]).copy()
        dense(out, prefix + f"net.{i + 1}.body.2", block["Dense_0"])
        dense(out, prefix + f"net.{i + 1}.body.4", block["Dense_1"])
    dense(out, prefix + f"net.{BLOCKS + 2}", res["Dense_1"])
    return out


def critic_to_torch(p: dict, prefix: str) -> dict:
    """Ensemble(StateActionValue) params, stacked on axis 0 -> TwinQ q1 / q2."""
    out: dict = {}
    p = p["VmapStateActionValue_0"]
    for k in range(2):
        dense(out, prefix + f"q{k + 1}.0", p["MLP_0"]["Dense_0"], k)
        dense(out, prefix + f"q{k + 1}.2", p["MLP_0"]["Dense_1"], k)
        dense(out, prefix + f"q{k + 1}.4", p["Dense_0"], k)
    return out


def value_to_torch(p: dict, prefix: str) -> dict:
    """StateValue(MLP with input LayerNorm) -> Sequential(LayerNorm, mlp)."""
    out: dict = {}
    mlp = p["MLP_0"]
    out[prefix + "0.weight"] = np.asarray(mlp["LayerNorm_0"]["scale"]).copy()
    out[prefix + "0.bias"] = np.asarray(mlp["LayerNorm_0"]["bias"]).copy()
    dense(out, prefix + "1.0", mlp["Dense_0"])
    dense(out, prefix + "1.2", mlp["Dense_1"])
    dense(out, prefix + "1.4", p["OutputVDense"])
    return out


def weights(agent) -> dict:
    out = actor_to_torch(agent.score_model.params, "actor.model.diffusion.")
    out.update(actor_to_torch(agent.target_score_model.params, "actor.model_ema.diffusion."))
    out.update(critic_to_torch(agent.critic.params, "critic."))
    out.update(critic_to_torch(agent.target_critic.params, "critic_target."))
    out.update(value_to_torch(agent.value.params, "value."))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", type=Path, required=True, help="checkout of github.com/philippe-eecs/IDQL")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "tests/fixtures/parity/idql.npz")
    parser.add_argument("--decay-steps", type=int, default=40, help="the actor's cosine decay_steps")
    args = parser.parse_args()

    learner = import_learner(args.original)
    import jax
    import jax.numpy as jnp

    learner.MLPResNet = partial(learner.MLPResNet, hidden_dim=HIDDEN)  # the original hard-codes width 256
    agent = learner.DDPMIQLLearner.create(
        SEED, Box(OBS), Box(ACT), critic_hidden_dims=(HIDDEN, HIDDEN), actor_num_blocks=BLOCKS,
        actor_dropout_rate=DROPOUT, time_dim=TIME_DIM, T=T, N=N, decay_steps=args.decay_steps)
    fixture: dict = {f"init:{k}": v for k, v in weights(agent).items() if ".model_ema." not in k and "_target." not in k}

    rng = np.random.default_rng(0)
    batches = {
        "obs": rng.normal(size=(UPDATES, BATCH, OBS)).astype(np.float32),
        "act": np.clip(rng.normal(0, 0.6, size=(UPDATES, BATCH, ACT)), -1 + 1e-5, 1 - 1e-5).astype(np.float32),
        "rew": rng.normal(0, 3.0, size=(UPDATES, BATCH)).astype(np.float32),  # already scaled by 1000 / (max - min)
        "next_obs": rng.normal(size=(UPDATES, BATCH, OBS)).astype(np.float32),
        "terminal": (rng.random((UPDATES, BATCH)) < 0.1).astype(np.float32),
    }
    fixture.update({f"batch:{k}": v for k, v in batches.items()})

    # the dropout masks: jax.random.bernoulli, as flax's Dropout calls it, recorded in an eager apply
    masks_seen: list = []
    bernoulli = jax.random.bernoulli

    def recording_bernoulli(*a, **kw):
        mask = bernoulli(*a, **kw)
        masks_seen.append(np.asarray(mask))
        return mask

    times, noises, masks, losses = [], [], [], {k: [] for k in ("actor_loss", "value_loss", "critic_loss", "v", "q")}
    lrs = []
    for u in range(UPDATES):
        batch = {"observations": batches["obs"][u], "actions": batches["act"][u], "rewards": batches["rew"][u],
                 "next_observations": batches["next_obs"][u], "masks": 1.0 - batches["terminal"][u]}
        # update_actor's draws, split from agent.rng as it splits them
        key, r = jax.random.split(agent.rng, 2)
        t = jax.random.randint(key, (BATCH,), 0, T)
        key, r = jax.random.split(r, 2)
        noise = jax.random.normal(key, (BATCH, ACT))
        dropout_key, _ = jax.random.split(r, 2)
        abar = agent.alpha_hats[t][:, None]
        noisy = jnp.sqrt(abar) * batch["actions"] + jnp.sqrt(1 - abar) * noise
        masks_seen.clear()
        jax.random.bernoulli = recording_bernoulli
        try:
            with jax.disable_jit():
                eps = agent.score_model.apply_fn({"params": agent.score_model.params}, batch["observations"], noisy,
                                                 t[:, None], rngs={"dropout": dropout_key}, training=True)
        finally:
            jax.random.bernoulli = bernoulli
        assert len(masks_seen) == BLOCKS, len(masks_seen)
        lrs.append(float(learner.optax.cosine_decay_schedule(3e-4, args.decay_steps)(u)))
        agent, info = agent.update(batch)
        own_loss = float(((eps - noise) ** 2).sum(-1).mean())
        assert abs(own_loss - float(info["actor_loss"])) <= 1e-5 * abs(own_loss), (own_loss, info["actor_loss"])
        times.append(np.asarray(t))
        noises.append(np.asarray(noise))
        masks.append(np.stack(masks_seen))
        for k in losses:
            losses[k].append(float(info[k]))
    fixture["draw:time"] = np.stack(times).astype(np.int64)
    fixture["draw:noise"] = np.stack(noises).astype(np.float32)
    fixture["draw:dropout_keep"] = np.stack(masks).astype(bool)  # (updates, blocks, batch, hidden)
    fixture.update({f"loss:{k}": np.asarray(v, np.float32) for k, v in losses.items()})
    fixture["actor_lr"] = np.asarray(lrs, np.float64)
    fixture.update({f"final:{k}": v for k, v in weights(agent).items()})

    # acting: eval_actions on one state, with ddpm_sampler's draws re-derived from agent.rng
    state = rng.normal(size=(OBS,)).astype(np.float32)
    action, _ = agent.eval_actions(state)
    obs_rep = jnp.repeat(state[None], N, 0)
    key, r = jax.random.split(agent.rng, 2)
    x = jax.random.normal(key, (N, ACT))
    x_T, zs, trajectory = np.asarray(x), [], []
    params = agent.target_score_model.params
    for step in range(T - 1, -1, -1):  # the sampler's own recurrence, to record z and x per step
        trajectory.append(np.asarray(x))
        eps = agent.score_model.apply_fn({"params": params}, obs_rep, x, jnp.full((N, 1), step))
        x = (x - (1 - agent.alphas[step]) / jnp.sqrt(1 - agent.alpha_hats[step]) * eps) / jnp.sqrt(agent.alphas[step])
        r, key = jax.random.split(r, 2)
        z = jax.random.normal(key, (N, ACT))
        zs.append(np.asarray(z))
        x = jnp.clip(x + (step > 0) * jnp.sqrt(agent.betas[step]) * z, -1, 1)
    candidates = np.asarray(jnp.clip(x, -1, 1))
    sampled, _ = learner.ddpm_sampler(agent.score_model.apply_fn, params, T, agent.rng, ACT, obs_rep, agent.alphas,
                                      agent.alpha_hats, agent.betas, agent.ddpm_temperature, agent.M, agent.clip_sampler)
    np.testing.assert_allclose(candidates, np.asarray(sampled), rtol=1e-5, atol=1e-6)
    qs = np.asarray(learner.compute_q(agent.target_critic.apply_fn, agent.target_critic.params, obs_rep, sampled))
    assert np.array_equal(np.asarray(action), candidates[int(np.argmax(qs))])
    fixture.update({"act:state": state, "act:x_T": x_T, "act:z": np.stack(zs), "act:trajectory": np.stack(trajectory),
                    "act:candidates": candidates, "act:q": qs, "act:index": np.int64(np.argmax(qs)),
                    "act:action": np.asarray(action, np.float32)})
    fixture["betas"] = np.asarray(agent.betas, np.float64)
    fixture["alpha_hats"] = np.asarray(agent.alpha_hats, np.float64)

    commit = subprocess.run(["git", "-C", str(args.original), "rev-parse", "HEAD"], capture_output=True, text=True)
    fixture["meta:commit"] = np.asarray(commit.stdout.strip() or "7582571ce686c77b4ee0f592dd639ab8151295fa")
    fixture["meta:decay_steps"] = np.int64(args.decay_steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **{k: np.asarray(v) for k, v in fixture.items()})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB); losses:",
          {k: [round(x, 4) for x in v[:3]] for k, v in losses.items()})


if __name__ == "__main__":
    main()
