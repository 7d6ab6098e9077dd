"""Few-step students of a trained `DiffusionModel`: 1 or 2 network calls where the teacher makes many.

The student starts as a copy of the teacher and learns the teacher's deterministic sampling map: from
the same initial noise x_T and condition, `steps` DDIM steps of the student should land where the
teacher's ODE solver lands in `teacher_steps`,

    min E || DDIM_student^steps(x_T, c) - ODE_teacher^teacher_steps(x_T, c) ||^2,

with the gradient through the student's `steps` calls (Luhman & Luhman 2021 distil one step this way;
progressive distillation, Salimans & Ho 2022, halves the steps per round towards the same map). The
noise x_T keeps its role, so a student still samples a distribution, not the mean action, and a policy
can select among its candidates as before. A policy that acts at its mode uses one point of that map,
x_T = 0: `temperature=0` distils it there alone, which a 1-step student matches more closely than the
whole map.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm import trange

from cleandiff_rl.diffusion.model import DiffusionModel, check_temperature
from cleandiff_rl.diffusion.solvers import get_solver


def distill(teacher: DiffusionModel, conditions: Callable[[int], Tensor], x_shape: tuple[int, ...], *, steps: int = 1,
            teacher_solver: str = "ddim", teacher_steps: int = 5, updates: int = 5000, batch_size: int = 256,
            lr: float = 1e-4, temperature: float = 1.0, writer: Any = None, log_every: int = 100,
            progress: bool = True) -> DiffusionModel:
    """A copy of `teacher` trained so that DDIM at `steps` steps reproduces its ODE samples.

    conditions(n): a batch of n conditions (e.g. normalized observations from the training data).
    teacher_solver / teacher_steps: the teacher's map; it must be deterministic (an ODE solver).
    temperature: the scale of the initial noise distilled on (the one the policy acts at; 0: its mode alone).
    writer: a SummaryWriter for `distill/loss`. Returns the student, its EMA copy set to its final weights.
    """
    check_temperature(temperature)
    if get_solver(teacher_solver).stochastic:
        raise ValueError(f"the teacher's map must be deterministic; {teacher_solver!r} is a stochastic solver")
    student = copy.deepcopy(teacher, memo={id(teacher.optimizer): None})  # not the teacher's Adam state
    student.model.load_state_dict(teacher.model_ema.state_dict())  # start from the weights the teacher acts with
    student.optimizer = torch.optim.AdamW(student.model.parameters(), lr=lr)
    levels, _ = student.plan(get_solver("ddim"), steps, "uniform")  # also rejects a bad `steps`
    teacher_levels, _ = teacher.plan(get_solver(teacher_solver), teacher_steps, "uniform")
    if teacher_levels[0].t != levels[0].t:
        raise ValueError(f"student and teacher grids start at different times ({levels[0].t} vs {teacher_levels[0].t})")
    prior = torch.zeros(batch_size, *x_shape, device=teacher.device)
    for update in (bar := trange(updates, desc=f"distill to {steps} step(s)", disable=not progress, dynamic_ncols=True)):
        condition = conditions(batch_size)
        x_T = torch.randn_like(prior).mul_(levels[0].sigma * temperature)
        with torch.no_grad():
            target, _ = teacher.sample(prior, solver=teacher_solver, steps=teacher_steps, x_T=x_T, condition_cfg=condition)
        student.model.train()
        out, _ = student.sample(prior, solver="ddim", steps=steps, x_T=x_T, condition_cfg=condition, use_ema=False,
                                requires_grad=True)
        loss = (out - target).square().mean()
        student.optimize(loss)
        if update % log_every == 0 or update == updates - 1:
            value = loss.item()
            bar.set_postfix(loss=f"{value:.3g}")
            if writer is not None:
                writer.add_scalar("distill/loss", value, update)
    student.model.eval()
    student.model_ema.load_state_dict(student.model.state_dict())
    return student
