"""Condition encoders: raw condition -> (batch, out_dim) embedding, with the null condition as zeros.

Every encoder has `forward(condition, mask=None)`. `mask` is a (batch,) 0/1 tensor; rows with
mask 0 get the null embedding, exactly zero. With `mask=None`, training mode drops each row
with probability `dropout` (classifier-free guidance label dropout, Ho & Salimans 2022;
Decision Diffuser uses 0.25) and eval mode keeps every row. For CFG sampling the diffusion
model calls `encoder(cat[c, c], mask=cat[ones, zeros])` once and reuses the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .layers import mlp


class _Condition(nn.Module):
    """Applies the mask / label dropout to the output of `encode`."""

    def __init__(self, out_dim: int, dropout: float):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"condition dropout must be in [0, 1), got {dropout}")
        self.out_dim = out_dim
        self.dropout = dropout

    def encode(self, condition: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, condition: Tensor, mask: Tensor | None = None) -> Tensor:
        emb = self.encode(condition)
        if mask is None:
            if not (self.training and self.dropout > 0.0):
                return emb
            mask = torch.rand(emb.shape[0], device=emb.device) >= self.dropout
        return emb.masked_fill(mask.view(-1, *(1,) * (emb.dim() - 1)) == 0, 0.0)


class IdentityCondition(_Condition):
    """Passes an already-suitable condition (e.g. the state in DQL/IDQL) through; `dim` is its width."""

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__(dim, dropout)

    def encode(self, condition: Tensor) -> Tensor:
        return condition


class MLPCondition(_Condition):
    """in_dim -> hidden_dims (act) -> out_dim. Decision Diffuser's return encoder is
    MLPCondition(1, 128, hidden_dims=(128, 512)) with Mish; CleanDiffuser's is (1, 128, (128,)) with SiLU."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dims: Sequence[int] = (128,), dropout: float = 0.0,
                 act: str = "mish"):
        super().__init__(out_dim, dropout)
        self.net = mlp(in_dim, hidden_dims, out_dim, act)

    def encode(self, condition: Tensor) -> Tensor:
        return self.net(condition)
