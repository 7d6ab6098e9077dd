"""cleandiff_rl: diffusion models for decision making (offline RL).

One diffusion core (schedules x solvers x guidance) under swappable backbones and conditions;
planners and policies built on it; D4RL-style Minari datasets; MuJoCo evaluation per solver and NFE.
"""

__version__ = "0.1.0"
