"""What the trajectory planners (Diffuser, Decision Diffuser) share.

A planner diffuses windows of `horizon` steps. The first state of every window is the current
observation, fixed by inpainting (`fix_mask`) in training and in sampling, so a plan always starts
where the agent is. The planner acts on the first step of its plan and replans at every env step.
Training data are `SequenceDataset` windows (normalized states, actions in [-1, 1], the discounted
value from the window start); `train`, `evaluate`, `sweep` and `load_policy` use planners exactly
like policies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from cleandiff_rl.agents.acting import act_setting
from cleandiff_rl.agents.base import WINDOWS, Agent
from cleandiff_rl.data.torch_datasets import SequenceDataset


@dataclass
class PlannerConfig:
    """Settings every planner has; the algorithms add their networks and guidance."""

    horizon: int = 32
    discount: float = 0.997  # of the value / return label at each window start
    terminal_penalty: float = -100.0  # added to the last reward of an episode that terminated
    max_path_length: int = 1000  # episodes are padded to this length (Diffuser's windows may run past the end)
    time: str = "continuous"
    schedule: str = "cosine"
    diffusion_steps: int = 20  # T of a discrete schedule
    schedule_kwargs: dict = field(default_factory=dict)
    predict: str = "x0"
    solver: str = "ddpm"
    sampling_steps: int = 20
    temperature: float = act_setting(1.0)  # scale of the initial noise
    num_candidates: int = act_setting(1)  # plans sampled per observation
    lr: float = 2e-4
    weight_decay: float = 0.0
    ema_rate: float = 0.995
    ema_every: int = 10
    ema_start: int = 2000


class Planner(Agent):
    """Base of the planners: the inpainting prior, sampling plans, and the last chosen plan.

    A subclass sets `plans_actions` (whether a plan holds [s, a] or s alone), builds `self.model`
    (a `DiffusionModel` over (horizon, x_dim) with `self.fix_mask()`, its EMA kept by `after_step`), and
    writes `train_step` and `_act`.
    """

    plans_actions: ClassVar[bool]
    ema_models = ("model",)
    batch_layout = WINDOWS  # SequenceDataset's windows
    batch_keys = ("obs", "act", "values", "mask")

    def __init__(self, obs_dim: int, act_dim: int, config: Any = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        self.x_dim = obs_dim + act_dim if self.plans_actions else obs_dim
        self.last_plan: Tensor | None = None  # (n, horizon, obs_dim) raw states of the plans last acted on

    @classmethod
    def training_data(cls, dataset: Any, config: PlannerConfig, *, device: torch.device,
                      normalizer_state: dict | None = None) -> SequenceDataset:
        return SequenceDataset(dataset, horizon=config.horizon, discount=config.discount,
                               terminal_penalty=config.terminal_penalty, max_path_length=config.max_path_length,
                               normalize_actions=False, normalizer_state=normalizer_state, device=device)

    def fix_mask(self) -> Tensor:
        """(horizon, x_dim): 1 on the first state, which inpainting keeps equal to the observation."""
        mask = torch.zeros(self.config.horizon, self.x_dim)
        mask[0, :self.obs_dim] = 1.0
        return mask

    def trajectories(self, batch: dict[str, Tensor]) -> Tensor:
        """The windows the model diffuses: [s, a] or s, shaped (batch, horizon, x_dim)."""
        return torch.cat([batch["obs"], batch["act"]], -1) if self.plans_actions else batch["obs"]

    def sample_plans(self, obs: Tensor, n: int, solver: str, steps: int, generator: torch.Generator | None,
                     **guidance: Any) -> Tensor:
        """`n` plans per normalized observation, `(b * n, horizon, x_dim)`, starting exactly at it."""
        prior = obs.new_zeros(obs.shape[0] * n, self.config.horizon, self.x_dim)
        prior[:, 0, :self.obs_dim] = obs.repeat_interleave(n, 0)
        plans, self.last_sample_log = self.model.sample(prior, solver=solver, steps=steps, generator=generator,
                                                        temperature=self.config.temperature, **guidance)
        return plans

    def keep_plan(self, plans: Tensor) -> None:
        """Remember the chosen plans' states in env units (for the planned-vs-executed picture)."""
        states = plans[..., :self.obs_dim]
        self.last_plan = states if self.obs_normalizer is None else self.obs_normalizer.unnormalize(states)
