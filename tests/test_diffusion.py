"""The diffusion core against closed forms: schedules, grids, every solver, guidance, training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cleandiff_rl.diffusion import (
    CROSS_SOLVERS,
    DDIM,
    SOLVERS,
    DiffusionModel,
    PredictorCorrector,
    VPCosine,
    discrete_vp_cosine,
    discrete_vp_linear,
    get_solver,
    make_schedule,
    time_grid,
)
from cleandiff_rl.diffusion.analytic import exact_model, fit_order, ode_endpoint, ode_error

M, S = 0.5, 0.3
ODE_SOLVERS = [n for n in SOLVERS if not get_solver(n).stochastic]
SDE_SOLVERS = [n for n in SOLVERS if get_solver(n).stochastic]
FIRST_ORDER = ["ddim", "ode_dpmsolver_1", "ode_dpmsolver++_1"]
HIGHER_ORDER = ["ode_dpmsolver_2M", "ode_dpmsolver++_2M", "heun", "pndm"]
# Grids on which the first network level approaches the data as steps grow (docs/solvers.md, "Accuracy checks"),
# and the step counts to fit the order over. A discrete grid cannot refine below one index per step,
# so its error stops converging: on the discrete cosine (from index 993) PNDM's error falls to a
# floor of about 2e-5 by 100 steps, crossing zero at 128 (1.5e-7), so the fit stops at 96 there.
ORDER_SETTINGS = [("discrete", "cosine", "logsnr", (16, 32, 64, 96)), ("continuous", "ve", "logsnr", (16, 32, 64, 128)),
                  ("continuous", "flow", "logsnr", (16, 32, 64, 128))]
# Every prediction each time kind supports (velocity needs continuous time).
PREDICTS = {"discrete": ("eps", "x0"), "continuous": ("eps", "x0", "v")}


# ---- schedules ----------------------------------------------------------------------------------


def test_discrete_vp_matches_dql_numbers():
    # reference_hyperparameters.md section 8: VP, T = 5, beta_min 0.1, beta_max 10.
    abar = discrete_vp_linear(5, 0.1, 10.0).alphas_cumprod
    assert torch.allclose(abar, torch.tensor([0.8041, 0.4352, 0.1585, 0.0389, 0.0064], dtype=abar.dtype), atol=1e-4)


def test_discrete_cosine_matches_diffuser_numbers():
    abar = discrete_vp_cosine(20).alphas_cumprod
    assert 1 - abar[0] == pytest.approx(0.0080, abs=1e-4)
    assert abar[-1] == pytest.approx(6.1e-6, rel=0.02)


@pytest.mark.parametrize("time,name", [("discrete", "linear"), ("discrete", "cosine"), ("continuous", "linear"),
                                       ("continuous", "cosine"), ("continuous", "ve"), ("continuous", "flow")])
def test_schedule_identities_and_log_snr_inverse(time, name):
    sched = make_schedule(time, name, diffusion_steps=100)
    t_max = 0.99 if name == "flow" else 1.0  # the flow's alpha is 0 at t = 1
    t = torch.arange(0, 100, 7) if time == "discrete" else torch.linspace(1e-3, t_max, 15, dtype=torch.float64)
    alpha, sigma, lam = sched.alpha(t), sched.sigma(t), sched.log_snr(t)
    assert torch.allclose(lam, torch.log(alpha / sigma))
    if name == "ve":
        assert torch.all(alpha == 1)
    elif name == "flow":
        assert torch.allclose(alpha, 1 - t) and torch.allclose(sigma, t)
    else:
        assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(alpha))
    assert torch.allclose(sched.t_from_log_snr(lam).double(), t.double(), atol=1e-6)
    clean = torch.tensor(sched.t_clean, dtype=torch.long if time == "discrete" else torch.float64)
    if name != "ve":
        assert sched.sigma(clean) == 0 and sched.log_snr(clean) == math.inf


@pytest.mark.parametrize("name", ["linear", "cosine", "ve", "flow"])
def test_velocity_coefficients_are_the_time_derivatives(name):
    sched = make_schedule("continuous", name)
    t, h = torch.linspace(0.05, 0.95, 10, dtype=torch.float64), 1e-6
    d_alpha, d_sigma = sched.velocity(t)
    for derivative, f in ((d_alpha, sched.alpha), (d_sigma, sched.sigma)):
        assert torch.allclose(derivative, ((f(t + h) - f(t - h)) / (2 * h)).double(), rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="needs continuous time"):
        make_schedule("discrete", "linear", 10).velocity(torch.tensor([3]))


def test_flow_matching_regresses_eps_minus_x0_and_grids_start_below_t_1():
    model = DiffusionModel(nn.Identity(), time="continuous", schedule="flow", predict="v", device="cpu")
    x0, eps, t = torch.randn(8, 2), torch.randn(8, 2), torch.rand(8)
    assert torch.allclose(model._target(x0, eps, t), eps - x0)
    assert time_grid(model.schedule, 4) == pytest.approx([0.99, 0.7425, 0.495, 0.2475, 0.0])
    with pytest.raises(ValueError, match="needs time='continuous'"):
        DiffusionModel(nn.Identity(), time="discrete", predict="v", device="cpu")


def test_ddim_on_the_flow_schedule_is_an_euler_step_on_the_velocity(float64):
    torch.manual_seed(0)
    net = ConditionalMLP(2, 0)
    model = DiffusionModel(net, time="continuous", schedule="flow", predict="v", device="cpu")
    x_T = torch.randn(16, 2)
    x, log = model.sample(torch.zeros(16, 2), solver="ddim", steps=5, x_T=x_T, use_ema=False)
    euler = x_T
    with torch.no_grad():
        for s, t in zip(log["t"], log["t"][1:]):  # x_t = x_s + (t - s) v(x_s, s)
            euler = euler + (t - s) * net(euler, torch.full((16,), s))
    assert torch.allclose(x, euler, atol=1e-12)


def test_discrete_schedule_rejects_float_times():
    with pytest.raises(TypeError, match="integer step indices"):
        make_schedule("discrete", "cosine", 10).alpha(torch.tensor([0.5]))


def test_bad_schedule_names():
    with pytest.raises(ValueError, match="valid: linear, cosine, ve, flow"):
        make_schedule("continuous", "sigmoid")
    with pytest.raises(ValueError, match="continuous-time only"):
        make_schedule("discrete", "ve")


# ---- time grids ---------------------------------------------------------------------------------


def test_uniform_discrete_grid_is_trailing():
    sched = make_schedule("discrete", "linear", 1000)
    assert time_grid(sched, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99, -1]


@pytest.mark.parametrize("step_schedule", ["uniform", "quad", "logsnr"])
def test_discrete_grids_have_distinct_indices_for_every_step_count(step_schedule):
    sched = make_schedule("discrete", "cosine", 20)
    assert sched.t_start == 18  # below the clipped last index, see the next test
    for steps in range(1, 21):
        grid = time_grid(sched, steps, step_schedule)
        assert len(grid) == steps + 1 and grid[0] == (18 if steps < 20 else 19) and grid[-1] == -1
        assert all(a > b for a, b in zip(grid, grid[1:]))
    with pytest.raises(ValueError, match="at most 20 steps"):
        time_grid(sched, 21, step_schedule)


def test_discrete_cosine_grids_start_where_the_continuous_cosine_does():
    # The clipped last beta (0.999) puts index T - 1 at alpha 5e-5, log-SNR -9.9 at T = 1000: grids
    # start at the last index at or above the continuous cosine's t = 1 (DPM-Solver's t_T = 0.9946).
    sched = make_schedule("discrete", "cosine", 1000)
    lam = sched.log_snr(torch.arange(990, 1000))
    lam_min = VPCosine().log_snr(torch.tensor(1.0, dtype=torch.float64)).item()
    assert sched.t_start == 993 and lam[3] >= lam_min > lam[4] and lam[-1] < -9.5
    assert time_grid(sched, 10) == [993, 894, 794, 695, 595, 496, 397, 297, 198, 98, -1]
    assert time_grid(sched, 1000)[0] == 999  # every index still reachable: up to T steps
    for name, T in (("linear", 1000), ("linear", 5), ("cosine", 5)):  # tables that start above lam_min
        assert make_schedule("discrete", name, T).t_start == T - 1


def test_continuous_grids_end_at_clean_time():
    sched = make_schedule("continuous", "cosine")
    for step_schedule in ("uniform", "quad", "logsnr"):
        grid = time_grid(sched, 7, step_schedule)
        assert grid[0] == 1.0 and grid[-1] == 0.0 and all(a > b for a, b in zip(grid, grid[1:]))
    with pytest.raises(ValueError, match="valid: uniform, quad, logsnr"):
        time_grid(sched, 5, "karras")


# ---- solvers on the analytic Gaussian score -----------------------------------------------------


def test_unknown_solver_lists_valid_names():
    model = exact_model("continuous", "linear", "eps")
    with pytest.raises(ValueError) as err:
        model.sample(torch.zeros(2, 2), solver="euler_ancestral")
    assert all(name in str(err.value) for name in SOLVERS)


def test_solver_names_cover_the_cross_solver_ten_and_do_what_they_say():
    """Each of the ten names maps to the rule it names: sde_* and ddpm draw noise (ode_* and ddim map x_T to
    one sample), ++ and DDIM/DDPM combine x0 predictions (DPM-Solver eps), and 2M reads two model outputs."""
    ten = ["ddpm", "ddim", "ode_dpmsolver_1", "ode_dpmsolver_2M", "sde_dpmsolver_1", "sde_dpmsolver_2M",
           "ode_dpmsolver++_1", "ode_dpmsolver++_2M", "sde_dpmsolver++_1", "sde_dpmsolver++_2M"]
    assert list(CROSS_SOLVERS) == ten and SOLVERS[:10] == CROSS_SOLVERS
    model = exact_model("continuous", "linear", "eps")
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    for name in ten:
        a, b = (model.sample(torch.zeros(16, 2), solver=name, steps=4, x_T=x_T,
                             generator=torch.Generator().manual_seed(seed))[0] for seed in (1, 2))
        assert torch.equal(a, b) == (name.startswith("ode_") or name == "ddim"), name
        solver = get_solver(name)
        assert solver.param == ("x0" if "++" in name or name in ("ddim", "ddpm") else "eps"), name
        assert solver.history == (2 if name.endswith("_2M") else 1), name


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("time,schedule,step_schedule,step_counts,predict",
                         [(*setting, predict) for setting in ORDER_SETTINGS for predict in PREDICTS[setting[0]]])
def test_ode_solvers_converge_with_their_order(float64, time, schedule, step_schedule, step_counts, predict):
    model = exact_model(time, schedule, predict)
    for solver in FIRST_ORDER + HIGHER_ORDER:
        runs = [ode_error(model, solver, steps, step_schedule) for steps in step_counts]
        errors, nfes = [r[0] for r in runs], [r[1] for r in runs]
        order = fit_order(nfes, errors)
        if solver in FIRST_ORDER:
            assert 0.85 < order < 1.15, (solver, order, errors)
            assert errors[-1] < 2e-2
        else:
            assert 1.6 < order < 3.2, (solver, order, errors)
            assert errors[-1] < 5e-4, (solver, errors)


@pytest.mark.parametrize("time,schedule", [("discrete", "linear"), ("continuous", "cosine"), ("continuous", "flow")])
def test_eps_x0_and_v_forms_of_the_exact_network_agree(float64, time, schedule):
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    for solver in ODE_SOLVERS:
        out = [exact_model(time, schedule, p).sample(torch.zeros(64, 3), solver=solver, steps=10, x_T=x_T)[0]
               for p in PREDICTS[time]]
        assert all(torch.allclose(out[0], o, atol=1e-9) for o in out[1:]), solver


def test_first_order_solvers_are_the_same_map(float64):
    model = exact_model("continuous", "linear", "eps")
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(2))
    ref = model.sample(torch.zeros(32, 2), solver="ddim", steps=7, x_T=x_T)[0]
    for solver in ("ode_dpmsolver_1", "ode_dpmsolver++_1"):
        assert torch.allclose(model.sample(torch.zeros(32, 2), solver=solver, steps=7, x_T=x_T)[0], ref)
    # DDPM's ancestral step is SDE-DPM-Solver++1 (same noise draws, same result).
    a, b = (model.sample(torch.zeros(32, 2), solver=name, steps=7, x_T=x_T, generator=torch.Generator().manual_seed(3))[0]
            for name in ("ddpm", "sde_dpmsolver++_1"))
    assert torch.allclose(a, b)


@pytest.mark.parametrize("time,schedule,predict", [("discrete", "linear", "eps"), ("continuous", "cosine", "eps"),
                                                   ("continuous", "flow", "v")])
@pytest.mark.parametrize("solver", SDE_SOLVERS + [DDIM(eta=0.5), PredictorCorrector(snr=0.05, corrector_steps=2)])
def test_stochastic_solvers_sample_the_data_distribution(time, schedule, predict, solver):
    # DDPM's posterior variance is biased low at large steps (Bao et al. 2022): use the full T = 1000 chain.
    model = exact_model(time, schedule, predict)
    x, _ = model.sample(torch.zeros(10000, 2), solver=solver, steps=1000, generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - M) < 0.01 and abs(x.std().item() - S) < 0.01, (x.mean(), x.std())


# Few steps on the discrete cosine schedule (T = 1000), data N(M, 0.5^2): tolerances in units of the
# data std that every solver meets on the uniform grid (worst measured value in brackets). Mean and
# std of the samples; for ODE solvers also the mean distance to the exact probability-flow endpoint.
# At 10 steps the classic samplers get more room: Euler-Maruyama's and PC's first step leaves std
# +86% / +80% there, PNDM's Runge-Kutta warm start ends 0.37 from the ODE endpoint (the same on the
# continuous cosine). Before the grid started below the clipped last index, sde_dpmsolver_2M's std
# was off by +19500% / +600% / +7.6% at 10 / 50 / 200 steps, sde_dpmsolver_1's by +730% at 10.
FEW_STEPS = {  # steps: (mean, std or ODE endpoint for the cross-solver ten, the same for the classic ones)
    10: (0.05, 0.3, 1.0),  # [0.03; ten: 0.23 (ddpm), classic: 0.86 (euler_maruyama)]
    50: (0.05, 0.08, 0.08),  # [0.03; 0.07 (ddpm), 0.04 (euler_maruyama)]
    200: (0.05, 0.03, 0.03),  # [0.02; 0.018 (ddpm), 0.010]
}


@pytest.mark.parametrize("steps", sorted(FEW_STEPS))
@pytest.mark.parametrize("time,schedule,predict", [("discrete", "cosine", "eps"), ("continuous", "flow", "v")])
def test_every_solver_samples_the_gaussian_in_few_steps(float64, steps, time, schedule, predict):
    """The same tolerances hold on the flow schedule from t = 0.99 (worst there: 10 steps ddpm std 0.23,
    euler_maruyama 0.45; 50 steps ddpm 0.07)."""
    s, n = 0.5, 40000
    model = exact_model(time, schedule, predict, m=M, s=s)
    tol_mean, tol_ten, tol_classic = FEW_STEPS[steps]
    failures = []
    for name in SOLVERS:
        solver, tol = get_solver(name), tol_ten if name in CROSS_SOLVERS else tol_classic
        levels, _ = model.plan(solver, steps, "uniform")
        x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0)) * levels[0].sigma
        x, _ = model.sample(torch.zeros(n, 2), solver=name, steps=steps, x_T=x_T,
                            generator=torch.Generator().manual_seed(1))
        errors = {"mean": (abs(x.mean().item() - M) / s, tol_mean), "std": (abs(x.std().item() / s - 1), tol)}
        if not solver.stochastic:
            errors["ode"] = ((x - ode_endpoint(x_T, levels, M, s)).abs().mean().item() / s, tol)
        failures += [f"{name} {what} {err:.3g} > {bound}" for what, (err, bound) in errors.items() if not err <= bound]
    assert not failures, failures


@pytest.mark.parametrize("time,schedule,predict", [
    (time, schedule, predict)
    for time, schedule in [("discrete", "cosine"), ("discrete", "linear"), ("continuous", "linear"),
                           ("continuous", "cosine"), ("continuous", "ve"), ("continuous", "flow")]
    for predict in PREDICTS[time]])
def test_every_solver_is_finite_down_to_sigma_zero(time, schedule, predict):
    model = exact_model(time, schedule, predict)
    for solver in SOLVERS:
        for steps in (1, 2, 3, 5):
            for step_schedule in ("uniform", "quad", "logsnr"):
                x, log = model.sample(torch.zeros(16, 2), solver=solver, steps=steps, step_schedule=step_schedule,
                                      generator=torch.Generator().manual_seed(0))
                assert torch.isfinite(x).all(), (solver, steps, step_schedule)
                assert len(log["t"]) == steps + 1 and log["t"][-1] == model.schedule.t_clean


@pytest.mark.parametrize("solver,steps,nfe", [("ddim", 10, 10), ("ode_dpmsolver++_2M", 5, 5), ("heun", 10, 19),
                                               ("pc", 10, 19), ("pndm", 2, 5), ("pndm", 10, 19),
                                               (PredictorCorrector(corrector_steps=2), 4, 10)])
def test_nfe_counts_network_calls(solver, steps, nfe):
    model = exact_model("continuous", "linear", "eps")
    calls = []
    original = model.model_ema["diffusion"].forward
    model.model_ema["diffusion"].forward = lambda *a: calls.append(1) or original(*a)
    _, log = model.sample(torch.zeros(4, 2), solver=solver, steps=steps)
    assert log["nfe"] == len(calls) == nfe


def test_ode_sampling_is_deterministic_given_x_T_and_sde_given_generator():
    model = exact_model("continuous", "cosine", "x0")
    x_T = torch.randn(8, 2)
    a = model.sample(torch.zeros(8, 2), solver="ode_dpmsolver++_2M", steps=6, x_T=x_T)[0]
    assert torch.equal(a, model.sample(torch.zeros(8, 2), solver="ode_dpmsolver++_2M", steps=6, x_T=x_T)[0])
    b, c = (model.sample(torch.zeros(8, 2), solver="sde_dpmsolver++_2M", steps=6,
                         generator=torch.Generator().manual_seed(5))[0] for _ in range(2))
    assert torch.equal(b, c)


# ---- guidance -----------------------------------------------------------------------------------


class ConditionalMLP(nn.Module):
    """Small backbone whose output depends on x, t and the condition."""

    def __init__(self, x_dim: int = 2, cond_dim: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(x_dim + 1 + cond_dim, 32), nn.Mish(), nn.Linear(32, x_dim))
        self.cond_dim = cond_dim

    def forward(self, x, t, condition=None):
        if condition is None:
            condition = torch.zeros(x.shape[0], self.cond_dim)
        return self.net(torch.cat([x, t.float()[:, None] / 1000, condition], -1))


def _baked(net, condition):
    """The same network with a fixed condition baked in (conditional-only sampling)."""

    class Baked(nn.Module):
        def forward(self, x, t, c=None):
            return net(x, t, condition)

    return Baked()


def test_classifier_free_guidance_weights():
    torch.manual_seed(0)
    net, cond = ConditionalMLP(), torch.randn(6, 3)
    model = DiffusionModel(net, time="discrete", diffusion_steps=100, device="cpu")
    x_T = torch.randn(6, 2)

    def sample(m, **kw):
        return m.sample(torch.zeros(6, 2), solver="ode_dpmsolver++_2M", steps=8, x_T=x_T, **kw)

    def with_backbone(backbone):
        m = DiffusionModel(backbone, time="discrete", diffusion_steps=100, device="cpu")
        return sample(m)[0]

    cond_only = with_backbone(_baked(net, cond))
    uncond = with_backbone(_baked(net, torch.zeros(6, 3)))
    x1, log1 = sample(model, condition_cfg=cond, w_cfg=1.0)
    x0, _ = sample(model, condition_cfg=cond, w_cfg=0.0)
    assert torch.allclose(x1, cond_only, atol=1e-6) and torch.allclose(x0, uncond, atol=1e-6)
    assert not log1["cfg_batched"] and log1["nfe"] == 8

    class Guided(nn.Module):
        def forward(self, x, t, c=None):
            e_u, e_c = net(x, t, torch.zeros(6, 3)), net(x, t, cond)
            return e_u + 2.5 * (e_c - e_u)

    x2, log2 = sample(model, condition_cfg=cond, w_cfg=2.5)
    assert torch.allclose(x2, with_backbone(Guided()), atol=1e-5)
    assert log2["cfg_batched"] and log2["nfe"] == 8  # one batched call of 2n rows per step


class LogDensity(nn.Module):
    """log p(y | x_t) = -|x_t - target|^2: pulls samples toward `target`."""

    def __init__(self, target: float):
        super().__init__()
        self.target = target

    def forward(self, x, t, condition=None):
        return -((x - self.target) ** 2).sum(-1)


@pytest.mark.parametrize("predict", ["eps", "x0"])
def test_classifier_guidance_moves_samples_toward_higher_log_p(predict):
    model = exact_model("continuous", "cosine", predict)
    model.classifier = LogDensity(2.0)
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    plain, _ = model.sample(torch.zeros(2000, 2), solver="ddim", steps=20, x_T=x_T)
    guided, log = model.sample(torch.zeros(2000, 2), solver="ddim", steps=20, x_T=x_T, w_cg=0.5)
    assert model.classifier(guided, None).mean() > model.classifier(plain, None).mean() + 0.1
    assert log["classifier_calls"] == 20 and log["nfe"] == 20


def test_classifier_guidance_needs_a_classifier():
    with pytest.raises(ValueError, match="needs a classifier"):
        exact_model("continuous", "cosine", "eps").sample(torch.zeros(2, 2), w_cg=1.0)


class FlatMLP(ConditionalMLP):
    """ConditionalMLP over flattened (batch, horizon, dim) inputs."""

    def forward(self, x, t, condition=None):
        return super().forward(x.flatten(1), t, condition).view_as(x)


@pytest.mark.parametrize("solver", SOLVERS)
def test_inpainting_keeps_prior_values_exactly(solver):
    torch.manual_seed(0)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    model = DiffusionModel(FlatMLP(6, 0), time="continuous", fix_mask=mask, x_min=-1.0, x_max=1.0, device="cpu")
    prior = torch.randn(5, 3, 2) * 3  # outside the clip range on purpose
    x, _ = model.sample(prior, solver=solver, steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x[:, mask.bool()], prior[:, mask.bool()])
    assert x[:, ~mask.bool()].abs().max() <= 1.0


# ---- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("time,schedule,predict", [("discrete", "cosine", "eps"), ("continuous", "cosine", "x0"),
                                                   ("continuous", "flow", "v")])
def test_update_and_ema_lower_the_loss_on_a_fixed_batch(time, schedule, predict):
    torch.manual_seed(0)
    model = DiffusionModel(ConditionalMLP(2, 3), time=time, schedule=schedule, predict=predict, lr=3e-3,
                           ema_rate=0.9, device="cpu")
    x0, cond = torch.randn(256, 2) * 0.5 + 1.0, torch.randn(256, 3)

    def fixed_loss(net):
        torch.manual_seed(123)  # same t and noise for every evaluation
        model.model, saved = net, model.model
        try:
            with torch.no_grad():
                return model.loss(x0, cond).item()
        finally:
            model.model = saved

    before, before_ema = fixed_loss(model.model), fixed_loss(model.model_ema)
    for _ in range(300):
        metrics = model.update(x0, cond)
    assert set(metrics) == {"loss", "grad_norm"}
    assert fixed_loss(model.model) < 0.5 * before
    assert fixed_loss(model.model_ema) < 0.5 * before_ema


def test_fix_mask_and_loss_weight_shape_the_loss():
    torch.manual_seed(0)
    mask = torch.tensor([1.0, 0.0])
    model = DiffusionModel(ConditionalMLP(2, 0), time="continuous", fix_mask=mask, device="cpu")
    x0 = torch.randn(64, 2)
    torch.manual_seed(1)
    base = model.loss(x0).item()
    x0_changed = x0.clone()
    x0_changed[:, 0] += 100.0  # fixed entries are conditioning, not targets...
    torch.manual_seed(1)
    changed = model.loss(x0_changed).item()
    assert changed != base  # ...they still reach the network as input
    model.loss_weight = torch.tensor([1.0, 0.0])
    assert model.loss(x0).item() == 0.0  # the only free entry has weight 0


def test_gradients_flow_through_sampling():
    torch.manual_seed(0)
    model = DiffusionModel(ConditionalMLP(2, 3), time="discrete", diffusion_steps=5, device="cpu",
                           schedule="linear", schedule_kwargs={"beta_max": 10.0}, x_min=-1.0, x_max=1.0)
    x, _ = model.sample(torch.zeros(16, 2), solver="ddpm", steps=5, condition_cfg=torch.randn(16, 3),
                        use_ema=False, requires_grad=True)
    x.pow(2).sum().backward()
    grads = [p.grad for p in model.model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    without, _ = model.sample(torch.zeros(4, 2), steps=5)
    assert not without.requires_grad


def test_state_dict_round_trip_restores_samples_and_update_count():
    torch.manual_seed(0)
    model = DiffusionModel(ConditionalMLP(2, 3), time="continuous", device="cpu")
    for _ in range(5):
        model.update(torch.randn(32, 2), torch.randn(32, 3))
    clone = DiffusionModel(ConditionalMLP(2, 3), time="continuous", device="cpu")
    clone.load_state_dict(model.state_dict())
    cond, x_T = torch.randn(4, 3), torch.randn(4, 2)
    a = model.sample(torch.zeros(4, 2), solver="pndm", steps=6, x_T=x_T, condition_cfg=cond)[0]
    b = clone.sample(torch.zeros(4, 2), solver="pndm", steps=6, x_T=x_T, condition_cfg=cond)[0]
    assert torch.equal(a, b) and clone.updates == 5


def test_nan_in_data_raises_one_clear_error():
    model = DiffusionModel(ConditionalMLP(2, 0), time="continuous", device="cpu")
    x0 = torch.randn(8, 2)
    x0[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        model.update(x0)


@pytest.mark.slow
def test_classifier_free_guidance_end_to_end_with_label_dropout():
    """Trained with condition dropout, one network samples p(x | c) at w=1 and p(x) at w=0."""
    from cleandiff_rl.nn import DQLMlp, IdentityCondition

    torch.manual_seed(0)
    model = DiffusionModel(DQLMlp(1, cond_dim=1, hidden_dim=64), IdentityCondition(1, dropout=0.3),
                           time="continuous", lr=3e-3, ema_rate=0.99, device="cpu")
    for _ in range(1500):
        c = torch.randint(0, 2, (256, 1)).float() * 2 - 1
        model.update(c * 1.5 + 0.2 * torch.randn(256, 1), c)
    plus = torch.ones(2000, 1)
    generator = torch.Generator().manual_seed(0)
    cond, _ = model.sample(torch.zeros(2000, 1), solver="ode_dpmsolver++_2M", steps=20, condition_cfg=plus,
                           w_cfg=1.0, generator=generator)
    uncond, _ = model.sample(torch.zeros(2000, 1), solver="ode_dpmsolver++_2M", steps=20, condition_cfg=plus,
                             w_cfg=0.0, generator=generator)
    assert abs(cond.mean().item() - 1.5) < 0.15 and cond.std().item() < 0.4
    assert abs(uncond.mean().item()) < 0.3 and 0.3 < (uncond > 0).float().mean().item() < 0.7


@pytest.mark.parametrize("time,schedule,predict", [("discrete", "cosine", "eps"), ("discrete", "cosine", "x0"),
                                                   ("continuous", "flow", "v"), ("continuous", "linear", "v")])
def test_folded_conversion_matches_explicit_conversion(float64, time, schedule, predict):
    """Single-output rules fold the conversion of the network's output into their coefficients unless
    clipping needs x0 explicitly."""
    folded = exact_model(time, schedule, predict)
    explicit = exact_model(time, schedule, predict)
    explicit.x_min, explicit.x_max = torch.tensor(-1e9), torch.tensor(1e9)  # a clip that never bites
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(4))
    for solver in SOLVERS:
        a, b = (m.sample(torch.zeros(64, 2), solver=solver, steps=8, x_T=x_T,
                         generator=torch.Generator().manual_seed(5))[0] for m in (folded, explicit))
        assert torch.allclose(a, b, atol=1e-8), solver


@pytest.mark.slow
def test_toy2d_trains_a_flow_matching_model_that_every_solver_samples(tmp_path):
    """pipelines/toy2d.py with `model.schedule=flow model.predict=v`: after 600 updates the samples are
    within a few noise floors of the 8-mode mixture at 5 and 20 steps, for ODE, SDE and classic solvers;
    it writes the sample grid and the quality-vs-NFE figure, and its table names its metric."""
    from cleandiff_rl.toy2d import quality_table, run
    from cleandiff_rl.training import compose_config

    cfg = compose_config(["model.schedule=flow", "model.predict=v", "train.steps=600", "data.n_eval=1000",
                          "sample.solvers=[ddim,ode_dpmsolver++_2M,heun,sde_dpmsolver++_1]", "sample.steps=[1,5,20]",
                          "device=cpu"], config_name="toy2d")
    rows, floor = run(cfg, tmp_path)
    sw = {(r["solver"], r["steps"]): r["sliced_wasserstein"] for r in rows}
    assert all(sw[solver, 20] < 3 * floor for solver in cfg.sample.solvers), (sw, floor)
    assert all(sw[solver, 1] > 5 * floor for solver in cfg.sample.solvers)  # one step: the mean, not the modes
    for figure in ("samples.png", "quality_vs_nfe.png"):
        png = (tmp_path / figure).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, figure
    assert (tmp_path / "results.csv").exists()
    table = quality_table(rows, [1, 5, 20], floor)
    assert "sliced Wasserstein-2 distance to the true mixture (lower is better" in table
    heun = next(line for line in table.splitlines() if line.startswith("| heun "))
    assert [cell.strip() for cell in heun.split("|")[2:5]] == [f"{sw['heun', s]:.3f}" for s in (1, 5, 20)]


@pytest.mark.slow
def test_a_one_step_student_keeps_the_teachers_modes_where_one_teacher_step_collapses():
    """distill(): from the same noise, one student step lands where 10 teacher ODE steps do, on data with
    two modes per condition; one DDIM step of the teacher itself lands near the mean between them."""
    from cleandiff_rl.diffusion.distill import distill
    from cleandiff_rl.nn import DQLMlp

    torch.manual_seed(0)
    teacher = DiffusionModel(DQLMlp(1, cond_dim=1, hidden_dim=64), time="continuous", schedule="linear",
                             schedule_kwargs={"beta_max": 10.0}, lr=3e-3, ema_rate=0.99, device="cpu")
    for _ in range(1000):
        c = torch.rand(256, 1) * 2 - 1
        mode = torch.randint(0, 2, (256, 1)).float() * 2 - 1
        teacher.update(mode * (1.0 + 0.5 * c) + 0.1 * torch.randn(256, 1), c)
    student = distill(teacher, lambda n: torch.rand(n, 1) * 2 - 1, (1,), steps=1, teacher_steps=10, updates=600,
                      lr=1e-3, progress=False)
    c, x_T = torch.full((4000, 1), 0.5), torch.randn(4000, 1)
    target, _ = teacher.sample(torch.zeros(4000, 1), solver="ddim", steps=10, x_T=x_T, condition_cfg=c)
    one_step, _ = teacher.sample(torch.zeros(4000, 1), solver="ddim", steps=1, x_T=x_T, condition_cfg=c)
    distilled, log = student.sample(torch.zeros(4000, 1), solver="ddim", steps=1, x_T=x_T, condition_cfg=c)
    assert log["nfe"] == 1 and abs(target.abs().mean().item() - 1.25) < 0.1  # the teacher learned both modes
    assert (distilled - target).abs().mean() < 0.15 < 0.5 < (one_step - target).abs().mean()
    assert distilled.abs().mean() > 0.9 * target.abs().mean() and 0.4 < (distilled > 0).float().mean() < 0.6
    # temperature 0 distils the teacher's mode map alone (x_T = 0, a policy acting at its mode): there a
    # student fits it closer than one that spreads its fit over every x_T
    c, zero = torch.linspace(-1, 1, 201)[:, None], torch.zeros(201, 1)
    at_mode = distill(teacher, lambda n: torch.rand(n, 1) * 2 - 1, (1,), steps=1, teacher_steps=10, updates=300,
                      lr=1e-3, temperature=0.0, progress=False)
    mode, _ = teacher.sample(zero, solver="ddim", steps=10, x_T=zero, condition_cfg=c)
    errors = [(s.sample(zero, solver="ddim", steps=1, x_T=zero, condition_cfg=c)[0] - mode).abs().mean().item()
              for s in (student, at_mode)]
    assert errors[1] < 0.02 and errors[1] < 0.5 * errors[0], errors
    with pytest.raises(ValueError, match="must be deterministic"):
        distill(teacher, lambda n: torch.zeros(n, 1), (1,), teacher_solver="ddpm", updates=1)
