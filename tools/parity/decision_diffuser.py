"""Decision Diffuser parity reference: the original's updates and action, for tests/test_parity_decision_diffuser.py.

Runs github.com/anuragajay/decision-diffuser (commit 01ce528c30b4733dc59aa6203e46ec165561158d), the original's
`GaussianInvDynDiffusion.loss` (state diffusion, eps target, weight 0 on the inpainted s_0, classifier-free label
dropout 0.25, inverse dynamics trained jointly: loss = (diffusion + inverse dynamics) / 2) on a `TemporalUnet` with the
returns condition, through its Trainer's step (Adam 2e-4, gradient accumulation 2, `Trainer.step_ema`: decay 0.995
every 10 steps, from step 10 here in place of 2000: it copies after step 0 and averages after steps 10 and 20), for
21 updates; then the action: `conditional_sample` (DDPM over all T steps, CFG with w = 1.2 at return 0.9, initial
and every step's noise x 0.5, x0 clipped to [-1, 1]) from the EMA model, and a = ema inv_model(s_0, s_1).
Small sizes: obs 5, act 3, horizon 8, dim 16, dim_mults (1, 2), T = 20, inverse dynamics hidden 32, two
micro-batches of 8 per update. Not dim 8: GroupNorm(8) would normalize each first-level channel alone, so its conv
bias gets a zero gradient and Adam steps on rounding noise.

Writes (npz): the initial parameters in this project's names (DecisionDiffuser's `model.model` ModuleDict and
`inverse_dynamics`), the batches, every random draw of the original (diffusion step t, training noise, the
Bernoulli condition mask, sampling noise), per-update losses, the parameters after the last update (online; the EMA
of both networks as a fixed slice of every tensor), the planned states and the action.

Run by hand (never by the tests), with einops importable (pip install einops, or --pythonpath DIR):
    python tools/parity/decision_diffuser.py --original /path/to/decision-diffuser [--out FILE.npz]
(--out defaults to tests/fixtures/parity/decision_diffuser.npz)
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import types
from pathlib import Path

import numpy as np
import torch

OBS, ACT, HORIZON, DIM, DIM_MULTS, T, INV_HIDDEN = 5, 3, 8, 16, (1, 2), 20, 32
MICRO_BATCH, ACCUMULATE, UPDATES, LR, EMA_START, EMA_SLICE = 8, 2, 21, 2e-4, 10, 128
W_CFG, TEST_RET, N_ACT = 1.2, 0.9, 3

# original parameter name -> this project's (regex substitutions, applied in order)
RENAMES = [
    (r"^model\.time_mlp\.", "diffusion.embedding.time_mlp."),
    (r"^model\.returns_mlp\.", "condition.net."),
    (r"^model\.mid_block(\d)\.", r"diffusion.mid\1."),
    (r"^model\.(downs|ups)\.(\d+)\.0\.", r"diffusion.\1.\2.block1."),
    (r"^model\.(downs|ups)\.(\d+)\.1\.", r"diffusion.\1.\2.block2."),
    (r"^model\.(downs|ups)\.(\d+)\.2\.conv\.", r"diffusion.\1.\2.resample."),
    (r"^model\.final_conv\.0\.block\.0\.", "diffusion.final.0.0."),
    (r"^model\.final_conv\.0\.block\.2\.", "diffusion.final.0.1."),
    (r"^model\.final_conv\.1\.", "diffusion.final.1."),
    (r"\.blocks\.(\d)\.block\.0\.", lambda m: f".conv{int(m.group(1)) + 1}.0."),
    (r"\.blocks\.(\d)\.block\.2\.", lambda m: f".conv{int(m.group(1)) + 1}.1."),
    (r"(block\d|mid\d)\.time_mlp\.1\.", r"\1.emb_proj.1."),  # a residual block's embedding projection
    (r"\.residual_conv\.", ".skip."),
    (r"^inv_model\.", "inverse_dynamics.0."),
]


def project_name(name: str) -> str:
    for pattern, repl in RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def project_params(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {project_name(k): v.detach().numpy().copy() for k, v in module.named_parameters()}


def import_original(root: Path) -> types.ModuleType:
    """diffuser.models from the checkout, without the package __init__s (gym, d4rl, mujoco_py, ml_logger)."""
    code = root / "code" / "diffuser"
    for name, path in (("diffuser", code), ("diffuser.utils", code / "utils")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    import diffuser.utils.progress as progress

    sys.modules["diffuser.utils"].Progress, sys.modules["diffuser.utils"].Silent = progress.Progress, progress.Silent
    sys.modules["ml_logger"] = types.SimpleNamespace(logger=None)
    import diffuser.models as models
    import diffuser.utils.training as training

    models.training = training
    return models


class Recorder:
    """Wraps torch's random draws the original makes, keeping every value in call order."""

    def __init__(self):
        self.draws: list[tuple[str, torch.Tensor]] = []
        for name in ("randint", "randn_like", "randn"):
            setattr(torch, name, self._wrap(name, getattr(torch, name)))

    def _wrap(self, name, fn):
        def draw(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.draws.append((name, out.detach().clone()))
            return out
        return draw

    def wrap_bernoulli(self, dist) -> None:
        sample = dist.sample
        dist.sample = lambda *a, **k: self.draws.append(("bernoulli", out := sample(*a, **k))) or out

    def take(self, *names: str) -> list[torch.Tensor]:
        got = [self.draws.pop(0) for _ in names]
        assert [g[0] for g in got] == list(names), [g[0] for g in got]
        return [g[1] for g in got]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", type=Path, required=True, help="checkout of anuragajay/decision-diffuser")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2]
                        / "tests/fixtures/parity/decision_diffuser.npz")
    parser.add_argument("--pythonpath", type=Path, help="extra import path (e.g. where einops is installed)")
    args = parser.parse_args()
    if args.pythonpath:
        sys.path.insert(0, str(args.pythonpath))
    torch.set_num_threads(1)
    models = import_original(args.original)

    torch.manual_seed(0)
    net = models.TemporalUnet(horizon=HORIZON, transition_dim=OBS, cond_dim=OBS, dim=DIM, dim_mults=DIM_MULTS,
                              returns_condition=True, condition_dropout=0.25, calc_energy=False)
    diffusion = models.GaussianInvDynDiffusion(
        net, horizon=HORIZON, observation_dim=OBS, action_dim=ACT, n_timesteps=T, loss_type="l2", clip_denoised=True,
        predict_epsilon=True, hidden_dim=INV_HIDDEN, action_weight=10, loss_discount=1, loss_weights=None,
        returns_condition=True, condition_guidance_w=W_CFG, ar_inv=False, train_only_inv=False)
    # the Trainer's state without its dataset, renderer and logger: its step_ema and EMA run as written
    trainer = models.training.Trainer.__new__(models.training.Trainer)
    trainer.model, trainer.ema = diffusion, models.training.EMA(0.995)
    trainer.ema_model = copy.deepcopy(diffusion)
    trainer.update_ema_every, trainer.step_start_ema, trainer.step = 10, EMA_START, 0
    trainer.optimizer = torch.optim.Adam(diffusion.parameters(), lr=LR)
    trainer.reset_parameters()
    out: dict[str, np.ndarray] = {f"init/{k}": v for k, v in project_params(diffusion).items()}

    gen = torch.Generator().manual_seed(1)
    n = UPDATES * ACCUMULATE * MICRO_BATCH
    obs = torch.rand(n, HORIZON, OBS, generator=gen) * 2 - 1  # CDF-normalized states lie in [-1, 1]
    act = torch.rand(n, HORIZON, ACT, generator=gen) * 2 - 1
    returns = torch.rand(n, 1, generator=gen)
    rec = Recorder()
    rec.wrap_bernoulli(net.mask_dist)
    ts, noises, masks, losses = [], [], [], []
    for step in range(UPDATES):  # Trainer.train, one step
        diff_sum = inv_sum = 0.0
        for i in range(ACCUMULATE):
            rows = slice((step * ACCUMULATE + i) * MICRO_BATCH, (step * ACCUMULATE + i + 1) * MICRO_BATCH)
            x = torch.cat([act[rows], obs[rows]], -1)  # the original's trajectories: [actions, states]
            loss, info = diffusion.loss(x, {0: x[:, 0, ACT:]}, returns[rows])
            t, noise, mask = rec.take("randint", "randn_like", "bernoulli")
            ts.append(t), noises.append(noise), masks.append(mask.squeeze(-1))
            diff_sum += info["a0_loss"].item()
            inv_sum += 2 * loss.item() - info["a0_loss"].item()
            (loss / ACCUMULATE).backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        if trainer.step % trainer.update_ema_every == 0:
            trainer.step_ema()
        trainer.step += 1
        losses.append([diff_sum / ACCUMULATE, inv_sum / ACCUMULATE])
    assert not rec.draws
    out.update({f"final/{k}": v for k, v in project_params(diffusion).items()})
    # the EMA as the first EMA_SLICE entries of every flattened tensor (fixture < 1 MB; the action reads it all)
    out.update({f"ema/{k}": v.ravel()[:EMA_SLICE] for k, v in project_params(trainer.ema_model).items()})

    # acting, as evaluate_inv_parallel.py: plan from the EMA model, then its inverse dynamics on (s_0, s_1)
    ema = trainer.ema_model
    rec.wrap_bernoulli(ema.model.mask_dist)
    act_obs = torch.rand(N_ACT, OBS, generator=gen) * 2 - 1
    with torch.no_grad():
        plans = ema.conditional_sample({0: act_obs}, returns=TEST_RET * torch.ones(N_ACT, 1), verbose=False)
        action = ema.inv_model(torch.cat([plans[:, 0], plans[:, 1]], -1))
    sample_noise = [rec.take("randn")[0]]
    for _ in range(T):  # per step: the unconditional call's (unused) mask, then the step's noise
        sample_noise.append(rec.take("bernoulli", "randn_like")[1])
    assert not rec.draws

    out.update({
        "batch/obs": obs.view(UPDATES, -1, HORIZON, OBS).numpy(),
        "batch/act": act.view(UPDATES, -1, HORIZON, ACT).numpy(),
        "batch/returns": returns.view(UPDATES, -1).numpy(),
        "draw/t": torch.stack(ts).view(UPDATES, -1).numpy(),
        "draw/noise": torch.stack(noises).view(UPDATES, -1, HORIZON, OBS).numpy(),
        "draw/mask": torch.stack(masks).view(UPDATES, -1).numpy(),
        "losses": np.asarray(losses, dtype=np.float32),
        "act/obs": act_obs.numpy(),
        "act/noise": torch.stack(sample_noise).numpy(),  # [initial, step T-1, ..., step 0]
        "act/plans": plans.numpy(),
        "act/action": action.numpy(),
        "settings": np.asarray([OBS, ACT, HORIZON, DIM, T, INV_HIDDEN, MICRO_BATCH * ACCUMULATE], dtype=np.int64),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **{k: np.asarray(v) for k, v in out.items()})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB); losses (diffusion, inverse dynamics):")
    print(np.asarray(losses)[[0, -1]])


if __name__ == "__main__":
    main()
