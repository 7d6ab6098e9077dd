"""`DiffusionModel`: train one network, sample it with any solver at any number of steps.

The model is the product of four swappable parts (CleanDiffuser's decoupling):
a backbone `nn_diffusion(x, t, condition)`, an optional condition encoder `nn_condition`,
a noise schedule, and guidance (classifier-free, classifier, inpainting through `fix_mask`).
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Callable

import torch
from torch import Tensor, nn

from cleandiff_rl.diffusion.schedules import make_schedule
from cleandiff_rl.diffusion.solvers import SOLVERS, Level, Solver, get_solver, level_at, time_grid
from cleandiff_rl.utils import finite_floats, optimizer_step, resolve_device

PREDICTIONS = ("eps", "x0", "v")


def check_temperature(temperature: float) -> float:
    """`temperature`, the scale of `DiffusionModel.sample`'s initial noise, as a float; a negative one is an error."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    return float(temperature)


def _min_snr(alpha: Tensor, sigma: Tensor, predict: str, gamma: float = 5.0) -> Tensor:
    snr = (alpha / sigma) ** 2
    return snr.clamp(max=gamma) / (snr if predict == "eps" else 1.0)


# Weights w(t) on the squared error of the model's own prediction target.
TIME_WEIGHTINGS: dict[str, Callable[[Tensor, Tensor, str], Tensor]] = {
    "uniform": lambda alpha, sigma, predict: torch.ones_like(sigma),
    "sigma": lambda alpha, sigma, predict: sigma,
    "sigma2": lambda alpha, sigma, predict: sigma**2,
    "snr": lambda alpha, sigma, predict: (alpha / sigma) ** 2,
    "min_snr": _min_snr,  # Hang et al. 2023, gamma = 5, target-aware
}


