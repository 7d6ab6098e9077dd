"""Recorded random draws for the parity tests: torch's random functions replaced by ones that serve the original's
draws in order, so this project's update sees exactly the noise the original saw."""

from __future__ import annotations

import numpy as np
import pytest
import torch


class Draws:
    """torch.randn / randn_like / randint serving recorded tensors in order; a call of another kind or shape fails."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.queue: list[tuple[str, torch.Tensor]] = []
        monkeypatch.setattr(torch, "randn", self.randn)
        monkeypatch.setattr(torch, "randn_like", lambda x, **kw: self.pop("randn", x.shape))
        monkeypatch.setattr(torch, "randint", self.randint)

    def add(self, kind: str, value) -> None:
        self.queue.append((kind, torch.as_tensor(value)))

    def pop(self, kind: str, shape) -> torch.Tensor:
        assert self.queue, f"unexpected {kind}{tuple(shape)} draw: the recorded draws are used up"
        got, value = self.queue.pop(0)
        drawn, recorded = (kind, tuple(shape)), (got, tuple(value.shape))
        assert drawn == recorded, f"drew {drawn}, recorded {recorded}"
        return value.clone()

    def randn(self, *size, **kw):
        return self.pop("randn", size[0] if len(size) == 1 and not isinstance(size[0], int) else size)

    def randint(self, *args, **kw):
        return self.pop("randint", kw.get("size", args[-1])).long()

    def chain(self, x_T: np.ndarray, z: np.ndarray, sigma_T: float) -> None:
        """One DDPM chain's draws as this project makes them: x_T / sigma_T (this project scales x_T by sigma_T,
        the originals draw N(0, I)), then the noise of every level but t = 0 (the originals draw one there and
        mask it; this project draws none)."""
        self.add("randn", torch.from_numpy(x_T) / sigma_T)
        for step in z[:-1]:
            self.add("randn", step)
