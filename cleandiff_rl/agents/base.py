"""What every policy shares: its config, the observation normalizer, numpy `act`, save and load.

An algorithm module subclasses `Agent`, declares a `Config` dataclass (its hyperparameters, with the
papers' defaults) and writes three things: `__init__` (networks and optimizers), `train_step(batch)`
and `_act(obs, solver, steps)` on normalized observation tensors, and names the diffusion models it keeps
an EMA of in `ema_models` (`after_step` updates them). Everything a user touches (`act` on numpy, `save`,
`load`, dimension checks) lives here once.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from cleandiff_rl.agents.acting import act_only_settings
from cleandiff_rl.data.normalizers import Normalizer, normalizer_from_state
from cleandiff_rl.data.torch_datasets import TransitionDataset
from cleandiff_rl.diffusion.model import DiffusionModel, check_temperature
from cleandiff_rl.diffusion.solvers import get_solver
from cleandiff_rl.utils import atomic_save, finite_floats, load_checkpoint, resolve_device

CHECKPOINT_FORMAT = 1
# The shape of each batch key `train_step` may read: B the batch, H the horizon, obs / act the dimensions
TRANSITIONS = {"obs": "B obs", "act": "B act", "rew": "B", "next_obs": "B obs", "terminal": "B", "timeout": "B",
               "done": "B"}
WINDOWS = {"obs": "B H obs", "act": "B H act", "values": "B", "mask": "B H"}


def make_config(cls: type, values: dict[str, Any] | None) -> Any:
    """Build a config dataclass from a dict; an unknown key is one clear error naming the valid ones."""
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown {cls.__qualname__} settings {unknown}; valid: {sorted(fields)}")
    return cls(**values)


def _compile_in_place(module: nn.Module, **options: Any) -> None:
    """torch.compile `module`'s calls, keeping the module (and its state_dict keys, without `_orig_mod.`).

    What `nn.Module.compile` does, except that compiling starts in a function of this file: Dynamo does not
    start tracing in torch's own code, so `nn.Module.compile` leaves an `nn.Sequential` (whose forward is
    torch's) eager. Each module gets its own copy of that function's code, because Dynamo keeps its graphs,
    and its limit of 8 recompilations (shapes, grad mode), per code object."""
    call_impl = module._call_impl

    def compiled_call(*args: Any, **kwargs: Any) -> Any:
        return call_impl(*args, **kwargs)

    compiled_call.__code__ = compiled_call.__code__.replace(co_name=f"compiled_{type(module).__name__}")
    module._compiled_call_impl = torch.compile(compiled_call, **options)


class Agent(nn.Module):
    """Base class of the offline-RL policies.

    Args:
        obs_dim / act_dim: observation and action sizes.
        config: the algorithm's settings (a dict or its `Config`); missing keys take the defaults.
        obs_normalizer: state of the normalizer the training data went through (None: raw obs).
        env_id / dataset_id: recorded in checkpoints, so evaluation knows what the policy is for.
        action_bounds: (low, high) of the env's action box. The networks work in [-1, 1]: training
            actions go through `normalize_action`, and `act` maps back to the box (None: already [-1, 1]).
        device: where the agent lives (`load_policy(path, device)`); `.to(device)` moves it later, normalizer included.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    is_diffusion: ClassVar[bool] = True
    has_critics: ClassVar[bool] = False  # rates actions by its critics' Q (`rate`): what critic_diagnostics checks
    ema_models: ClassVar[tuple[str, ...]] = ()  # attributes holding a DiffusionModel whose EMA `after_step` updates
    batch_layout: ClassVar[dict[str, str]] = TRANSITIONS  # the shapes `check_batch` holds a batch to
    batch_keys: ClassVar[tuple[str, ...]] = ("obs", "act", "rew", "next_obs", "terminal")  # those `train_step` reads

    def __init__(self, obs_dim: int, act_dim: int, config: dict | Any = None, *,
                 obs_normalizer: dict | None = None, env_id: str | None = None, dataset_id: str | None = None,
                 action_bounds: tuple[Any, Any] | None = None, device: str | torch.device = "auto"):
        super().__init__()
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.config = config if isinstance(config, self.Config) else make_config(self.Config, config)
        self.check_config(self.config)
        self.env_id, self.dataset_id = env_id, dataset_id
        device = resolve_device(device)
        self.normalizer_state = obs_normalizer
        self.obs_normalizer: Normalizer | None = (
            None if obs_normalizer is None else normalizer_from_state(obs_normalizer, device))
        self.action_bounds = None if action_bounds is None else tuple(np.asarray(b, np.float32).tolist()
                                                                      for b in action_bounds)
        low, high = (-1.0, 1.0) if action_bounds is None else action_bounds
        low = torch.as_tensor(low, dtype=torch.float32, device=device)
        # non-persistent buffers: they follow .to() and stay out of state_dict (the checkpoint keeps action_bounds)
        self.register_buffer("_act_low", low, persistent=False)
        self.register_buffer("_act_half_range", (torch.as_tensor(high, dtype=torch.float32, device=device) - low) / 2,
                             persistent=False)
        self.solver = getattr(self.config, "solver", None)
        self.steps = getattr(self.config, "sampling_steps", None)
        self.last_sample_log: dict = {}
        self.updates = 0
        self.compiled = False  # `compile_networks` was called

    @property
    def device(self) -> torch.device:
        return self._act_low.device

    @property
    def batches_per_step(self) -> int:
        """How many batches of `batch_size` one `train_step` takes, stacked into one (IDQL's critic updates,
        Diffusion-QL's and Diffusion BC's extra denoising steps)."""
        return 1

    def split_batches(self, batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """`train_step`'s stacked batch as its `batches_per_step` batches."""
        split = {key: value.chunk(self.batches_per_step) for key, value in batch.items()}
        return [{key: parts[i] for key, parts in split.items()} for i in range(self.batches_per_step)]

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 (nn.Module's hook behind .to() / .cuda() / .cpu())
        super()._apply(fn, recurse)
        if self.obs_normalizer is not None:  # a plain object, not a module: move it by hand
            self.obs_normalizer.to(self.device)
        return self

    # ---- the three things an algorithm writes ----------------------------------------------------

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One training step on a batch of normalized transitions; returns scalar metric tensors.

        The batch holds float tensors, B rows each (B = batch_size * `batches_per_step`): for a policy
        obs and next_obs `(B, obs_dim)`, act `(B, act_dim)` in [-1, 1], rew and terminal `(B,)`; for a
        planner windows of `horizon` H: obs `(B, H, obs_dim)`, act `(B, H, act_dim)`, values `(B,)`, mask
        `(B, H)`. `batch_keys` names the keys an algorithm reads. `update` and `train` pass every batch
        through `check_batch` first, which takes (B, 1) rewards, terminals and values (CORL's and d3rlpy's
        layout) as (B,) and refuses any other shape.

        Tensor math only: no `.item()` or other host sync, no Python branch on a tensor value or a step
        counter. Training on a GPU captures it once in a CUDA graph and replays it (`CudaGraphStep`);
        per-step bookkeeping belongs in `after_step`.
        """
        raise NotImplementedError

    def after_step(self) -> None:
        """Bookkeeping after every `train_step`, outside any graph: the update counter and the EMAs of
        `ema_models` (each on its own `ema_start` / `ema_every` schedule)."""
        self.updates += 1
        for name in self.ema_models:
            getattr(self, name).ema_update()

    def update(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One training step (`train_step`, then `after_step`); the metrics as floats.

        Raises FloatingPointError when a metric is NaN/inf (the weights then hold NaN: resume from a checkpoint).
        """
        metrics = self.train_step(self.check_batch(batch))
        self.after_step()
        return finite_floats(metrics, f"at {self.name} update {self.updates}")

    def check_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """`batch` in the layout `train_step` takes (see there), or one ValueError naming the key, its shape
        and the expected one: a per-sample value (rewards, terminals, values) of shape (B, 1) becomes (B,)
        (left so, it would broadcast a TD target to (B, B)), bool or integer tensors become float, keys
        outside `batch_layout` pass unchanged."""
        missing = [key for key in self.batch_keys if key not in batch]
        if missing:
            raise ValueError(f"the {self.name} batch has no {missing}; train_step reads {list(self.batch_keys)}")
        for key in self.batch_layout:
            if key in batch and not torch.is_tensor(batch[key]):
                raise ValueError(f"batch[{key!r}] is a {type(batch[key]).__name__}; train_step takes torch tensors")
        rows = batch["obs"].shape[0] if batch["obs"].dim() else 0
        if rows == 0 or rows % self.batches_per_step:
            raise ValueError(f"batch['obs'] has {rows} rows; {self.name} takes a positive multiple of its "
                             f"{self.batches_per_step} batches per step")
        sizes = {"B": rows, "H": getattr(self.config, "horizon", None), "obs": self.obs_dim, "act": self.act_dim}
        out = dict(batch)
        for key, layout in self.batch_layout.items():
            if key not in batch:
                continue
            value, expected = batch[key], tuple(sizes[dim] for dim in layout.split())
            if layout == "B" and tuple(value.shape) == (rows, 1):
                value = value.reshape(rows)
            if tuple(value.shape) != expected:
                also = f" or ({rows}, 1)" if layout == "B" else ""
                raise ValueError(f"batch[{key!r}] has shape {tuple(value.shape)}; {self.name} expects {expected}{also} "
                                 f"(B = {rows}, the rows of batch['obs'])")
            out[key] = value if value.is_floating_point() else value.float()
        return out

    def _act(self, obs: Tensor, solver: str, steps: int, generator: torch.Generator | None) -> Tensor:
        """Actions `(n, act_dim)` for normalized observations `(n, obs_dim)`."""
        raise NotImplementedError

    @classmethod
    def training_data(cls, dataset: Any, config: Any, *, device: torch.device,
                      normalizer_state: dict | None = None) -> TransitionDataset:
        """The torch dataset `train` samples batches from: (s, a, r, s') transitions for policies.

        `config` is this class's `Config`; `normalizer_state` a checkpoint's, when resuming.
        """
        return TransitionDataset(dataset, device=device, normalizer_state=normalizer_state)

    def prepare(self, dataset: Any) -> None:
        """Fit dataset statistics the algorithm needs before training (e.g. IDQL's reward scale)."""

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers whose state a checkpoint keeps (so training resumes exactly)."""
        return {}

    def compile_networks(self, **options: Any) -> list[str]:
        """torch.compile, in place, the networks that training updates call; returns their names.

        The networks are the agent's submodules, and for a `DiffusionModel` its backbone and condition
        encoder (online and EMA) and its classifier: the modules whose forward the updates call. Each is
        compiled in place (`_compile_in_place`, like `nn.Module.compile`), keeping the module object and
        its parameters, so `state_dict` keys, checkpoints, optimizers and EMA updates stay as they are. The optimizer steps,
        the sampling loop and the random draws stay eager, so the random stream and the math are those of
        the eager update (float rounding aside; inside a compiled network only dropout draws its own
        masks: IDQL's LN-ResNet). Shapes are static (`dynamic=False`; `options` go to `torch.compile`).
        `act` runs eagerly (`torch.compiler.set_stance("force_eager")`): its batch shapes differ.
        Compiling happens at the first calls (up to a minute on a CPU); then a Diffusion-QL update on one
        CPU core is 1.2-1.4x faster; IDQL and FQL gain nothing (docs/scaling.md, "torch.compile").
        """
        networks: dict[int, tuple[str, nn.Module]] = {}
        for name, child in self.named_children():
            if isinstance(child, DiffusionModel):  # its forward is not what sampling and the loss call
                parts = [(f"{name}.{kind}.{key}", module) for kind in ("model", "model_ema")
                         for key, module in getattr(child, kind).items()]
                parts.append((f"{name}.classifier", child.classifier))
            else:
                parts = [(name, child)]
            for path, module in parts:
                if module is not None and any(True for _ in module.parameters()):
                    networks.setdefault(id(module), (path, module))  # a module shared by two owners once
        for _, module in networks.values():
            _compile_in_place(module, **{"dynamic": False, **options})
        self.compiled = True
        return [path for path, _ in networks.values()]

    def normalize_action(self, action: Tensor) -> Tensor:
        """Env actions -> the networks' [-1, 1]."""
        return (action - self._act_low) / self._act_half_range - 1.0

    def unnormalize_action(self, action: Tensor) -> Tensor:
        """The networks' [-1, 1] -> env actions."""
        return (action + 1.0) * self._act_half_range + self._act_low

    # ---- acting ---------------------------------------------------------------------------------

    def set_sampling(self, solver: str | None = None, steps: int | None = None,
                     temperature: float | None = None) -> Agent:
        """Change the default solver, number of steps and/or temperature used by `act` (no retraining needed).

        temperature: the scale of the initial noise (config `temperature`). 1 samples the learned action
        distribution, behavior noise included; below 1 concentrates it, and 0 with an ODE solver (e.g.
        ddim) maps every observation to one deterministic action.
        """
        if temperature is not None:
            if not hasattr(self.config, "temperature"):
                raise ValueError(f"{self.name} policy has no sampling temperature")
            self.config.temperature = check_temperature(temperature)
        if solver is not None:
            get_solver(solver)  # unknown names fail here, not at the first action
            self.solver = solver
        if steps is not None:
            if not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be a positive integer, got {steps!r}")
            self.steps = steps
        return self

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse values of `cfg` this algorithm cannot use, with one clear ValueError: at construction and
        whenever `with_settings` changes them."""

    def with_settings(self, settings: dict[str, Any]) -> Agent:
        """Act with other settings: solver / steps / temperature, or any field of the config (e.g. IDQL's
        `selection`, FQL's `acting`); an unknown key or a value `check_config` refuses is one clear error,
        and changes nothing. Returns self."""
        settings = dict(settings)
        sampling = {key: settings.pop(key) for key in ("solver", "steps", "temperature") if key in settings}
        for key in settings:
            if not hasattr(self.config, key):
                raise ValueError(f"{self.name} has no setting {key!r}")
        config = dataclasses.replace(self.config, **settings)
        self.check_config(config)
        self.config = config
        return self.set_sampling(**sampling)

    def act_settings(self) -> dict[str, Any]:
        """How `act` acts now: solver and steps (None without a sampler) and the config's act-only settings
        (`acting.act_setting` fields). An evaluation records them, so a rerun can tell that a changed default
        makes a new result."""
        acting = {key: getattr(self.config, key) for key in act_only_settings(self.config)}
        return {"solver": self.solver, "steps": self.steps, **acting}

    def chosen_settings(self) -> dict[str, Any]:
        """Act settings under which `act` acts exactly as it does now, with any choice it makes per checkpoint
        fixed (`selection: auto`: the acting it takes here); {} for a policy that makes none. An evaluation
        records the result (`acts_as`), so the suite runs each distinct acting once."""
        return {}

    @torch.no_grad()
    def act(self, obs: np.ndarray | Tensor, *, solver: str | None = None, steps: int | None = None,
            generator: torch.Generator | None = None) -> np.ndarray:
        """Actions for one observation `(obs_dim,)` or a batch `(n, obs_dim)`; numpy in, numpy out.

        solver / steps: override the defaults (`set_sampling`, or the config) for this call.
        """
        obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32) if not torch.is_tensor(obs) else obs,
                                dtype=torch.float32, device=self.device)
        single = obs_t.dim() == 1
        if single:
            obs_t = obs_t[None]
        if obs_t.dim() != 2 or obs_t.shape[1] != self.obs_dim:
            raise ValueError(f"{self.name} policy expects observations of shape ({self.obs_dim},) or "
                             f"(n, {self.obs_dim}) (trained on {self.dataset_id or 'its dataset'}), "
                             f"got {tuple(np.shape(obs))}")
        if self.is_diffusion:
            solver = solver if solver is not None else self.solver
            steps = int(steps) if steps is not None else self.steps  # the sampler rejects bad names and steps
        if self.obs_normalizer is not None:
            obs_t = self.obs_normalizer.normalize(obs_t)
        was_training = self.training  # switching modes walks every submodule: only when needed
        if was_training:
            self.eval()
        try:
            with torch.compiler.set_stance("force_eager") if self.compiled else nullcontext():
                action = self._act(obs_t, solver, steps, generator)
        finally:
            if was_training:
                self.train()
        action = self.unnormalize_action(action).float().cpu().numpy()
        return action[0] if single else action

    # ---- checkpoints ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, **extra: Any) -> Path:
        """Write weights, optimizer states, config and normalizer atomically; `extra` rides along. Everything
        is tensors and plain values (dict, list, tuple, str, int, float, bool, None): `load_checkpoint` reads
        checkpoints weights-only and refuses any other object."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "algo": self.name,
            "config": dataclasses.asdict(self.config),
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "env_id": self.env_id,
            "dataset_id": self.dataset_id,
            "obs_normalizer": self.normalizer_state,
            "action_bounds": self.action_bounds,
            "updates": self.updates,
            "model": self.state_dict(),
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers().items()},
            **extra,
        }
        return atomic_save(state, path)

    @classmethod
    def from_checkpoint(cls, state: dict, device: str | torch.device = "auto") -> Agent:
        """Rebuild the agent a checkpoint dict (from `load_checkpoint`) describes."""
        agent = cls(state["obs_dim"], state["act_dim"], state["config"], obs_normalizer=state["obs_normalizer"],
                    env_id=state["env_id"], dataset_id=state["dataset_id"],
                    action_bounds=state.get("action_bounds"), device=device)
        agent.load_state_dict(state["model"])
        for key, opt in agent.optimizers().items():
            opt.load_state_dict(state["optimizers"][key])
        agent.updates = state["updates"]
        return agent

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "auto", *,
             solver: str | None = None, steps: int | None = None, temperature: float | None = None) -> Agent:
        """Load a checkpoint written by `save` (of this algorithm, or any when called on `Agent`)."""
        from cleandiff_rl.agents import get_algorithm

        state = load_checkpoint(path)
        if state.get("format") != CHECKPOINT_FORMAT or "algo" not in state:
            raise ValueError(f"{path} is not a cleandiff_rl policy checkpoint")
        algo_cls = get_algorithm(state["algo"])
        if cls is not Agent and algo_cls is not cls:
            raise ValueError(f"{path} holds a {state['algo']!r} policy, not {cls.name!r}")
        return algo_cls.from_checkpoint(state, device).set_sampling(solver, steps, temperature).eval()  # to act
