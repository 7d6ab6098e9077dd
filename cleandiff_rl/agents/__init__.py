"""Offline-RL agents on the diffusion core: the policies Diffusion BC, Diffusion-QL, IDQL, FQL (and plain BC
as a baseline) and the planners Diffuser and Decision Diffuser.

Each algorithm reads top to bottom in its own module; `Agent` (base.py) holds what they share.
"""

from __future__ import annotations

import torch

from cleandiff_rl.agents.base import Agent, make_config
from cleandiff_rl.agents.bc import BC
from cleandiff_rl.agents.decision_diffuser import DecisionDiffuser
from cleandiff_rl.agents.diffuser import Diffuser
from cleandiff_rl.agents.diffusion_bc import DiffusionBC
from cleandiff_rl.agents.diffusion_ql import DiffusionQL
from cleandiff_rl.agents.fql import FQL
from cleandiff_rl.agents.idql import IDQL

ALGORITHMS: dict[str, type[Agent]] = {cls.name: cls for cls in (DiffusionBC, DiffusionQL, IDQL, FQL, BC, Diffuser,
                                                                 DecisionDiffuser)}


def get_algorithm(name: str) -> type[Agent]:
    """The agent class for an algorithm name, with one clear error for unknown names."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(ALGORITHMS)}") from None


def load_policy(path: str, device: str = "auto", *, solver: str | None = None, steps: int | None = None,
                temperature: float | None = None, threads: int | None = 1) -> Agent:
    """Load any saved policy; `policy.act(obs)` then maps numpy observations to numpy actions.

    solver / steps: the sampling defaults for `act` (each call may still override them).
    temperature: the initial-noise scale of a diffusion policy (see `Agent.set_sampling`).
    threads: torch's CPU threads for this process when the policy lives on the CPU. One is fastest
        for these small networks and does not collapse when cores are shared (a Diffusion-QL action
        on 2 busy cores: 48 ms with torch's default 2 threads, 4.5 ms with 1); None leaves torch's setting.
    """
    policy = Agent.load(path, device, solver=solver, steps=steps, temperature=temperature)
    if threads is not None and policy.device.type == "cpu":
        torch.set_num_threads(threads)
    return policy


__all__ = ["ALGORITHMS", "BC", "FQL", "IDQL", "Agent", "DecisionDiffuser", "Diffuser", "DiffusionBC", "DiffusionQL",
           "get_algorithm", "load_policy", "make_config"]
