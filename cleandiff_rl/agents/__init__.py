"""Offline-RL agents on the diffusion core: the policies Diffusion BC, Diffusion-QL, EDP, IDQL, FQL, DAC (and plain BC
as a baseline) and the planners Diffuser and Decision Diffuser.

Each algorithm reads top to bottom in its own module; `Agent` (base.py) holds what they share.
"""

from __future__ import annotations

from cleandiff_rl.agents.base import Agent, make_config
from cleandiff_rl.agents.bc import BC
from cleandiff_rl.agents.dac import DAC
from cleandiff_rl.agents.decision_diffuser import DecisionDiffuser
from cleandiff_rl.agents.diffuser import Diffuser
from cleandiff_rl.agents.diffusion_bc import DiffusionBC
from cleandiff_rl.agents.diffusion_ql import DiffusionQL
from cleandiff_rl.agents.edp import EDP
from cleandiff_rl.agents.fql import FQL
from cleandiff_rl.agents.idql import IDQL

ALGORITHMS: dict[str, type[Agent]] = {cls.name: cls for cls in (DiffusionBC, DiffusionQL, EDP, IDQL, FQL, DAC, BC, Diffuser,
                                                                 DecisionDiffuser)}


def get_algorithm(name: str) -> type[Agent]:
    """The agent class for an algorithm name, with one clear error for unknown names."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(ALGORITHMS)}") from None


def load_policy(path: str, device: str = "auto", *, solver: str | None = None, steps: int | None = None,
                temperature: float | None = None, selection: str | None = None, settings: dict | None = None) -> Agent:
    """Load any saved policy; `policy.act(obs)` then maps numpy observations to numpy actions.

    solver / steps: the sampling defaults for `act` (each call may still override them).
    temperature: the initial-noise scale of a diffusion policy (see `Agent.set_sampling`).
    selection: the acting rule (agents/acting.py: sample | mode | argmax | softmax | expectile | auto; None:
        the checkpoint's, by default its paper's). settings: any other act-time settings (`Agent.with_settings`).
    Torch's thread count is the caller's: for these small networks one CPU thread is fastest and does not
    collapse when cores are shared (`torch.set_num_threads(1)`; the pipelines' `threads` setting).
    """
    policy = Agent.load(path, device, solver=solver, steps=steps, temperature=temperature)
    acting = {**(settings or {}), **({} if selection is None else {"selection": selection})}
    if acting:
        policy.with_settings(acting)
    return policy


__all__ = ["ALGORITHMS", "BC", "DAC", "FQL", "IDQL", "Agent", "DecisionDiffuser", "Diffuser", "DiffusionBC",
           "DiffusionQL", "EDP", "get_algorithm", "load_policy", "make_config"]
