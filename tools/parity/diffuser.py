"""Diffuser parity fixture: runs the ORIGINAL's updates and guided planner on small U-Nets.

Original: github.com/jannerm/diffuser @ 7ea422860cc0106e5ca5949d980f04b799d5462c (PyTorch).
Compares, from the same initial weights, batches and noise draws:
  (a) 22 updates of GaussianDiffusion(TemporalUnet) (x0 prediction, action_weight 10, l2, Adam 2e-4) with
      the Trainer's EMA (decay 0.995, every 10 steps, step_start_ema 0: lerps after updates 1, 11, 21);
  (b) 22 updates of ValueDiffusion(ValueFunction) on noised windows with given return targets (value_l2);
  (c) n_step_guided_p_sample with ValueGuide (two guide settings, networks at the initial weights), plans sorted by
      value, the first action;
  (d) one forward pass of a TemporalUnet with attention (as halfcheetah's, dim 8, dim_mults (1, 2)).
All in float64 (the original's code run with torch's default dtype float64 and its cosine table computed in
float64): in float32 the two implementations agree to 1e-6 per forward pass, but Adam's first steps (update about
lr * sign(g)) and GroupNorms over few values amplify that to 1e-4 within 10 updates.
Sizes: obs 4, act 2, horizon 8, dim 16, dim_mults (1, 4), T = 20, batch 12, 8 plans. dim_mults (1, 2) at dim <= 16
would leave the value net's mid2 block one channel per GroupNorm group at length 1 (variance 0: zero gradients in
exact arithmetic, rounding noise in float, in the original as here). The initial weights are not stored but
rebuilt by the test (`init_weights`); after training the fixture keeps a fixed slice of every parameter (`sliced`).
Everything is written in this project's layout: parameter names of cleandiff_rl.nn.JannerUNet1d /
HalfJannerUNet1d and [s, a] channels (the original's [a, s] columns are permuted), noise likewise.

Run by hand (never by the tests), with einops importable, e.g.:
  pip install --target /tmp/einops einops
  PYTHONPATH=/tmp/einops python tools/parity/diffuser.py --original /path/to/diffuser-checkout
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch

OBS, ACT, H, DIM, MULTS, T, BATCH, UPDATES, PLANS = 4, 2, 8, 16, (1, 4), 20, 12, 22, 8
X = OBS + ACT
GUIDES = [dict(scale=0.5, t_stopgrad=2, n_guide_steps=2, scale_grad_by_std=True),
          dict(scale=1.0, t_stopgrad=4, n_guide_steps=1, scale_grad_by_std=False)]
PERM = list(range(ACT, X)) + list(range(ACT))  # project channel j = original channel PERM[j]


def import_original(root: Path) -> dict:
    """The original's modules, with its package __init__s (gym, d4rl, mujoco_py, rendering) bypassed."""
    sys.path.insert(0, str(root))
    for name in ("diffuser", "diffuser.utils", "diffuser.sampling"):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(root / name.replace(".", "/"))]
        sys.modules[name] = pkg
    import diffuser.utils.arrays as arrays
    import diffuser.utils.progress as progress
    import diffuser.utils.training as training
    utils = sys.modules["diffuser.utils"]
    utils.to_np, utils.Progress, utils.Silent = arrays.to_np, progress.Progress, progress.Silent
    from diffuser.models import diffusion, helpers, temporal
    from diffuser.sampling import functions, guides
    return dict(temporal=temporal, diffusion=diffusion, helpers=helpers, training=training, functions=functions,
                guides=guides)


class Recorder:
    """Wraps torch.randint / randn / randn_like so every draw the original makes is kept, in order."""

    def __init__(self):
        self.draws: list[torch.Tensor] = []
        self.orig = (torch.randint, torch.randn, torch.randn_like)
        randint, randn, randn_like = self.orig

        def rec(fn):
            def wrapped(*args, **kwargs):
                out = fn(*args, **kwargs)
                self.draws.append(out.detach().clone())
                return out
            return wrapped

        torch.randint, torch.randn, torch.randn_like = rec(randint), rec(randn), rec(randn_like)

    def take(self) -> list[torch.Tensor]:
        out, self.draws = self.draws, []
        return out

    def close(self) -> None:
        torch.randint, torch.randn, torch.randn_like = self.orig


