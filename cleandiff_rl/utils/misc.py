"""Device selection, seeding and timing."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np
import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`"auto"`/None picks CUDA when present, else CPU; anything else is passed to torch."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def mean_call_seconds(fn: Callable[[], object], min_seconds: float) -> float:
    """Mean wall time of one call of `fn` over a block of calls lasting at least `min_seconds`."""
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or calls == 0:
        fn()
        calls += 1
    return elapsed / calls
