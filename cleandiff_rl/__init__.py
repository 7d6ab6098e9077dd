"""cleandiff_rl: diffusion models for decision making (offline RL).

One diffusion core (schedules x solvers x guidance) under swappable backbones and conditions;
planners and policies built on it; D4RL-style Minari datasets; MuJoCo evaluation per solver and NFE.

`cleandiff_rl.load_policy(path)` loads any saved policy (see `cleandiff_rl.agents.load_policy`).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily so that `import cleandiff_rl.diffusion` does not pull in the agents and data stacks.
    if name == "load_policy":
        from cleandiff_rl.agents import load_policy

        return load_policy
    raise AttributeError(f"module 'cleandiff_rl' has no attribute {name!r}")
