"""Per-dimension normalizers fitted on a dataset; their state goes into every checkpoint."""

from __future__ import annotations

import torch


class Normalizer:
    """Affine map x -> (x - shift) / scale per dimension, with an exact inverse."""

    kind = "base"

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor):
        self.shift, self.scale = shift, scale

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift

    def to(self, device: torch.device | str) -> Normalizer:
        self.shift, self.scale = self.shift.to(device), self.scale.to(device)
        return self

    def state_dict(self) -> dict:
        return {"kind": self.kind, "shift": self.shift.detach().cpu(), "scale": self.scale.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"cannot load a {state['kind']!r} normalizer state into a {self.kind!r} normalizer")
        device = self.shift.device
        self.shift, self.scale = state["shift"].to(device), state["scale"].to(device)


class GaussianNormalizer(Normalizer):
    """Zero mean, unit variance per dimension; constant dimensions are only centered."""

    kind = "gaussian"

    @classmethod
    def fit(cls, x: torch.Tensor) -> GaussianNormalizer:
        x = x.reshape(-1, x.shape[-1]).double()
        std = x.std(0, unbiased=False)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        return cls(x.mean(0).float(), std.float())


class MinMaxNormalizer(Normalizer):
    """Maps [min, max] to [-1, 1] per dimension (Diffuser's LimitsNormalizer); constant dims go to -1."""

    kind = "minmax"

    @classmethod
    def fit(cls, x: torch.Tensor) -> MinMaxNormalizer:
        x = x.reshape(-1, x.shape[-1]).double()
        lo, hi = x.min(0).values, x.max(0).values
        half_range = torch.where(hi > lo, (hi - lo) / 2, torch.full_like(lo, 0.5))
        return cls((lo + half_range).float(), half_range.float())


NORMALIZERS = {cls.kind: cls for cls in (GaussianNormalizer, MinMaxNormalizer)}


def fit_normalizer(kind: str, x: torch.Tensor) -> Normalizer:
    """Fit a normalizer by name: 'gaussian' or 'minmax'."""
    if kind not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {kind!r}; choose one of {sorted(NORMALIZERS)}")
    return NORMALIZERS[kind].fit(x)


def normalizer_from_state(state: dict, device: torch.device | str = "cpu") -> Normalizer:
    """Rebuild a normalizer from its `state_dict()` (e.g. from a checkpoint)."""
    if state.get("kind") not in NORMALIZERS:
        raise ValueError(f"not a normalizer state: kind {state.get('kind')!r}")
    return NORMALIZERS[state["kind"]](state["shift"], state["scale"]).to(device)
