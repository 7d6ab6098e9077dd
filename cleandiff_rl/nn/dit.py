"""DiT over the horizon (Peebles & Xie 2023, adapted to 1-D trajectories as in CleanDiffuser's DiT1d).

x (batch, horizon, x_dim) is projected to d_model tokens, one per step, plus a fixed sinusoidal
position embedding (valid for any horizon). Each block is self-attention + MLP, both modulated by
adaLN-Zero from emb = time embedding + condition projection: shift/scale of the LayerNorm and a
gate on the residual branch, all produced by a zero-initialised linear map, so every block
starts as the identity and the zero-initialised output layer makes the initial prediction 0.
CleanDiffuser's Decision Diffuser setting: d_model 320, n_heads 10, depth 2, emb_dim 128 with
Fourier time features of scale 16 on t in [0, 1]. Our Decision Diffuser passes time_embedding="fourier"
with the default fourier_scale 0.2, which on continuous time (x1000, see FourierEmbedding) is a scale
of 200, not 16; fourier_scale=0.016 would match CleanDiffuser.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .embeddings import SinusoidalEmbedding, TimeConditionEmbedding, TimeMLP


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift, x, 1 + scale)


def _zero_linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class _DiTBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(4 * d_model, d_model))
        self.ada = nn.Sequential(nn.SiLU(), _zero_linear(d_model, 6 * d_model))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(emb).unsqueeze(1).chunk(6, dim=-1)
        h = _modulate(self.norm1(x), shift1, scale1)
        x = x + gate1 * self.attn(h, h, h, need_weights=False)[0]
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT1d(nn.Module):
    """Transformer backbone for trajectories: forward(x, t, condition) -> shape of x.

    Time: sinusoidal(emb_dim) -> d_model -> Mish -> d_model (or Fourier, `time_embedding`),
    plus a bias-free projection of the condition.
    """

    def __init__(self, x_dim: int, cond_dim: int = 0, d_model: int = 384, n_heads: int = 6, depth: int = 2,
                 dropout: float = 0.0, *, emb_dim: int = 128, time_embedding: str = "sinusoidal",
                 fourier_scale: float = 0.2):
        super().__init__()
        self.x_proj = nn.Linear(x_dim, d_model)
        self.pos_emb = SinusoidalEmbedding(d_model)
        self.embedding = TimeConditionEmbedding(
            TimeMLP(emb_dim, d_model, d_model, embedding=time_embedding, fourier_scale=fourier_scale), cond_dim)
        self.blocks = nn.ModuleList(_DiTBlock(d_model, n_heads, dropout) for _ in range(depth))
        self.final_norm = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), _zero_linear(d_model, 2 * d_model))
        self.final = _zero_linear(d_model, x_dim)

    def forward(self, x: Tensor, t: Tensor, condition: Tensor | None = None) -> Tensor:
        positions = torch.arange(x.shape[1], device=x.device)  # integer: embedded as is
        h = self.x_proj(x) + self.pos_emb(positions)
        emb = self.embedding(t, condition)
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.final_ada(emb).unsqueeze(1).chunk(2, dim=-1)
        return self.final(_modulate(self.final_norm(h), shift, scale))
