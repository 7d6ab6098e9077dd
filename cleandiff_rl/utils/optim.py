"""Optimizer steps that never wait for the GPU, target-network averaging, and the one place where metrics
become floats."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from cleandiff_rl.utils.distributed import all_reduce_gradients
from cleandiff_rl.utils.fast import fast_paths_enabled


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor, parameters: Iterable[Tensor],
                   max_norm: float | None = None) -> Tensor:
    """Backpropagate `loss`, clip the gradient norm (when `max_norm` is set) and step; return the norm.

    `parameters` are the ones `optimizer` steps. Under torchrun their gradients are first averaged over the
    processes (`all_reduce_gradients`, what DistributedDataParallel does), so the clipping and the step see
    the gradient of the global batch, as in one process; every agent's update goes through here.

    Nothing here reads a value back to the host, so a whole update can be captured in a CUDA graph
    (`CudaGraphStep`; on NCCL the all-reduce too); a NaN/inf loss is caught where the metrics are read
    (`finite_floats`).
    On the CPU an Adam(W) steps fused (`utils.fast`), decided here because a checkpoint's optimizer
    state may come from another device.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parameters = list(parameters)
    all_reduce_gradients(parameters)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm else math.inf)
    use_fused_step(optimizer, parameters[0].device)
    optimizer.step()
    return grad_norm


def use_fused_step(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Adam / AdamW step with the fused kernel on the CPU when fast paths are on (the same update)."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        fused = fast_paths_enabled() and device.type == "cpu"
        for group in optimizer.param_groups:
            group["fused"] = fused or None


def cosine_decay_lrs(optimizers: Mapping[str, torch.optim.Optimizer], config: object, decaying: Mapping[str, str],
                     updates: int) -> None:
    """Set each named optimizer's lr to its config lr (`decaying`: optimizer -> config field) times the cosine
    factor (1 + cos(pi k / D)) / 2 after k = `updates` of D = `config.lr_decay_steps`; a tensor lr in place (what
    a captured CUDA graph reads), a float one (older checkpoints) replaced."""
    decay = 0.5 * (1.0 + math.cos(math.pi * min(updates / config.lr_decay_steps, 1.0)))
    for key, field in decaying.items():
        lr = getattr(config, field) * decay
        for group in optimizers[key].param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr


@torch.no_grad()
def soft_update(target: torch.nn.Module, online: torch.nn.Module, tau: float) -> None:
    """Polyak averaging, target <- tau * online + (1 - tau) * target (tau = 0.005 in SAC, DQL and IDQL)."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


def finite_floats(metrics: Mapping[str, Tensor | float], where: str) -> dict[str, float]:
    """Metrics as python floats; a NaN/inf one raises FloatingPointError naming it and `where`."""
    values = {key: float(value) for key, value in metrics.items()}
    bad = [key for key, value in values.items() if not math.isfinite(value)]
    if bad:
        raise FloatingPointError(f"non-finite {', '.join(bad)} (NaN/inf) {where}: check the data for NaN/inf, "
                                 "or lower the learning rate")
    return values
