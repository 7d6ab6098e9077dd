"""Samplers of the cross-solver formulation: one shared loop, each solver a small step rule.

Notation (Lu et al., DPM-Solver / DPM-Solver++): a step goes from level s to the less noisy level t,
lambda = log(alpha / sigma), h = lambda_t - lambda_s > 0, rho = sigma / alpha. The last step of every
grid reaches the clean level, where sigma_t = 0 and h = +inf; coefficients are written with
e^{-h} = alpha_s sigma_t / (sigma_s alpha_t) and sigma_t e^{h} = alpha_t rho_s, so that step is finite.

Most solvers are linear in the state and in the model outputs:

    x_t = a * x_s + sum_k b_k * D_k + c * z,    D_0 the current output (eps or x0), D_1 the previous...

Their coefficients depend only on the grid, so `plan()` computes them once per (solver, steps,
step schedule, noise schedule) and `step()` is a handful of tensor ops. Heun, the predictor-corrector
sampler and PNDM's Runge-Kutta warm start also call the network inside a step; they override `step()`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import torch
from torch import Tensor

from cleandiff_rl.diffusion.schedules import NoiseSchedule

STEP_SCHEDULES = ("uniform", "quad", "logsnr")


@dataclass(frozen=True)
class Level:
    """One noise level: the network time `t`, alpha, sigma and lambda there, and (continuous time
    only) the velocity coefficients alpha'(t), sigma'(t); python floats."""

    t: float
    alpha: float
    sigma: float
    log_snr: float
    d_alpha: float = math.nan
    d_sigma: float = math.nan

    @property
    def rho(self) -> float:
        return self.sigma / self.alpha

    def conversion(self, src: str, dst: str) -> tuple[float, float]:
        """(c_x, c_out) such that the `dst` form ("eps" or "x0") is c_x * x + c_out * out, for a network
        output `out` in the `src` form: x0 = (x - sigma eps) / alpha, eps = (x - alpha x0) / sigma, and
        for v = alpha' x0 + sigma' eps: x0 = (sigma' x - sigma v) / d, eps = (alpha v - alpha' x) / d,
        d = alpha sigma' - sigma alpha' (1 on the flow schedule)."""
        if src == dst:
            return 0.0, 1.0
        if src == "v":
            d = self.alpha * self.d_sigma - self.sigma * self.d_alpha
            return (self.d_sigma / d, -self.sigma / d) if dst == "x0" else (-self.d_alpha / d, self.alpha / d)
        if dst == "x0":
            return 1.0 / self.alpha, -self.sigma / self.alpha
        return 1.0 / self.sigma, -self.alpha / self.sigma


def level_at(schedule: NoiseSchedule, t: float) -> Level:
    tt = torch.tensor(t, dtype=torch.long if schedule.kind == "discrete" else torch.float64)
    la, ls = schedule.log_alpha(tt).double(), schedule.log_sigma(tt).double()
    if schedule.kind == "discrete":
        return Level(t, math.exp(la), math.exp(ls), float(la - ls))
    d_alpha, d_sigma = schedule.velocity(tt)
    return Level(t, math.exp(la), math.exp(ls), float(la - ls), float(d_alpha), float(d_sigma))


def time_grid(schedule: NoiseSchedule, steps: int, step_schedule: str = "uniform") -> list[float]:
    """`steps + 1` times from the schedule's `t_start` (first network call) to t_clean (the target).

    uniform: equal steps in t ("trailing" spacing); quad: t - t_clean grows quadratically, so
    steps are finer near the data (DDIM's quadratic); logsnr: equal steps in lambda from
    lambda(t_start) to lambda(t_min), then the last point moves to t_clean.

    A discrete grid starts at the schedule's `t_start` (below the near-pure-noise tail of the
    discrete cosine table, see `discrete_vp_cosine`), or higher when more steps are asked for than
    indices remain below it: each step needs its own index, and up to T steps stay possible.
    """
    if step_schedule not in STEP_SCHEDULES:
        raise ValueError(f"unknown step_schedule {step_schedule!r}; valid: {', '.join(STEP_SCHEDULES)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    discrete = schedule.kind == "discrete"
    if discrete and steps > schedule.T:
        raise ValueError(f"a discrete schedule with T={schedule.T} supports at most {schedule.T} steps, got {steps}")
    start = max(schedule.t_start, steps - 1) if discrete else schedule.t_start
    hi, lo = float(start), float(schedule.t_clean)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if step_schedule == "uniform":
        t = hi + (lo - hi) * u
    elif step_schedule == "quad":
        t = lo + (hi - lo) * (1 - u) ** 2
    else:
        lam_hi, lam_lo = level_at(schedule, start).log_snr, level_at(schedule, schedule.t_min).log_snr
        t = schedule.t_from_log_snr(lam_hi + (lam_lo - lam_hi) * u)
        t[0], t[-1] = hi, lo
    if not discrete:
        return t.tolist()
    return _distinct_indices(t, start)


def _distinct_indices(t: Tensor, start: int) -> list[int]:
    """Round to step indices from `start` down to -1, nudged so that no index repeats."""
    idx = t.round().long().tolist()
    idx[0], idx[-1] = start, -1
    for i in range(1, len(idx) - 1):  # strictly decreasing from the top...
        idx[i] = min(idx[i], idx[i - 1] - 1)
    for i in range(len(idx) - 2, 0, -1):  # ...and room left below for the rest
        idx[i] = max(idx[i], idx[i + 1] + 1)
    return idx


class Denoiser(Protocol):
    """The network with guidance applied, returning `param` ("eps" or "x0") at `level`."""

    def __call__(self, x: Tensor, level: Level, param: str) -> Tensor: ...


@dataclass(frozen=True)
class LinearStep:
    """x_next = a * x + sum_k b[k] * D[k] + noise * z, D[0] the newest model output.

    `param` is the output D is taken in; None means the solver's own `param`.
    """

    a: float
    b: tuple[float, ...]
    noise: float = 0.0
    param: str | None = None

    def fold_into(self, level: Level, param: str, native: str) -> "LinearStep":
        """The same single-output step, combining `param`, on the network's native output (eps, x0 or
        v) instead: the conversion is linear in (x, native output) and folds in, see `Level.conversion`."""
        (b0,) = self.b
        c_x, c_out = level.conversion(native, param)
        return LinearStep(self.a + b0 * c_x, (b0 * c_out,), self.noise, native)


def _expm1_neg(h: float) -> float:
    """1 - e^{-h}, exact for small h and equal to 1 at h = inf."""
    return -math.expm1(-h)


@dataclass(frozen=True)
class Solver:
    """A step rule. Subclasses set `name`, `param` (the model output they combine) and `coefficients`."""

    name: ClassVar[str]
    param: ClassVar[str]  # "eps" or "x0"
    stochastic: ClassVar[bool] = False
    history: ClassVar[int] = 1  # how many past model outputs a step reads
    cross_solver: ClassVar[bool] = False  # one of the ten of the cross-solver formulation (CROSS_SOLVERS)

    def plan(self, schedule: NoiseSchedule, levels: list[Level], native: str | None = None) -> list:
        """Per-step coefficients for this grid; computed once and cached by the model.

        With `native` (the network's prediction, when the model needs no x0 clipping), a
        single-output linear rule takes that output directly: two tensor ops fewer per step.
        """
        coefs = [self.coefficients(schedule, levels, i) for i in range(len(levels) - 1)]
        if native in (None, self.param) or self.history > 1 or type(self).step is not Solver.step:
            return coefs
        return [c.fold_into(level, self.param, native) for c, level in zip(coefs, levels)]

    def coefficients(self, schedule: NoiseSchedule, levels: list[Level], i: int) -> LinearStep:
        raise NotImplementedError

    def step(self, x: Tensor, i: int, levels: list[Level], coef: LinearStep, denoise: Denoiser,
             outputs: deque, noise: Callable[[], Tensor]) -> Tensor:
        """One linear step; `outputs` holds past model outputs, newest first."""
        outputs.appendleft(denoise(x, levels[i], coef.param or self.param))
        x = x * coef.a
        for b, d in zip(coef.b, outputs):
            x = torch.add(x, d, alpha=b)  # not in place: under vmap (seed ensembles) x may be unbatched, d batched
        if coef.noise:
            x = x.add_(noise(), alpha=coef.noise)
        return x


def _neighbours(levels: list[Level], i: int) -> tuple[Level, Level, float, float | None]:
    """s, t, h and the previous h (None on the first step or when t is clean, where 2M drops to order 1)."""
    s, t = levels[i], levels[i + 1]
    h = t.log_snr - s.log_snr
    h_prev = s.log_snr - levels[i - 1].log_snr if i > 0 and math.isfinite(h) else None
    return s, t, h, h_prev


# ---- DDPM / DDIM (Ho et al. 2020; Song et al. 2021) -------------------------------------------


@dataclass(frozen=True)
class DDIM(Solver):
    """x_t = alpha_t x0 + sqrt(sigma_t^2 - c^2) eps + c z, with c = eta sigma_t sqrt(1 - e^{-2h}).

    eta = 0 is deterministic DDIM; eta = 1 is DDPM's ancestral step with the posterior variance.
    """

    name: ClassVar[str] = "ddim"
    param: ClassVar[str] = "x0"
    cross_solver: ClassVar[bool] = True
    eta: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"DDIM eta must lie in [0, 1], got {self.eta}")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    def coefficients(self, schedule, levels, i):
        s, t, h, _ = _neighbours(levels, i)
        c = self.eta * t.sigma * math.sqrt(_expm1_neg(2 * h))
        a = math.sqrt(max(t.sigma**2 - c**2, 0.0)) / s.sigma  # eps = (x - alpha_s x0) / sigma_s
        return LinearStep(a, (t.alpha - a * s.alpha,), c)


@dataclass(frozen=True)
class DDPM(DDIM):
    """Ancestral sampling with the posterior variance (DDIM with eta = 1)."""

    name: ClassVar[str] = "ddpm"
    eta: float = 1.0


# ---- DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), ODE and SDE --------------
# Each 2M solver is its first-order rule with the current output D_0 replaced by the multistep
# extrapolation D_0 + (D_0 - D_prev) h / (2 h_prev) (Lu et al. 2022b; the "midpoint" form of the
# SDE variants). On the first step, and on the step into the clean level (h = inf), it stays first order.


def _multistep(first_order: LinearStep, levels: list[Level], i: int) -> LinearStep:
    _, _, h, h_prev = _neighbours(levels, i)
    if h_prev is None:
        return first_order
    k, b0 = h / (2 * h_prev), first_order.b[0]
    return LinearStep(first_order.a, (b0 * (1 + k), -b0 * k), first_order.noise)


class _Multistep2M:
    """Mixin making a first-order DPM-Solver rule (the next base in the MRO) its 2M multistep version."""

    history: ClassVar[int] = 2

    def coefficients(self, schedule, levels, i):
        return _multistep(super().coefficients(schedule, levels, i), levels, i)  # type: ignore[misc]


@dataclass(frozen=True)
class ODEDPMSolver1(Solver):
    """x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s   (DPM-Solver-1)."""

    name: ClassVar[str] = "ode_dpmsolver_1"
    cross_solver: ClassVar[bool] = True
    param: ClassVar[str] = "eps"

    def coefficients(self, schedule, levels, i):
        s, t, h, _ = _neighbours(levels, i)
        phi = t.alpha * s.rho * _expm1_neg(h)  # sigma_t (e^h - 1), finite at sigma_t = 0
        return LinearStep(t.alpha / s.alpha, (-phi,))


@dataclass(frozen=True)
class ODEDPMSolver2M(_Multistep2M, ODEDPMSolver1):
    name: ClassVar[str] = "ode_dpmsolver_2M"


@dataclass(frozen=True)
class SDEDPMSolver1(Solver):
    """x_t = (alpha_t / alpha_s) x_s - 2 sigma_t (e^h - 1) eps_s + sigma_t sqrt(e^{2h} - 1) z."""

    name: ClassVar[str] = "sde_dpmsolver_1"
    cross_solver: ClassVar[bool] = True
    param: ClassVar[str] = "eps"
    stochastic: ClassVar[bool] = True

    def coefficients(self, schedule, levels, i):
        s, t, h, _ = _neighbours(levels, i)
        phi = t.alpha * s.rho * _expm1_neg(h)
        return LinearStep(t.alpha / s.alpha, (-2 * phi,), t.alpha * s.rho * math.sqrt(_expm1_neg(2 * h)))


@dataclass(frozen=True)
class SDEDPMSolver2M(_Multistep2M, SDEDPMSolver1):
    name: ClassVar[str] = "sde_dpmsolver_2M"


@dataclass(frozen=True)
class ODEDPMSolverPP1(Solver):
    """x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) x0_s   (DPM-Solver++1 = DDIM)."""

    name: ClassVar[str] = "ode_dpmsolver++_1"
    cross_solver: ClassVar[bool] = True
    param: ClassVar[str] = "x0"

    def coefficients(self, schedule, levels, i):
        s, t, h, _ = _neighbours(levels, i)
        return LinearStep(t.sigma / s.sigma, (t.alpha * _expm1_neg(h),))


@dataclass(frozen=True)
class ODEDPMSolverPP2M(_Multistep2M, ODEDPMSolverPP1):
    name: ClassVar[str] = "ode_dpmsolver++_2M"


@dataclass(frozen=True)
class SDEDPMSolverPP1(Solver):
    """x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) x0_s + sigma_t sqrt(1 - e^{-2h}) z."""

    name: ClassVar[str] = "sde_dpmsolver++_1"
    cross_solver: ClassVar[bool] = True
    param: ClassVar[str] = "x0"
    stochastic: ClassVar[bool] = True

    def coefficients(self, schedule, levels, i):
        s, t, h, _ = _neighbours(levels, i)
        e2 = _expm1_neg(2 * h)
        return LinearStep(t.sigma / s.sigma * math.exp(-h), (t.alpha * e2,), t.sigma * math.sqrt(e2))


@dataclass(frozen=True)
class SDEDPMSolverPP2M(_Multistep2M, SDEDPMSolverPP1):
    name: ClassVar[str] = "sde_dpmsolver++_2M"


# ---- Classic samplers (Song et al. 2021; Karras et al. 2022; Liu et al. 2022) ------------------
# They work on x/alpha with noise level rho = sigma/alpha, where the forward process is
# x/alpha = x0 + rho eps (variance exploding) for every schedule, so no schedule derivative is needed.


@dataclass(frozen=True)
class EulerMaruyama(Solver):
    """Euler-Maruyama on the reverse SDE in time rho^2:
    x_t/alpha_t = x_s/alpha_s - (rho_s^2 - rho_t^2)/rho_s eps_s + sqrt(rho_s^2 - rho_t^2) z.
    The step into the clean level adds no noise (score-SDE's final denoising)."""

    name: ClassVar[str] = "euler_maruyama"
    param: ClassVar[str] = "eps"
    stochastic: ClassVar[bool] = True

    def coefficients(self, schedule, levels, i):
        s, t = levels[i], levels[i + 1]
        d = s.rho**2 - t.rho**2
        noise = t.alpha * math.sqrt(d) if t.sigma > 0 else 0.0
        return LinearStep(t.alpha / s.alpha, (-t.alpha * d / s.rho,), noise)


@dataclass(frozen=True)
class Heun(Solver):
    """Heun's method on the probability-flow ODE d(x/alpha)/d rho = eps (EDM, Karras et al. 2022).
    Two network calls per step; the step into the clean level is a plain Euler (= DDIM) step."""

    name: ClassVar[str] = "heun"
    param: ClassVar[str] = "eps"

    def coefficients(self, schedule, levels, i):
        s, t = levels[i], levels[i + 1]
        return LinearStep(t.alpha / s.alpha, (t.alpha * (t.rho - s.rho),))

    def step(self, x, i, levels, coef, denoise, outputs, noise):
        eps = denoise(x, levels[i], "eps")
        x_euler = torch.add(x * coef.a, eps, alpha=coef.b[0])
        if levels[i + 1].sigma == 0:
            return x_euler
        eps_next = denoise(x_euler, levels[i + 1], "eps")
        return (x * coef.a).add_(eps.add(eps_next), alpha=0.5 * coef.b[0])


@dataclass(frozen=True)
class PredictorCorrector(EulerMaruyama):
    """Score-SDE's PC sampler: an Euler-Maruyama predictor, then Langevin corrector steps at the new
    level, x <- x + delta score + sqrt(2 delta) z, with delta = 2 (snr |z| / |score|)^2 and the norms
    taken over the whole batch, as Song et al.'s code averages them (per-sample norms blow up in
    low dimension)."""

    name: ClassVar[str] = "pc"
    snr: float = 0.16
    corrector_steps: int = 1

    def step(self, x, i, levels, coef, denoise, outputs, noise):
        x = super().step(x, i, levels, coef, denoise, outputs, noise)
        t = levels[i + 1]
        if t.sigma == 0:
            return x
        for _ in range(self.corrector_steps):
            eps, z = denoise(x, t, "eps"), noise()
            # |score| = |eps| / sigma_t, so with c = sqrt(2 delta) = 2 snr sigma_t |z| / |eps|:
            # x + delta score + sqrt(2 delta) z = x - c^2 / (2 sigma_t) eps + c z
            c = torch.linalg.vector_norm(z).div_(torch.linalg.vector_norm(eps)).mul_(2 * self.snr * t.sigma)
            x = torch.addcmul(x, eps, c.square(), value=-0.5 / t.sigma).addcmul_(z, c)
        return x


_ADAMS_BASHFORTH = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@dataclass(frozen=True)
class PNDMStep:
    transfer: tuple[float, float]  # the DDIM transfer s -> t: x_t = a x_s + b eps
    weights: tuple[float, ...]  # linear multistep weights of past eps (newest first)
    mid: Level | None = None  # set on Runge-Kutta warm-start steps
    to_mid: tuple[float, float] | None = None


@dataclass(frozen=True)
class PNDM(Solver):
    """Pseudo numerical methods (Liu et al. 2022): a pseudo Runge-Kutta warm start on the first
    three steps (4 calls each), then 4th-order linear multistep (PLMS) over the DDIM transfer
    x_t = (alpha_t/alpha_s) x_s - alpha_t (rho_s - rho_t) eps. A step into the clean level, where the
    network cannot be called, uses the highest Adams-Bashforth order the history allows."""

    name: ClassVar[str] = "pndm"
    param: ClassVar[str] = "eps"
    history: ClassVar[int] = 4

    @staticmethod
    def _transfer(s: Level, t: Level) -> tuple[float, float]:
        return t.alpha / s.alpha, -t.alpha * (s.rho - t.rho)

    def coefficients(self, schedule, levels, i):
        s, t = levels[i], levels[i + 1]
        if i < 3 and t.sigma > 0:
            mid_t = (s.t + t.t) // 2 if schedule.kind == "discrete" else 0.5 * (s.t + t.t)
            mid = level_at(schedule, mid_t)
            return PNDMStep(self._transfer(s, t), (), mid, self._transfer(s, mid))
        return PNDMStep(self._transfer(s, t), _ADAMS_BASHFORTH[min(i, 3)])

    def step(self, x, i, levels, coef, denoise, outputs, noise):
        outputs.appendleft(denoise(x, levels[i], "eps"))
        if coef.mid is None:
            eps = sum(w * e for w, e in zip(coef.weights, outputs))
        else:  # eps' = (e1 + 2 e2 + 2 e3 + e4) / 6 with the transfer as the "Euler" map
            e1 = outputs[0]
            (am, bm), (a, b) = coef.to_mid, coef.transfer
            e2 = denoise(torch.add(x * am, e1, alpha=bm), coef.mid, "eps")
            e3 = denoise(torch.add(x * am, e2, alpha=bm), coef.mid, "eps")
            e4 = denoise(torch.add(x * a, e3, alpha=b), levels[i + 1], "eps")
            eps = (e1 + e4).add_(e2 + e3, alpha=2.0).div_(6.0)
        a, b = coef.transfer
        return torch.add(x * a, eps, alpha=b)


SOLVER_CLASSES: dict[str, type[Solver]] = {
    cls.name: cls
    for cls in (DDPM, DDIM, ODEDPMSolver1, ODEDPMSolver2M, SDEDPMSolver1, SDEDPMSolver2M,
                ODEDPMSolverPP1, ODEDPMSolverPP2M, SDEDPMSolverPP1, SDEDPMSolverPP2M,
                EulerMaruyama, Heun, PredictorCorrector, PNDM)
}
SOLVERS: tuple[str, ...] = tuple(SOLVER_CLASSES)
"""Valid solver names: the ten of the cross-solver formulation, then the classic ones."""
CROSS_SOLVERS: tuple[str, ...] = tuple(name for name, cls in SOLVER_CLASSES.items() if cls.cross_solver)
"""The ten of the cross-solver formulation: DDPM, DDIM and the eight DPM-Solver(++) variants."""


def get_solver(solver: str | Solver) -> Solver:
    """A solver instance from its name (default options) or the instance itself (custom options)."""
    if isinstance(solver, Solver):
        return solver
    try:
        return SOLVER_CLASSES[solver]()
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}") from None
