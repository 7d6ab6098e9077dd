"""MLP backbones for diffusion policies: x is an action (batch, x_dim), the condition is the state.

These run 5-20 times per environment action at batch 1, so forward is a handful of fused ops:
no checks, no Python loops beyond nn.Sequential, one allocation only for a missing condition.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .embeddings import TimeMLP
from .layers import Mish, activation, mlp


class _MLPBackbone(nn.Module):
    """concat[x, time_mlp(t), condition] -> net; subclasses build `time_mlp` and `net`."""

    cond_dim: int
    time_mlp: nn.Module
    net: nn.Module

    def forward(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        if not self.cond_dim:
            return self.net(torch.cat([x, self.time_mlp(t)], -1))
        if condition is None:
            condition = x.new_zeros(x.shape[0], self.cond_dim)
        return self.net(torch.cat([x, self.time_mlp(t), condition], -1))


class DQLMlp(_MLPBackbone):
    """Diffusion-QL actor (Wang et al. 2023, agents/model.py).

    concat[x, time_emb, condition] -> 3 x (Linear hidden_dim + Mish) -> Linear(x_dim), with time
    sinusoidal(emb_dim) -> 2*emb_dim -> Mish -> emb_dim. Original: emb_dim 16; CleanDiffuser: 64.
    """

    def __init__(self, x_dim: int, cond_dim: int = 0, emb_dim: int = 16, hidden_dim: int = 256, *,
                 time_embedding: str = "sinusoidal"):
        super().__init__()
        self.cond_dim = cond_dim
        self.time_mlp = TimeMLP(emb_dim, 2 * emb_dim, emb_dim, embedding=time_embedding, act="mish")
        self.net = nn.Sequential(
            nn.Linear(x_dim + emb_dim + cond_dim, hidden_dim), Mish(),
            nn.Linear(hidden_dim, hidden_dim), Mish(),
            nn.Linear(hidden_dim, hidden_dim), Mish(),
            nn.Linear(hidden_dim, x_dim),
        )


class _ResidualBlock(nn.Module):
    """x + Linear(act(Linear_4h(LayerNorm(Dropout(x))))): IDQL's MLPResNetBlock (LayerNorm eps 1e-6, flax's)."""

    def __init__(self, dim: int, dropout: float, act: str):
        super().__init__()
        self.body = nn.Sequential(nn.Dropout(dropout), nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim),
                                  activation(act), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class IDQLMlp(_MLPBackbone):
    """IDQL actor (Hansen-Estruch et al. 2023, jaxrl5 networks/resnet.py): an LN-ResNet.

    concat[x, time_emb, condition] -> Linear hidden_dim -> n_blocks residual blocks -> act ->
    Linear(x_dim). Time: learnable Fourier(emb_dim) -> 2*emb_dim -> act -> 2*emb_dim; the
    original uses emb_dim 128, swish (SiLU) everywhere, dropout 0.1. CleanDiffuser's variant
    uses Mish (act="mish") and no activation before the output layer.
    """

    def __init__(self, x_dim: int, cond_dim: int = 0, emb_dim: int = 128, hidden_dim: int = 256,
                 n_blocks: int = 3, dropout: float = 0.1, *, act: str = "silu", time_embedding: str = "fourier",
                 fourier_scale: float = 0.2):
        super().__init__()
        self.cond_dim = cond_dim
        self.time_mlp = TimeMLP(emb_dim, 2 * emb_dim, 2 * emb_dim, embedding=time_embedding, act=act,
                                fourier_scale=fourier_scale)
        self.net = nn.Sequential(
            nn.Linear(x_dim + 2 * emb_dim + cond_dim, hidden_dim),
            *(_ResidualBlock(hidden_dim, dropout, act) for _ in range(n_blocks)),
            activation(act),
            nn.Linear(hidden_dim, x_dim),
        )


class FlowMlp(nn.Module):
    """FQL's velocity field (Park et al. 2025): concat[x, t, condition] -> n_layers x (Linear hidden_dim +
    GELU, flax's tanh form) -> Linear(x_dim). The time enters as the raw scalar in [0, 1], with no embedding.

    data_at_one (the original's): the network reads s = 1 - t, the original's time (noise at 0, data at 1),
    and outputs the original's velocity x_data - noise, negated here into this project's v = eps - x0 at t.
    The same function either way, but Adam follows another path when the time input is flipped.
    """

    def __init__(self, x_dim: int, cond_dim: int = 0, hidden_dim: int = 512, n_layers: int = 4,
                 act: str = "gelu_tanh", data_at_one: bool = True):
        super().__init__()
        self.cond_dim, self.data_at_one = cond_dim, data_at_one
        self.net = mlp(x_dim + 1 + cond_dim, (hidden_dim,) * n_layers, x_dim, act)

    def forward(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        if self.cond_dim and condition is None:
            condition = x.new_zeros(x.shape[0], self.cond_dim)
        t = t.to(x.dtype)[:, None]
        parts = [x, 1.0 - t if self.data_at_one else t] + ([condition] if self.cond_dim else [])
        out = self.net(torch.cat(parts, -1))
        return -out if self.data_at_one else out
