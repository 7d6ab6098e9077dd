"""Diffuser's temporal U-Net (Janner et al. 2022, diffuser/models/temporal.py) and its value function.

Input x is (batch, horizon, x_dim), channels last; convolutions run over the horizon.
`dim_mults` are absolute channel multipliers of `model_dim`, as in Diffuser:
(1, 2, 4, 8) gives widths 32, 64, 128, 256 for model_dim 32 (Diffuser's hopper/walker2d
setting; halfcheetah uses (1, 4, 8) with attention). CleanDiffuser's `dim_mult` is a
cumulative product: its [1, 2, 2, 2] is (1, 2, 4, 8) here.

Time and condition: sinusoidal(model_dim) -> 4*model_dim -> Mish -> model_dim, plus a
bias-free projection of the condition (`TimeConditionEmbedding`); every residual block adds
Linear(Mish(emb)) to its first convolution's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import TimeConditionEmbedding, TimeMLP
from .layers import Mish


def _conv_block(c_in: int, c_out: int, kernel_size: int, n_groups: int) -> nn.Sequential:
    """Conv1d (same length) -> GroupNorm -> Mish: Diffuser's Conv1dBlock."""
    return nn.Sequential(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                         nn.GroupNorm(n_groups, c_out), Mish())


class _ResidualTemporalBlock(nn.Module):
    """Two conv blocks; the embedding is added between them; 1x1 conv skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.conv1 = _conv_block(c_in, c_out, kernel_size, n_groups)
        self.conv2 = _conv_block(c_out, c_out, kernel_size, n_groups)
        self.emb_proj = nn.Sequential(Mish(), nn.Linear(emb_dim, c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(x) + self.emb_proj(emb).unsqueeze(-1)
        return self.conv2(h) + self.skip(x)


class _LinearAttention(nn.Module):
    """Residual linear attention over the horizon, pre-normalised over channels (Diffuser's optional block)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Conv1d(dim, 3 * heads * dim_head, 1, bias=False)
        self.to_out = nn.Conv1d(heads * dim_head, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, n = x.shape
        h = self.norm(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = self.to_qkv(h).view(b, 3, self.heads, self.dim_head, n).unbind(1)
        context = torch.einsum("bhdn,bhen->bhde", k.softmax(dim=-1), v)
        out = torch.einsum("bhde,bhdn->bhen", context, q * self.dim_head**-0.5)
        return x + self.to_out(out.reshape(b, -1, n))


class _Level(nn.Module):
    """One resolution: two residual temporal blocks, optional attention; `resample` is applied by the caller."""

    def __init__(self, block1: nn.Module, block2: nn.Module, attn: nn.Module, resample: nn.Module):
        super().__init__()
        self.block1, self.block2, self.attn, self.resample = block1, block2, attn, resample

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.block2(self.block1(h, emb), emb))


def _embedding(model_dim: int, cond_dim: int, time_embedding: str, concat: bool = False) -> TimeConditionEmbedding:
    return TimeConditionEmbedding(TimeMLP(model_dim, 4 * model_dim, model_dim, embedding=time_embedding), cond_dim,
                                  concat)


class JannerUNet1d(nn.Module):
    """Diffuser's temporal U-Net: eps or x0 prediction for whole trajectories.

    len(dim_mults) levels, each two residual temporal blocks (Conv1d k=5, GroupNorm(8), Mish);
    stride-2 conv down / transposed conv up between levels; optional linear attention per level.
    As in Diffuser, the full-resolution skip is not reused (the last up level upsamples to it).

    `concat_condition`: the blocks read [time embedding; condition] (width model_dim + cond_dim) instead of
    their sum, as Decision Diffuser's TemporalUnet with its returns embedding.

    Any horizon H >= 1: the horizon is padded at the end to a multiple of 2**(levels-1) by
    replicating the last step, then the output is cropped back to H. Padding is a function of
    the input alone, so the output is a deterministic function of the H real steps (GroupNorm
    statistics and the convolutions near the end do see the replicated steps).
    """

    def __init__(self, x_dim: int, cond_dim: int = 0, model_dim: int = 32, dim_mults: Sequence[int] = (1, 2, 4, 8),
                 kernel_size: int = 5, attention: bool = False, *, n_groups: int = 8,
                 time_embedding: str = "sinusoidal", concat_condition: bool = False):
        super().__init__()
        dims = [x_dim, *(model_dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        self.multiple = 2 ** (len(in_out) - 1)
        self.embedding = _embedding(model_dim, cond_dim, time_embedding, concat_condition)
        block = partial(_ResidualTemporalBlock, emb_dim=self.embedding.out_dim, kernel_size=kernel_size,
                        n_groups=n_groups)

        def attn(c: int) -> nn.Module:
            return _LinearAttention(c) if attention else nn.Identity()

        self.downs = nn.ModuleList(
            _Level(block(c_in, c_out), block(c_out, c_out), attn(c_out),
                   nn.Conv1d(c_out, c_out, 3, 2, 1) if i < len(in_out) - 1 else nn.Identity())
            for i, (c_in, c_out) in enumerate(in_out))
        mid = dims[-1]
        self.mid1, self.mid_attn, self.mid2 = block(mid, mid), attn(mid), block(mid, mid)
        self.ups = nn.ModuleList(
            _Level(block(2 * c_out, c_in), block(c_in, c_in), attn(c_in), nn.ConvTranspose1d(c_in, c_in, 4, 2, 1))
            for c_in, c_out in reversed(in_out[1:]))
        self.final = nn.Sequential(_conv_block(model_dim, model_dim, kernel_size, n_groups),
                                   nn.Conv1d(model_dim, x_dim, 1))

    def forward(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        horizon = x.shape[1]
        emb = self.embedding(t, condition)
        h = x.transpose(1, 2)
        pad = -horizon % self.multiple
        if pad:
            h = F.pad(h, (0, pad), mode="replicate")
        skips = []
        for level in self.downs:
            h = level(h, emb)
            skips.append(h)
            h = level.resample(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level in self.ups:
            h = level.resample(level(torch.cat([h, skips.pop()], dim=1), emb))
        return self.final(h)[..., :horizon].transpose(1, 2)


class HalfJannerUNet1d(nn.Module):
    """Diffuser's value function (ValueFunction in temporal.py): the U-Net's down path plus an MLP head.

    Each level downsamples (stride-2 conv, length ceil(L/2), so any horizon works unpadded), two
    more residual blocks halve then quarter the widest width with a downsample each, and the
    flattened features, concatenated with the time(+condition) embedding, go through
    Linear -> Mish -> Linear(out_dim). `horizon` may be any H >= 1, but the head's input size
    depends on it, so inputs must have exactly that horizon (checked: several horizons reduce
    to the same feature length and would otherwise pass silently). Output: (batch, out_dim).
    Diffuser uses kernel 5; CleanDiffuser 3.
    """

    def __init__(self, x_dim: int, out_dim: int = 1, cond_dim: int = 0, horizon: int = 32, model_dim: int = 32,
                 dim_mults: Sequence[int] = (1, 2, 4, 8), kernel_size: int = 5, *, n_groups: int = 8,
                 time_embedding: str = "sinusoidal"):
        super().__init__()
        dims = [x_dim, *(model_dim * m for m in dim_mults)]
        self.horizon = horizon
        self.embedding = _embedding(model_dim, cond_dim, time_embedding)
        block = partial(_ResidualTemporalBlock, emb_dim=model_dim, kernel_size=kernel_size, n_groups=n_groups)
        self.downs = nn.ModuleList(
            _Level(block(c_in, c_out), block(c_out, c_out), nn.Identity(), nn.Conv1d(c_out, c_out, 3, 2, 1))
            for c_in, c_out in zip(dims[:-1], dims[1:]))
        mid = dims[-1]
        self.mid1, self.mid_down1 = block(mid, mid // 2), nn.Conv1d(mid // 2, mid // 2, 3, 2, 1)
        self.mid2, self.mid_down2 = block(mid // 2, mid // 4), nn.Conv1d(mid // 4, mid // 4, 3, 2, 1)
        length = horizon
        for _ in range(len(dim_mults) + 2):  # each stride-2 conv maps L to ceil(L / 2)
            length = (length + 1) // 2
        fc_dim = mid // 4 * length
        self.head = nn.Sequential(nn.Linear(fc_dim + model_dim, fc_dim // 2), Mish(),
                                  nn.Linear(fc_dim // 2, out_dim))

    def forward(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        if x.shape[1] != self.horizon:
            raise ValueError(f"HalfJannerUNet1d was built for horizon {self.horizon}, got input horizon {x.shape[1]}")
        emb = self.embedding(t, condition)
        h = x.transpose(1, 2)
        for level in self.downs:
            h = level.resample(level(h, emb))
        h = self.mid_down1(self.mid1(h, emb))
        h = self.mid_down2(self.mid2(h, emb))
        return self.head(torch.cat([h.flatten(1), emb], dim=-1))