class _Denoiser:
    """The network at one level with CFG, classifier guidance and x0 clipping; counts calls."""

    def __init__(self, model: "DiffusionModel", net: nn.ModuleDict, n: int, condition_cfg: Tensor | None,
                 w_cfg: float, condition_cg: Tensor | None, w_cg: float):
        self.backbone = net["diffusion"]
        self.predict, self.classifier = model.predict, model.classifier
        self.x_min, self.x_max = model.x_min, model.x_max
        self.clip = model.clips_x0
        self.times = model.time_tensor
        self.condition_cg, self.w_cg = condition_cg, w_cg
        self.nfe = self.classifier_calls = 0
        self.cfg = condition_cfg is not None and w_cfg not in (0.0, 1.0)
        self.w_cfg = w_cfg
        self.condition = self._embed(net["condition"], condition_cfg, n, w_cfg, model.device)

    def _embed(self, encoder: nn.Module | None, condition: Tensor | None, n: int, w: float,
               device: torch.device) -> Tensor | None:
        """Condition embedding, computed once per sample() call; [cond; null] rows when batching CFG."""
        if condition is None:
            return None
        if encoder is None:
            if w == 1.0:
                return condition
            encoder = lambda c, mask: c * mask.view(-1, *([1] * (c.dim() - 1)))  # noqa: E731
        if self.cfg:
            keep = torch.cat([torch.ones(n, device=device), torch.zeros(n, device=device)])
            return encoder(torch.cat([condition, condition]), mask=keep)
        return encoder(condition, mask=torch.full((n,), float(w != 0.0), device=device))  # w = 0: null only

    def __call__(self, x: Tensor, level: Level, param: str) -> Tensor:
        n = x.shape[0]
        if self.cfg:  # one batched call; eps = eps_u + w (eps_c - eps_u)
            out_c, out_u = self.backbone(torch.cat([x, x]), self.times(level.t, 2 * n, x.dtype), self.condition).chunk(2)
            out = torch.lerp(out_u, out_c, self.w_cfg)
        else:
            out = self.backbone(x, self.times(level.t, n, x.dtype), self.condition)
        self.nfe += 1
        native = self.predict
        if self.w_cg:
            out, native = self._classifier_guidance(x, level, self._convert(x, out, level, native, "eps")), "eps"
        if self.clip:
            out, native = self._convert(x, out, level, native, "x0").clamp(self.x_min, self.x_max), "x0"
        return self._convert(x, out, level, native, param)

    def _classifier_guidance(self, x: Tensor, level: Level, eps: Tensor) -> Tensor:
        """Shift the eps prediction by the gradient of log p(y | x_t): eps - w sigma grad."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_p = self.classifier(x_in, self.times(level.t, x.shape[0], x.dtype), self.condition_cg)
            grad = torch.autograd.grad(log_p.sum(), x_in)[0]
        self.classifier_calls += 1
        return eps - (self.w_cg * level.sigma) * grad

    @staticmethod
    def _convert(x: Tensor, out: Tensor, level: Level, src: str, dst: str) -> Tensor:
        """`out` (in form `src`) in form `dst`: a linear map of (x, out), see `Level.conversion`."""
        if src == dst:
            return out
        c_x, c_out = level.conversion(src, dst)
        return out.mul(c_out).add_(x, alpha=c_x)


class DiffusionModel(nn.Module):
    """A diffusion model over tensors shaped `(batch, *x_shape)`.

    Args:
        nn_diffusion: backbone with `forward(x, t, condition=None)` returning the eps, x0 or v prediction.
        nn_condition: encoder with `forward(condition, mask=None)`; None passes conditions through.
        time / schedule / diffusion_steps: "discrete" (T = diffusion_steps integer steps) or
            "continuous" time; "linear" or "cosine" VP, or "ve" or the rectified "flow" (continuous only).
        predict: what the backbone outputs: "eps", "x0", or "v", the velocity dx_t/dt = alpha' x0 + sigma' eps
            (continuous time; eps - x0 on the flow schedule, i.e. flow matching).
        fix_mask: `x_shape` tensor, 1 where values are given (inpainting): kept from `x0` in training
            (and excluded from the loss) and from `prior` in sampling.
        loss_weight: `x_shape` tensor of per-element weights of the squared error.
        time_weighting: one of TIME_WEIGHTINGS, a weight w(t) on each sample's error.
        classifier: module `forward(x, t, condition) -> (batch,)` log p(y | x_t), for classifier guidance.
        ema_rate / ema_every / ema_start: EMA decay, applied every `ema_every` updates; before
            `ema_start` updates the EMA copies the weights.
        x_min / x_max: clip the x0 prediction at every sampling step and the final sample.
        lr / weight_decay / grad_clip_norm: the AdamW optimizer used by `update`.
        schedule_kwargs: passed to the schedule (e.g. {"beta_max": 10.0}).
    """

    def __init__(self, nn_diffusion: nn.Module, nn_condition: nn.Module | None = None, *,
                 time: str = "discrete", schedule: str = "cosine", diffusion_steps: int = 1000,
                 predict: str = "eps", fix_mask: Tensor | None = None, loss_weight: Tensor | None = None,
                 time_weighting: str = "uniform", classifier: nn.Module | None = None,
                 ema_rate: float = 0.995, ema_every: int = 1, ema_start: int = 0,
                 x_min: float | Tensor | None = None, x_max: float | Tensor | None = None,
                 lr: float = 2e-4, weight_decay: float = 0.0, grad_clip_norm: float | None = None,
                 schedule_kwargs: dict | None = None, device: str | torch.device = "auto"):
        super().__init__()
        if predict not in PREDICTIONS:
            raise ValueError(f"unknown predict {predict!r}; valid: {', '.join(PREDICTIONS)}")
        if time_weighting not in TIME_WEIGHTINGS:
            raise ValueError(f"unknown time_weighting {time_weighting!r}; valid: {', '.join(TIME_WEIGHTINGS)}")
        if not 0.0 <= ema_rate < 1.0:
            raise ValueError(f"ema_rate must lie in [0, 1), got {ema_rate}")
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # tracks .to(device)
        self.schedule = make_schedule(time, schedule, diffusion_steps, **(schedule_kwargs or {}))
        if predict == "v" and self.schedule.kind == "discrete":
            raise ValueError("predict='v' (the velocity dx_t/dt) needs time='continuous'")
        if predict == "v" and time_weighting == "min_snr":
            raise ValueError("time_weighting='min_snr' is defined for predict='eps' or 'x0'")
        self.predict, self.time_weighting = predict, time_weighting
        self.ema_rate, self.ema_every, self.ema_start = ema_rate, ema_every, ema_start
        self.grad_clip_norm = grad_clip_norm
        self.model = nn.ModuleDict({"diffusion": nn_diffusion, "condition": nn_condition})
        self.model_ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.classifier = classifier
        self.register_buffer("fix_mask", None if fix_mask is None else torch.as_tensor(fix_mask, dtype=torch.bool))
        self.register_buffer("loss_weight", None if loss_weight is None else torch.as_tensor(loss_weight, dtype=torch.float32))
        self.register_buffer("x_min", None if x_min is None else torch.as_tensor(x_min, dtype=torch.float32))
        self.register_buffer("x_max", None if x_max is None else torch.as_tensor(x_max, dtype=torch.float32))
        self.to(resolve_device(device))
        params = list(self.model.parameters())  # an analytic, parameter-free backbone needs no optimizer
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if params else None
        self.updates = 0
        self._plans: dict[tuple, tuple[list[Level], list]] = {}
        self._times: dict[tuple, Tensor] = {}

    solvers = SOLVERS

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def clips_x0(self) -> bool:
        """Whether sampling clips the x0 prediction (x_min or x_max set)."""
        return self.x_min is not None or self.x_max is not None

    # ---- training ---------------------------------------------------------------------------

    def _alpha_sigma(self, t: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t and sigma_t shaped to broadcast against x0."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return self.schedule.alpha(t).to(x0.dtype).view(shape), self.schedule.sigma(t).to(x0.dtype).view(shape)

    def add_noise(self, x0: Tensor, t: Tensor | None = None, eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x_t = alpha_t x0 + sigma_t eps at training times t (drawn when None); fixed entries stay x0."""
        t = self.schedule.sample_t(x0.shape[0], device=x0.device) if t is None else t
        eps = torch.randn_like(x0) if eps is None else eps
        return self._mix(x0, eps, *self._alpha_sigma(t, x0)), t, eps

    def _mix(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        xt = alpha * x0 + sigma * eps
        return xt if self.fix_mask is None else torch.where(self.fix_mask, x0, xt)

    def loss(self, x0: Tensor, condition: Tensor | None = None) -> Tensor:
        """Weighted MSE of the eps or x0 prediction, averaged over the batch."""
        t = self.schedule.sample_t(x0.shape[0], device=x0.device)
        eps = torch.randn_like(x0)
        alpha, sigma = self._alpha_sigma(t, x0)
        encoder = self.model["condition"]
        if condition is not None and encoder is not None:
            condition = encoder(condition)  # train mode: CFG label dropout happens here
        out = self.model["diffusion"](self._mix(x0, eps, alpha, sigma), t, condition)
        err = (out - self._target(x0, eps, t)) ** 2
        if self.loss_weight is not None:
            err = err * self.loss_weight
        if self.fix_mask is not None:
            err = err * (~self.fix_mask)
        return (err * TIME_WEIGHTINGS[self.time_weighting](alpha, sigma, self.predict)).mean()

    def _target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the network learns to output: eps, x0, or the velocity v = alpha'(t) x0 + sigma'(t) eps."""
        if self.predict != "v":
            return eps if self.predict == "eps" else x0
        shape = (-1,) + (1,) * (x0.dim() - 1)
        d_alpha, d_sigma = (d.to(x0.dtype).view(shape) for d in self.schedule.velocity(t))
        return d_alpha * x0 + d_sigma * eps

    def update(self, x0: Tensor, condition: Tensor | None = None) -> dict[str, float]:
        """One optimizer step on `loss`, gradient clipping if set, then the EMA update."""
        self.model.train()
        loss = self.loss(x0, condition)
        grad_norm = self.step(loss)
        return finite_floats({"loss": loss.detach(), "grad_norm": grad_norm}, f"in the diffusion loss at update {self.updates}")

    def step(self, loss: Tensor) -> Tensor:
        """`optimize(loss)`, then the EMA update; returns the gradient norm."""
        grad_norm = self.optimize(loss)
        self.ema_update()
        return grad_norm

    def optimize(self, loss: Tensor) -> Tensor:
        """Optimizer step on any loss of the online network (e.g. BC + Q terms), without the EMA update and
        without host syncs, so that it can run inside a captured training step; returns the gradient norm."""
        return optimizer_step(self.optimizer, loss, self.model.parameters(), self.grad_clip_norm)

    def get_extra_state(self) -> dict:
        return {"updates": self.updates}

    def set_extra_state(self, state: dict) -> None:
        self.updates = state["updates"]

    @torch.no_grad()
    def ema_update(self) -> None:
        """Advance the EMA copy by one update (copy before `ema_start`, lerp every `ema_every`)."""
        self.updates += 1
        ema, online = list(self.model_ema.parameters()), list(self.model.parameters())
        if self.updates <= self.ema_start:
            torch._foreach_copy_(ema, online)
        elif self.updates % self.ema_every == 0:
            torch._foreach_lerp_(ema, online, 1.0 - self.ema_rate)

    # ---- sampling ---------------------------------------------------------------------------

    def plan(self, solver: Solver, steps: int, step_schedule: str) -> tuple[list[Level], list]:
        """Grid levels and per-step solver coefficients, cached per (solver, steps, step_schedule)."""
        key = (solver, steps, step_schedule)
        if key not in self._plans:
            levels = [level_at(self.schedule, t) for t in time_grid(self.schedule, steps, step_schedule)]
            native = None if self.clips_x0 else self.predict  # clipping needs the x0 form explicitly
            self._plans[key] = (levels, solver.plan(self.schedule, levels, native))
        return self._plans[key]

    def time_tensor(self, t: float, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """The `(n,)` network time tensor (long for discrete time, else `dtype`), cached across calls
        because sampling is latency-bound."""
        key = (t, n, dtype, self.device)
        if key not in self._times:
            if len(self._times) > 4096:
                self._times.clear()
            kind = torch.long if self.schedule.kind == "discrete" else dtype
            self._times[key] = torch.full((n,), t, dtype=kind, device=self.device)
        return self._times[key]

    def sample(self, prior: Tensor, *, solver: str | Solver = "ddim", steps: int = 10,
               step_schedule: str = "uniform", x_T: Tensor | None = None, temperature: float = 1.0,
               step_temperature: float = 1.0, use_ema: bool = True, condition_cfg: Tensor | None = None,
               w_cfg: float = 1.0,
               condition_cg: Tensor | None = None, w_cg: float = 0.0,
               generator: torch.Generator | None = None, requires_grad: bool = False) -> tuple[Tensor, dict]:
        """Draw `prior.shape[0]` samples.

        prior: `(n, *x_shape)`; where `fix_mask` is 1 its values are kept exactly (inpainting).
        solver: a name from `SOLVERS` or a configured `Solver` (e.g. `DDIM(eta=0.5)`).
        x_T: explicit initial noise at the grid's first level `log["t"][0]` (the schedule's
            `t_start`); else `sigma there * temperature * N(0, I)`.
        step_temperature: scale of every stochastic step's noise (Decision Diffuser's low temperature: 0.5).
        condition_cfg / w_cfg: the condition and the classifier-free guidance weight in
            eps = eps_uncond + w (eps_cond - eps_uncond): 0 = unconditional, 1 = conditional only
            (one pass; the default), > 1 = guided, the two passes batched into one call of 2n rows.
        condition_cg / w_cg: classifier guidance, adding w_cg * grad log p(y | x_t) to the score.
        requires_grad: keep the graph through sampling (Diffusion-QL's actor loss); use_ema=False then.

        Returns (x0, log): log["nfe"] counts backbone calls (a batched CFG call counts once, see
        log["cfg_batched"]); log["classifier_calls"] counts classifier gradients; log["t"] is the
        time grid from the first network call to the final target time.
        """
        solver = get_solver(solver)
        levels, plan = self.plan(solver, steps, step_schedule)
        prior = prior.to(self.device)
        if self.fix_mask is not None and prior.shape[1:] != self.fix_mask.shape:
            raise ValueError(f"prior has sample shape {tuple(prior.shape[1:])}, fix_mask {tuple(self.fix_mask.shape)}")
        if x_T is not None and x_T.shape != prior.shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, prior has {tuple(prior.shape)}")
        if w_cg and self.classifier is None:
            raise ValueError("w_cg > 0 needs a classifier; pass classifier= to DiffusionModel")
        n = prior.shape[0]

        def noise() -> Tensor:
            return torch.randn(prior.shape, generator=generator, device=self.device, dtype=prior.dtype)

        def step_noise() -> Tensor:
            return noise().mul_(step_temperature)

        with torch.set_grad_enabled(requires_grad):
            denoise = _Denoiser(self, self.model_ema if use_ema else self.model, n,
                                None if condition_cfg is None else condition_cfg.to(self.device), w_cfg,
                                condition_cg, w_cg)
            x = noise().mul_(levels[0].sigma * temperature) if x_T is None else x_T.to(self.device)
            mask = self.fix_mask
            if mask is not None:
                x = torch.where(mask, prior, x)
            outputs: deque = deque(maxlen=solver.history)
            for i, coef in enumerate(plan):
                x = solver.step(x, i, levels, coef, denoise, outputs, noise if step_temperature == 1.0 else step_noise)
                if mask is not None:
                    x = torch.where(mask, prior, x)
            if denoise.clip:
                x = x.clamp(self.x_min, self.x_max)
                if mask is not None:
                    x = torch.where(mask, prior, x)
        log = {"nfe": denoise.nfe, "classifier_calls": denoise.classifier_calls, "cfg_batched": denoise.cfg,
               "t": [lv.t for lv in levels], "solver": solver.name, "steps": steps}
        return x, log
