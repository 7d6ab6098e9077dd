"""Noise schedules of the unified forward process x_t = alpha_t * x_0 + sigma_t * eps.

Every schedule answers `alpha(t)`, `sigma(t)`, `log_snr(t)` (lambda = log(alpha / sigma)) and
`t_from_log_snr(lam)` for exactly the `t` the network receives:

* discrete time: integer step indices 0..T-1 (a long tensor). Index -1 is the clean data
  (alpha = 1, sigma = 0); samplers end there. The inverse of log_snr returns a fractional index.
  Samplers start at `t_start`: T - 1, except on the cosine table (see `discrete_vp_cosine`).
* continuous time: floats in [t_min, t_max] for training; samplers start at t_max and end at
  `t_clean` = 0.

VP schedules keep alpha^2 + sigma^2 = 1; VE keeps alpha = 1 and grows sigma geometrically; the
rectified flow ("flow") is the straight path alpha = 1 - t, sigma = t of flow matching.

Continuous schedules also give the velocity coefficients (alpha'(t), sigma'(t)): a network with
`predict="v"` outputs v = dx_t/dt = alpha' x_0 + sigma' eps (eps - x_0 on the flow).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEDULES = ("linear", "cosine", "ve", "flow")
TIME_KINDS = ("discrete", "continuous")


class NoiseSchedule:
    """Base class: subclasses define `log_alpha(t)` and `log_sigma(t)`; the rest follows."""

    kind: str  # "discrete" or "continuous"
    t_min: float  # smallest training / network time
    t_max: float  # largest network time
    t_clean: float  # where samplers end (sigma = 0 for VP)

    @property
    def t_start(self) -> float:
        """Where a sampling grid starts (its first network call): t_max unless the schedule says otherwise."""
        return self.t_max

    def log_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def log_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha(self, t: Tensor) -> Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t: Tensor) -> Tensor:
        return self.log_sigma(t).exp()

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha_t / sigma_t); +inf where sigma = 0."""
        return self.log_alpha(t) - self.log_sigma(t)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of `log_snr` (a fractional index for discrete schedules)."""
        raise NotImplementedError

    def sample_t(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
        """Training times: uniform over the indices (discrete) or over [t_min, t_max] (continuous)."""
        raise NotImplementedError

    def velocity(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha'(t), sigma'(t)), the coefficients of v = dx_t/dt = alpha' x_0 + sigma' eps.

        By automatic differentiation of `alpha` and `sigma`; a schedule with closed forms overrides it.
        Continuous time only: a table of discrete steps has no time derivative.
        """
        if self.kind == "discrete":
            raise ValueError("velocity prediction (predict='v') needs continuous time: v = dx_t/dt")
        t = torch.as_tensor(t, dtype=torch.float64).detach()
        # torch.func.grad, not autograd.grad: it also runs inside vmap (a seed ensemble's sampler)
        return (torch.func.grad(lambda s: self.alpha(s).sum())(t), torch.func.grad(lambda s: self.sigma(s).sum())(t))


def _log_sigma_vp(log_alpha: Tensor) -> Tensor:
    # sigma = sqrt(1 - alpha^2), computed without cancellation when alpha is close to 1.
    return 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))


def _log_alpha_vp_from_log_snr(lam: Tensor) -> Tensor:
    # alpha^2 = sigmoid(lambda) * ... = 1 / (1 + exp(-2 lambda)) for VP.
    return -0.5 * torch.nn.functional.softplus(-2.0 * lam)