def to_project_layout(draw: torch.Tensor) -> torch.Tensor:
    """A noise draw (..., X) in [a, s] columns as [s, a]; integer draws (times) unchanged."""
    return draw[..., PERM] if draw.is_floating_point() and draw.shape[-1] == X else draw


def _block(src: str, dst: str) -> list[tuple[str, str]]:
    """ResidualTemporalBlock -> _ResidualTemporalBlock parameter names."""
    return [(f"{src}.blocks.0.block.0.", f"{dst}.conv1.0."), (f"{src}.blocks.0.block.2.", f"{dst}.conv1.1."),
            (f"{src}.blocks.1.block.0.", f"{dst}.conv2.0."), (f"{src}.blocks.1.block.2.", f"{dst}.conv2.1."),
            (f"{src}.time_mlp.1.", f"{dst}.emb_proj.1."), (f"{src}.residual_conv.", f"{dst}.skip.")]


def _attn(src: str, dst: str) -> list[tuple[str, str]]:
    """Residual(PreNorm(LinearAttention)) -> _LinearAttention names (the LayerNorm's g, b are (1, C, 1))."""
    return [(f"{src}.fn.norm.g", f"{dst}.norm.weight"), (f"{src}.fn.norm.b", f"{dst}.norm.bias"),
            (f"{src}.fn.fn.", f"{dst}.")]


def rules(value: bool, levels: int) -> list[tuple[str, str]]:
    """(original prefix, project prefix) for every parameter of a TemporalUnet / ValueFunction."""
    rules = [("time_mlp.", "embedding.time_mlp.")]
    if value:
        for i in range(levels):
            rules += _block(f"blocks.{i}.0", f"downs.{i}.block1") + _block(f"blocks.{i}.1", f"downs.{i}.block2")
            rules += [(f"blocks.{i}.2.conv.", f"downs.{i}.resample.")]
        rules += _block("mid_block1", "mid1") + _block("mid_block2", "mid2")
        rules += [("mid_down1.conv.", "mid_down1."), ("mid_down2.conv.", "mid_down2."), ("final_block.", "head.")]
    else:
        for i in range(levels):
            rules += _block(f"downs.{i}.0", f"downs.{i}.block1") + _block(f"downs.{i}.1", f"downs.{i}.block2")
            rules += _attn(f"downs.{i}.2", f"downs.{i}.attn") + [(f"downs.{i}.3.conv.", f"downs.{i}.resample.")]
        for i in range(levels - 1):
            rules += _block(f"ups.{i}.0", f"ups.{i}.block1") + _block(f"ups.{i}.1", f"ups.{i}.block2")
            rules += _attn(f"ups.{i}.2", f"ups.{i}.attn") + [(f"ups.{i}.3.conv.", f"ups.{i}.resample.")]
        rules += _block("mid_block1", "mid1") + _block("mid_block2", "mid2") + _attn("mid_attn", "mid_attn")
        rules += [("final_conv.0.block.0.", "final.0.0."), ("final_conv.0.block.2.", "final.0.1."),
                  ("final_conv.1.", "final.1.")]
    return rules


def project_name(key: str, table: list[tuple[str, str]]) -> str:
    name = next((dst + key[len(src):] for src, dst in table if key.startswith(src)), None)
    if name is None:
        raise KeyError(f"no rule for {key}")
    return name


IN_X = ("downs.0.block1.conv1.0.weight", "downs.0.block1.skip.weight")  # input channels are [s, a] / [a, s]
OUT_X = ("final.1.weight", "final.1.bias")  # output channels


def to_project(module: torch.nn.Module, value: bool, levels: int) -> dict[str, np.ndarray]:
    """An original TemporalUnet / ValueFunction state_dict in the project's names and [s, a] channels."""
    table, out = rules(value, levels), {}
    for key, tensor in module.state_dict().items():
        name, t = project_name(key, table), tensor.detach().clone()
        if name.endswith("norm.weight") or name.endswith("norm.bias"):
            t = t.reshape(-1)  # the original's LayerNorm g, b are (1, C, 1)
        t = t[:, PERM] if name in IN_X else t[PERM] if name in OUT_X else t
        out[name] = t.numpy()
    return out


