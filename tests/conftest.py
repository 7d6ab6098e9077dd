"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def minari_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, private Minari datasets root (MINARI_DATASETS_PATH) for one test."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread: the tests' networks are small, and two threads per process on a busy
    2-core machine slow them down tenfold."""
    import torch

    torch.set_num_threads(1)
