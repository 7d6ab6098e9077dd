"""Neural networks for diffusion: backbones, time embeddings, condition encoders.

Backbone contract: `forward(x, t, condition=None) -> Tensor` shaped like x, with t a (batch,)
tensor (integer = discrete step index, float = continuous time in [0, 1]; see `embeddings`)
and condition an encoder's (batch, cond_dim) output or None (= the null condition, zeros).
MLPs take x (batch, x_dim); sequence backbones x (batch, horizon, x_dim), any horizon >= 1.
"""

from .conditions import IdentityCondition, MLPCondition
from .dit import DiT1d
from .embeddings import TIME_SCALE, FourierEmbedding, SinusoidalEmbedding, TimeConditionEmbedding, TimeMLP
from .layers import Mish, activation, mlp
from .mlp import DQLMlp, FlowMlp, IDQLMlp
from .unet import HalfJannerUNet1d, JannerUNet1d

__all__ = [
    "TIME_SCALE", "SinusoidalEmbedding", "FourierEmbedding", "TimeMLP", "TimeConditionEmbedding",
    "IdentityCondition", "MLPCondition", "DQLMlp", "IDQLMlp", "FlowMlp", "JannerUNet1d", "HalfJannerUNet1d", "DiT1d",
    "Mish", "activation", "mlp",
]