class DiscreteSchedule(NoiseSchedule):
    """T-step VP schedule given by its cumulative products alpha_bar[0..T-1].

    Index -1 (prepended to the table) is the clean data: alpha = 1, sigma = 0. Training uses every
    index; sampling grids start at `t_start`, the last index with log-SNR >= `log_snr_min`
    (T - 1 when the whole table is above it, as with the default -inf).
    """

    kind = "discrete"

    def __init__(self, alphas_cumprod: Tensor, name: str, log_snr_min: float = -math.inf):
        abar = alphas_cumprod.to(torch.float64)
        if abar.ndim != 1 or not bool(((abar > 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError("alphas_cumprod must be a strictly decreasing 1-D table in (0, 1)")
        self.name = name
        self.T = len(abar)
        self.t_min, self.t_max, self.t_clean = 0, self.T - 1, -1
        log_alpha = 0.5 * torch.log(abar)
        self._log_alpha = torch.cat([torch.zeros(1, dtype=torch.float64), log_alpha])
        self._log_sigma = torch.cat([torch.full((1,), -math.inf, dtype=torch.float64), _log_sigma_vp(log_alpha)])
        self._on_device: dict[tuple, Tensor] = {}
        self.log_snr_min = log_snr_min
        above = int((log_alpha - self._log_sigma[1:] >= log_snr_min).sum())  # log-SNR decreases with the index
        self._t_start = max(above - 1, 0)

    @property
    def t_start(self) -> int:
        return self._t_start

    @property
    def alphas_cumprod(self) -> Tensor:
        return (2 * self._log_alpha[1:]).exp()

    def _lookup(self, table: str, t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        if t.is_floating_point():
            raise TypeError("a discrete schedule takes integer step indices, got a floating tensor")
        key = (table, t.device)  # one copy per device: no host-to-device copy per call (CUDA graphs)
        if key not in self._on_device:
            self._on_device[key] = getattr(self, table).to(t.device)
        return self._on_device[key][t.long() + 1]

    def log_alpha(self, t: Tensor) -> Tensor:
        return self._lookup("_log_alpha", t)

    def log_sigma(self, t: Tensor) -> Tensor:
        return self._lookup("_log_sigma", t)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Fractional index by linear interpolation of the (decreasing) log-SNR table."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        table = (self._log_alpha - self._log_sigma)[1:]  # decreasing in the index
        rev = table.flip(0)  # increasing
        j = torch.searchsorted(rev, lam.clamp(rev[0], rev[-1])).clamp(1, self.T - 1)
        lo, hi = rev[j - 1], rev[j]
        frac_rev = (j - 1) + (lam.clamp(rev[0], rev[-1]) - lo) / (hi - lo)
        return (self.T - 1) - frac_rev

    def sample_t(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
        return torch.randint(0, self.T, (n,), device=device, generator=generator)


class ContinuousSchedule(NoiseSchedule):
    """Continuous time on [t_min, t_max]; samplers end at t_clean = 0."""

    kind = "continuous"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0):
        self.t_min, self.t_max, self.t_clean = t_min, t_max, 0.0

    def sample_t(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(n, device=device, generator=generator)
        return self.t_min + (self.t_max - self.t_min) * u


class VPLinear(ContinuousSchedule):
    """Score-SDE VP with linear beta(t) = beta_min + t (beta_max - beta_min) (DDPM's linear schedule)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        super().__init__(t_min, 1.0)
        self.beta_min, self.beta_max = beta_min, beta_max
        self.name = "linear"

    def log_alpha(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def log_sigma(self, t: Tensor) -> Tensor:
        return _log_sigma_vp(self.log_alpha(t))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        # Solve (b1 - b0)/4 t^2 + b0/2 t = L/2 with L = log(1 + exp(-2 lambda)) = -2 log alpha.
        L = torch.nn.functional.softplus(-2.0 * torch.as_tensor(lam, dtype=torch.float64))
        b0, b1 = self.beta_min, self.beta_max
        return 2.0 * L / (b0 + torch.sqrt(b0**2 + 2.0 * (b1 - b0) * L))


class VPCosine(ContinuousSchedule):
    """Nichol & Dhariwal's cosine schedule, alpha(t) = cos(theta(t)) / cos(theta(0)).

    theta(t) = pi/2 (t * stretch + s) / (1 + s). With stretch = 0.9946 (DPM-Solver's truncation)
    alpha(1) is about 0.008 instead of 0, so x0 = (x - sigma eps) / alpha stays finite at t = 1.
    """

    def __init__(self, s: float = 0.008, stretch: float = 0.9946, t_min: float = 1e-3):
        super().__init__(t_min, 1.0)
        self.s, self.stretch = s, stretch
        self.name = "cosine"
        self._log_cos0 = math.log(math.cos(0.5 * math.pi * s / (1 + s)))

    def _theta(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * (torch.as_tensor(t) * self.stretch + self.s) / (1 + self.s)

    def log_alpha(self, t: Tensor) -> Tensor:
        # clamp: at t = 0 rounding could give log alpha = +1e-17 and a NaN sigma
        return (torch.log(torch.cos(self._theta(t))) - self._log_cos0).clamp(max=0.0)

    def log_sigma(self, t: Tensor) -> Tensor:
        return _log_sigma_vp(self.log_alpha(t))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        log_alpha = _log_alpha_vp_from_log_snr(torch.as_tensor(lam, dtype=torch.float64))
        theta = torch.acos((log_alpha + self._log_cos0).exp())
        return (theta * 2 * (1 + self.s) / math.pi - self.s) / self.stretch


class VE(ContinuousSchedule):
    """Score-SDE VE: alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t.

    Clean only up to sigma_min: samplers end at t = 0 where sigma = sigma_min.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, t_min: float = 1e-3):
        super().__init__(t_min, 1.0)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.name = "ve"
        self._log_ratio = math.log(sigma_max / sigma_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(torch.as_tensor(t, dtype=torch.get_default_dtype()))

    def log_sigma(self, t: Tensor) -> Tensor:
        return math.log(self.sigma_min) + torch.as_tensor(t) * self._log_ratio

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return (-torch.as_tensor(lam, dtype=torch.float64) - math.log(self.sigma_min)) / self._log_ratio

    def velocity(self, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigma(torch.as_tensor(t, dtype=torch.float64))
        return torch.zeros_like(sigma), sigma * self._log_ratio


class Flow(ContinuousSchedule):
    """Rectified flow (flow matching): x_t = (1 - t) x_0 + t eps, velocity v = eps - x_0.

    alpha(1) = 0, so log-SNR is -inf at t = 1 and x_0 = (x - sigma eps) / alpha is undefined there:
    training covers [t_min, 1], but sampling grids start at `t_start` = 0.99 (alpha = 0.01, log-SNR
    -4.6), as the cosine schedule stops at alpha = 0.008 (log-SNR -4.8) for the same reason.
    """

    def __init__(self, t_min: float = 1e-3, t_start: float = 0.99):
        super().__init__(t_min, 1.0)
        if not t_min < t_start < 1.0:
            raise ValueError(f"the flow schedule needs t_min < t_start < 1, got t_min={t_min}, t_start={t_start}")
        self.name = "flow"
        self._t_start = t_start

    @property
    def t_start(self) -> float:
        return self._t_start

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.log1p(-torch.as_tensor(t))

    def log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(torch.as_tensor(t))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(-torch.as_tensor(lam, dtype=torch.float64))  # (1 - t) / t = e^lambda

    def velocity(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.full_like(t, -1.0), torch.ones_like(t)


def discrete_vp_linear(T: int, beta_min: float = 0.1, beta_max: float = 20.0) -> DiscreteSchedule:
    """The VP-SDE with linear beta discretised to T steps (DDPM's 1e-4..0.02 at T = 1000; DQL/IDQL's 'vp').

    beta_i = 1 - exp(-beta_min / T - (beta_max - beta_min) (2i - 1) / (2 T^2)), i = 1..T.
    """
    i = torch.arange(1, T + 1, dtype=torch.float64)
    log_one_minus_beta = -beta_min / T - 0.5 * (beta_max - beta_min) * (2 * i - 1) / T**2
    return DiscreteSchedule(torch.cumsum(log_one_minus_beta, 0).exp(), "linear")


def discrete_vp_cosine(T: int, s: float = 0.008, max_beta: float = 0.999, t_end: float = 0.9946) -> DiscreteSchedule:
    """Nichol & Dhariwal's cosine schedule on T steps, betas clipped at 0.999 (as Diffuser).

    alpha_bar(u) = f(u) / f(0), f(u) = cos^2(pi/2 (u + s) / (1 + s)), at u = (i + 1) / T. f(1) = 0, so
    the last beta is clipped and index T - 1 sits at alpha of about 0.05 / T (log-SNR -9.9 at
    T = 1000, -6.0 at T = 20), 3.5 in log-SNR beyond index T - 2: every step out of it is at least
    that long, whatever the step count, and the eps-form SDE solvers and the classic samplers, whose
    step error grows like e^h, blow up there. Sampling therefore starts at the last index whose
    log-SNR is at least that of the cosine at u = `t_end` (DPM-Solver's truncation of the cosine
    schedule, which `VPCosine` also uses: log-SNR -4.78): index 993 at T = 1000, 18 at T = 20.
    Training still uses every index.
    """
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    abar_end = math.cos(0.5 * math.pi * (t_end + s) / (1 + s)) ** 2 / f[0].item()
    log_snr_min = 0.5 * math.log(abar_end / (1 - abar_end))
    return DiscreteSchedule(torch.cumprod(1 - betas, 0), "cosine", log_snr_min)


def make_schedule(time: str = "discrete", schedule: str = "cosine", diffusion_steps: int = 1000, **kwargs) -> NoiseSchedule:
    """Build a schedule by name; kwargs go to the schedule (e.g. beta_max for 'linear')."""
    if time not in TIME_KINDS:
        raise ValueError(f"unknown time kind {time!r}; valid: {', '.join(TIME_KINDS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if time == "discrete":
        if schedule in ("ve", "flow"):
            raise ValueError(f"the {schedule!r} schedule is continuous-time only; use time='continuous'")
        if diffusion_steps < 1:
            raise ValueError(f"diffusion_steps must be >= 1, got {diffusion_steps}")
        build = discrete_vp_linear if schedule == "linear" else discrete_vp_cosine
        return build(diffusion_steps, **kwargs)
    return {"linear": VPLinear, "cosine": VPCosine, "ve": VE, "flow": Flow}[schedule](**kwargs)
