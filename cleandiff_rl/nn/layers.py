"""Small shared building blocks: the activation lookup and a plain MLP builder."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "mish": nn.Mish,
    "silu": nn.SiLU,
    "swish": nn.SiLU,  # the JAX name used by IDQL
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name: mish, silu/swish, relu, gelu, tanh."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int, act: str = "mish") -> nn.Sequential:
    """in -> [Linear -> act] per hidden width -> Linear(out); no activation on the output."""
    dims = [in_dim, *hidden_dims]
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), activation(act)]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)