def load_into_original(module: torch.nn.Module, state: dict[str, torch.Tensor], value: bool, levels: int) -> None:
    """Load a project-layout state_dict into the original's module (the inverse of `to_project`)."""
    table, inv, new = rules(value, levels), np.argsort(PERM), {}
    for key, tensor in module.state_dict().items():
        name = project_name(key, table)
        t = state[name][:, inv] if name in IN_X else state[name][inv] if name in OUT_X else state[name]
        new[key] = t.reshape(tensor.shape).clone()
    module.load_state_dict(new, strict=True)


def init_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fixture's initial weights, rebuilt by the test from the project module alone: in sorted name order,
    from one seed-0 generator, matrices and kernels U(-1, 1) / sqrt(fan_in), 1-D weights 1 + U(-0.1, 0.1), biases
    U(-0.1, 0.1). (Stored weights of U-Nets wide enough for the value's GroupNorms would exceed 1 MB.)"""
    g, state = torch.Generator().manual_seed(0), {}
    for name, p in sorted(module.state_dict().items()):
        u = torch.rand(p.shape, generator=g) * 2 - 1
        if p.dim() > 1:
            state[name] = u / math.sqrt(p[0].numel())
        else:
            state[name] = 1 + 0.1 * u if name.endswith("weight") else 0.1 * u
    module.load_state_dict(state, strict=True)
    return state


def sliced(tensor: np.ndarray) -> np.ndarray:
    """The fixed slice of a parameter the fixture keeps after training: every 5th entry, at most 48."""
    return tensor.reshape(-1)[::5][:48]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", required=True, type=Path, help="checkout of jannerm/diffuser")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[2] / "tests/fixtures/parity/diffuser.npz")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # float32 rounding, amplified by Adam and small GroupNorms (see above)
    jd = import_original(args.original)
    # the original's schedule formula in float64 (the release casts the table to float32)
    jd["diffusion"].cosine_beta_schedule = functools.partial(jd["helpers"].cosine_beta_schedule, dtype=torch.float64)
    from cleandiff_rl.nn import HalfJannerUNet1d, JannerUNet1d
    torch.manual_seed(0)
    out: dict[str, np.ndarray] = {}
    levels = len(MULTS)

    unet = jd["temporal"].TemporalUnet(H, X, OBS, dim=DIM, dim_mults=MULTS)
    vnet = jd["temporal"].ValueFunction(H, X, OBS, dim=DIM, dim_mults=MULTS)
    diffusion = jd["diffusion"].GaussianDiffusion(unet, H, OBS, ACT, n_timesteps=T, loss_type="l2",
                                                  clip_denoised=False, predict_epsilon=False, action_weight=10,
                                                  loss_discount=1)
    value = jd["diffusion"].ValueDiffusion(vnet, H, OBS, ACT, n_timesteps=T, loss_type="value_l2")
    for net, is_value, project in ((unet, False, JannerUNet1d(X, model_dim=DIM, dim_mults=MULTS)),
                                   (vnet, True, HalfJannerUNet1d(X, horizon=H, model_dim=DIM, dim_mults=MULTS))):
        load_into_original(net, init_weights(project), is_value, levels)

    # Trainer with the released step/EMA logic; gradient_accumulate_every 1 (the original 2 x 32 averages
    # two half-batch losses: the same gradient as one batch of 64 up to which draws it uses)
    trainers = []
    for model in (diffusion, value):
        trainer = object.__new__(jd["training"].Trainer)
        trainer.model, trainer.ema, trainer.ema_model = model, jd["training"].EMA(0.995), copy.deepcopy(model)
        trainer.update_ema_every, trainer.step_start_ema, trainer.step = 10, 0, 0
        trainer.optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
        trainers.append(trainer)

    g = torch.Generator().manual_seed(1)
    obs = torch.randn(UPDATES, BATCH, H, OBS, generator=g)
    act = torch.rand(UPDATES, BATCH, H, ACT, generator=g) * 2 - 1
    returns = torch.randn(UPDATES, BATCH, generator=g) * 30 + 50
    out.update(obs=obs.numpy(), act=act.numpy(), values=returns.numpy())

    recorder = Recorder()
    losses = {"model": [], "value": []}
    for k in range(UPDATES):
        x = torch.cat([act[k], obs[k]], -1)  # the original's [a, s]
        cond = {0: obs[k][:, 0]}
        for name, trainer, extra in (("model", trainers[0], ()), ("value", trainers[1], (returns[k][:, None],))):
            loss, _ = trainer.model.loss(x, cond, *extra)  # Trainer.train's step, without logging/saving
            loss.backward()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            if trainer.step % trainer.update_ema_every == 0:
                trainer.step_ema()
            trainer.step += 1
            losses[name].append(loss.item())
    train_draws = recorder.take()
    out["model_losses"], out["value_losses"] = np.array(losses["model"]), np.array(losses["value"])
    for prefix, module, is_value in (("unet_final", unet, False), ("unet_ema", trainers[0].ema_model.model, False),
                                     ("value_final", vnet, True)):
        out.update({f"{prefix}/{k}": sliced(v) for k, v in to_project(module, is_value, levels).items()})

    # (c) guided planning from one observation, with fresh networks at the initial weights (the trained value's
    # chaotic Adam dynamics, 1e-7 apart after 22 float64 updates, would otherwise blur the sampler's comparison)
    plan_obs = torch.randn(1, OBS, generator=g)
    out["plan_obs"] = plan_obs.numpy()
    recorder.take()  # plan_obs is the fixture's, not a draw of the original's
    unet = jd["temporal"].TemporalUnet(H, X, OBS, dim=DIM, dim_mults=MULTS)
    vnet = jd["temporal"].ValueFunction(H, X, OBS, dim=DIM, dim_mults=MULTS)
    load_into_original(unet, init_weights(JannerUNet1d(X, model_dim=DIM, dim_mults=MULTS)), False, levels)
    load_into_original(vnet, init_weights(HalfJannerUNet1d(X, horizon=H, model_dim=DIM, dim_mults=MULTS)), True, levels)
    diffusion = jd["diffusion"].GaussianDiffusion(unet, H, OBS, ACT, n_timesteps=T, loss_type="l2",
                                                  clip_denoised=False, predict_epsilon=False, action_weight=10)
    guide = jd["guides"].ValueGuide(vnet)
    plan_draws = []
    for i, kw in enumerate(GUIDES):
        cond = {0: plan_obs.repeat(PLANS, 1)}
        sample = diffusion.conditional_sample(cond, sample_fn=jd["functions"].n_step_guided_p_sample, guide=guide,
                                              verbose=False, **kw)
        plan_draws += recorder.take()
        trajectories = sample.trajectories.detach()
        out[f"plans{i}"] = trajectories[..., PERM].numpy()  # sorted by value, best first
        out[f"plan_values{i}"] = sample.values.detach().numpy()
        out[f"action{i}"] = trajectories[0, 0, :ACT].numpy()  # GuidedPolicy: actions[0, 0]
    unguided = diffusion.conditional_sample({0: plan_obs.repeat(PLANS, 1)}, verbose=False)
    plan_draws += recorder.take()
    out["plans_unguided"] = unguided.trajectories[..., PERM].numpy()

    # (d) the attention U-Net (halfcheetah's dim_mults and attention), one forward pass
    attn = jd["temporal"].TemporalUnet(4, X, OBS, dim=8, dim_mults=(1, 2), attention=True)
    load_into_original(attn, init_weights(JannerUNet1d(X, model_dim=8, dim_mults=(1, 2), attention=True)), False, 2)
    x_attn, t_attn = torch.randn(5, 4, X, generator=g), torch.randint(0, T, (5,), generator=g)
    with torch.no_grad():
        out["attn_y"] = attn(x_attn, None, t_attn)[..., PERM].numpy()
    out["attn_x"], out["attn_t"] = x_attn[..., PERM].numpy(), t_attn.numpy()
    recorder.close()

    for name, draws in (("train_draws", train_draws), ("plan_draws", plan_draws)):
        out[f"{name}_count"] = np.array(len(draws))
        for j, d in enumerate(draws):
            out[f"{name}/{j}"] = to_project_layout(d).numpy()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: {args.out.stat().st_size / 1e3:.0f} kB; model losses {losses['model'][0]:.4f} -> "
          f"{losses['model'][-1]:.4f}, value losses {losses['value'][0]:.2f} -> {losses['value'][-1]:.2f}")


if __name__ == "__main__":
    main()
