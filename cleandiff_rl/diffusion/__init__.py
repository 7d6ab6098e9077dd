"""The cross-solver diffusion core: schedules, solvers and `DiffusionModel`."""

from cleandiff_rl.diffusion.model import PREDICTIONS, TIME_WEIGHTINGS, DiffusionModel
from cleandiff_rl.diffusion.schedules import (
    SCHEDULES,
    TIME_KINDS,
    VE,
    DiscreteSchedule,
    NoiseSchedule,
    VPCosine,
    VPLinear,
    discrete_vp_cosine,
    discrete_vp_linear,
    make_schedule,
)
from cleandiff_rl.diffusion.solvers import (
    CROSS_SOLVERS,
    DDIM,
    DDPM,
    PNDM,
    SOLVER_CLASSES,
    SOLVERS,
    STEP_SCHEDULES,
    EulerMaruyama,
    Heun,
    Level,
    LinearStep,
    PredictorCorrector,
    Solver,
    get_solver,
    time_grid,
)

__all__ = [
    "CROSS_SOLVERS", "DDIM", "DDPM", "PNDM", "PREDICTIONS", "SCHEDULES", "SOLVERS", "SOLVER_CLASSES", "STEP_SCHEDULES",
    "TIME_KINDS", "TIME_WEIGHTINGS", "VE", "DiffusionModel", "DiscreteSchedule", "EulerMaruyama", "Heun",
    "Level", "LinearStep", "NoiseSchedule", "PredictorCorrector", "Solver", "VPCosine", "VPLinear",
    "discrete_vp_cosine", "discrete_vp_linear", "get_solver", "make_schedule", "time_grid",
]
