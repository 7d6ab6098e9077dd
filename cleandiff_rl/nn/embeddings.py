"""Time embeddings shared by every backbone.

The time rule lives here and only here. A backbone receives `t` as a `(batch,)` tensor:

* integer dtype: a discrete step index 0..T-1, embedded as is;
* floating dtype: a continuous time in [0, 1], multiplied by `TIME_SCALE` (1000) first,

so a discrete model with T = 1000 and a continuous one see the same frequency range, and
`embed(torch.tensor([k])) == embed(torch.tensor([k / 1000.]))` up to float rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layers import activation

TIME_SCALE = 1000.0


def _time_scale(t: Tensor) -> float:
    """1000 for continuous (floating) time, 1 for discrete (integer) step indices."""
    return TIME_SCALE if t.is_floating_point() else 1.0


class SinusoidalEmbedding(nn.Module):
    """Fixed transformer-style embedding [sin(t f_i), cos(t f_i)], f_i = max_period^(-i / (dim/2 - 1)).

    As in DDPM / Diffuser's `SinusoidalPosEmb`. Frequencies and the pi/2 phase that turns the
    second half's sine into a cosine are cached buffers, so a call is one fused multiply-add
    and one sine (this runs 5-20 times per environment action in DQL-style policies).
    """

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"SinusoidalEmbedding needs an even dim, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / max(half - 1, 1))
        self.register_buffer("freqs", freqs.repeat(2), persistent=False)
        self.register_buffer("phase", torch.cat([torch.zeros(half), torch.full((half,), math.pi / 2)]),
                             persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        """(batch,) time -> (batch, dim)."""
        return torch.addcmul(self.phase, t.unsqueeze(-1), self.freqs, value=_time_scale(t)).sin()


class FourierEmbedding(nn.Module):
    """Learnable Fourier features [cos(2 pi t w), sin(2 pi t w)], w ~ N(0, scale^2) (IDQL).

    IDQL feeds the integer step (T = 5) with scale 0.2. Continuous time is multiplied by 1000
    first (module docstring), so the effective scale on [0, 1] is 1000 * scale: use
    scale ~ 0.016 to match CleanDiffuser's FourierEmbedding(scale=16) on [0, 1].
    """

    def __init__(self, dim: int, scale: float = 0.2):
        super().__init__()
        if dim % 2:
            raise ValueError(f"FourierEmbedding needs an even dim, got {dim}")
        self.weight = nn.Parameter(torch.randn(dim // 2) * scale)
        self.register_buffer("phase", torch.cat([torch.full((dim // 2,), math.pi / 2), torch.zeros(dim // 2)]),
                             persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        """(batch,) time -> (batch, dim); cos first, as in IDQL."""
        w = self.weight.repeat(2)
        return torch.addcmul(self.phase, t.unsqueeze(-1), w, value=2 * math.pi * _time_scale(t)).sin()


class TimeMLP(nn.Sequential):
    """embedding(emb_dim) -> Linear(hidden_dim) -> act -> Linear(out_dim): every backbone's time path.

    Settings of the originals: DQL sinusoidal 16 -> 32 -> Mish -> 16; IDQL Fourier 128 -> 256 ->
    swish -> 256; Diffuser sinusoidal 32 -> 128 -> Mish -> 32.
    """

    def __init__(self, emb_dim: int, hidden_dim: int, out_dim: int, *, embedding: str = "sinusoidal",
                 act: str = "mish", fourier_scale: float = 0.2):
        if embedding == "sinusoidal":
            emb: nn.Module = SinusoidalEmbedding(emb_dim)
        elif embedding == "fourier":
            emb = FourierEmbedding(emb_dim, scale=fourier_scale)
        else:
            raise ValueError(f"unknown time embedding {embedding!r}; choose 'sinusoidal' or 'fourier'")
        super().__init__(emb, nn.Linear(emb_dim, hidden_dim), activation(act), nn.Linear(hidden_dim, out_dim))
        self.out_dim = out_dim


class TimeConditionEmbedding(nn.Module):
    """time_mlp(t) + W condition: one embedding vector that modulates a sequence backbone.

    The condition is added through a bias-free linear map (the time MLP already has biases),
    so the null condition (zeros) and `condition=None` give bit-identical embeddings and the
    None path costs nothing. A module built with cond_dim=0 ignores any condition.
    `concat=True` instead returns [time_mlp(t); condition] (Decision Diffuser's TemporalUnet).
    """

    def __init__(self, time_mlp: TimeMLP, cond_dim: int = 0, concat: bool = False):
        super().__init__()
        self.time_mlp = time_mlp
        self.cond_proj = nn.Linear(cond_dim, time_mlp.out_dim, bias=False) if cond_dim and not concat else None
        self.concat_dim = cond_dim if concat else 0  # Decision Diffuser's [time; condition], width time + cond_dim
        self.out_dim = time_mlp.out_dim + self.concat_dim

    def forward(self, t: Tensor, condition: Tensor | None = None) -> Tensor:
        """(batch,) time, (batch, cond_dim) condition or None -> (batch, out_dim)."""
        emb = self.time_mlp(t)
        if self.concat_dim:  # condition None: the null condition, zeros
            cond = emb.new_zeros(emb.shape[0], self.concat_dim) if condition is None else condition
            return torch.cat([emb, cond], dim=-1)
        if condition is None or self.cond_proj is None:
            return emb
        return emb + self.cond_proj(condition)
