"""Load a Minari dataset: local first, remote only when it can work, else fail fast with a build hint."""

from __future__ import annotations

import importlib.util
import os
import socket
from urllib.parse import urlparse

import minari

from cleandiff_rl.data.registry import LEVELS, TASKS, build_command, datasets_root, parse_id

PROBE_TIMEOUT_S = 2.0


class DatasetUnavailableError(FileNotFoundError):
    """The dataset is not local and cannot be downloaded; the message says how to build it."""


def _remote_unreachable_reason() -> str | None:
    """Why minari's Hugging Face download cannot work right now, or None when it might."""
    if importlib.util.find_spec("huggingface_hub") is None:
        return "minari's download needs huggingface_hub (pip install 'minari[hf]'), which is not installed"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{host}:443 is unreachable ({exc.__class__.__name__}: {exc})"
    return None


def _unavailable(dataset_id: str, reason: str) -> DatasetUnavailableError:
    cmd = build_command(dataset_id)
    if cmd is not None:
        namespace = dataset_id.rsplit("/", 1)[0]
        version = dataset_id.rsplit("-v", 1)[1]
        levels = ", ".join(f"{namespace}/{level}-v{version}" for level in LEVELS)
        hint = f"Build it locally with:\n    {cmd}\nwhich writes {levels}."
    else:
        hint = (
            "cleandiff_rl cannot build this id; it builds '<namespace>/<task>/<level>-vN' for tasks "
            f"{sorted(TASKS)} and levels {list(LEVELS)}, e.g. 'python pipelines/make_dataset.py env=hopper'."
        )
    return DatasetUnavailableError(
        f"Dataset {dataset_id!r} is not in the local Minari root {datasets_root()} "
        f"(MINARI_DATASETS_PATH) and cannot be downloaded: {reason}.\n{hint}"
    )


def load_dataset(dataset_id: str, download: bool = True) -> minari.MinariDataset:
    """Open a Minari dataset by id: the local copy when present, else minari's download.

    Offline (or without minari's hf extra) this fails within about `PROBE_TIMEOUT_S` seconds,
    instead of after minari's retry loop, with a `DatasetUnavailableError` naming the local
    build command. A malformed id raises ValueError before anything touches the disk.
    """
    parse_id(dataset_id)
    if (datasets_root() / dataset_id / "data").is_dir():
        return minari.load_dataset(dataset_id)
    reason = "download=False" if not download else _remote_unreachable_reason()
    if reason is not None:
        raise _unavailable(dataset_id, reason)
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as exc:  # unknown remote id, remote failure
        raise _unavailable(dataset_id, f"minari's download failed ({exc.__class__.__name__}: {exc})") from exc
