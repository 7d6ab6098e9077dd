"""One optimizer step with the checks every training loop needs."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor, parameters: Iterable[Tensor],
                   max_norm: float | None = None, name: str = "loss") -> float:
    """Backpropagate `loss`, clip the gradient norm (when `max_norm` is set) and step; return the norm.

    A NaN/inf loss raises FloatingPointError before the weights are touched.
    """
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite {name} ({value}): check the batch for NaN/inf, or lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm if max_norm else math.inf)
    optimizer.step()
    return grad_norm.item()
