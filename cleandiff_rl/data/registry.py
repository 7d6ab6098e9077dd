"""Which tasks the builder knows, their D4RL reference scores, dataset ids, and normalized scores."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from minari.dataset.minari_dataset import DATASET_ID_RE


@dataclass(frozen=True)
class TaskInfo:
    """A MuJoCo task: its gymnasium id and D4RL's reference returns (random policy, expert)."""

    env_id: str
    ref_min_score: float
    ref_max_score: float


# D4RL's published constants (d4rl/infos.py, the -v2 locomotion datasets). Minari's own MuJoCo
# datasets carry none, so these are the defaults everywhere in cleandiff_rl.
TASKS: dict[str, TaskInfo] = {
    "hopper": TaskInfo("Hopper-v5", -20.272305, 3234.3),
    "halfcheetah": TaskInfo("HalfCheetah-v5", -280.178953, 12135.0),
    "walker2d": TaskInfo("Walker2d-v5", 1.629008, 4592.3),
    "ant": TaskInfo("Ant-v5", -325.6, 3879.7),
}
LEVELS = ("random", "medium", "medium-replay", "expert", "medium-expert")
DEFAULT_NAMESPACE = "cleandiff"
BUILD_SCRIPT = "python pipelines/make_dataset.py"


def datasets_root() -> Path:
    """The Minari datasets root (`MINARI_DATASETS_PATH`, else ~/.minari/datasets), not created."""
    env = os.environ.get("MINARI_DATASETS_PATH")
    return Path(env) if env else Path.home() / ".minari" / "datasets"


def parse_id(dataset_id: str) -> tuple[str | None, str, int]:
    """Split `namespace/name-vN` into (namespace, name, version); ValueError when malformed."""
    match = DATASET_ID_RE.fullmatch(dataset_id) if isinstance(dataset_id, str) else None
    if match is None or match.group("version") is None:
        raise ValueError(
            f"malformed dataset id {dataset_id!r}: expected '[namespace/]name-vN', "
            f"e.g. '{DEFAULT_NAMESPACE}/hopper/medium-v0'"
        )
    namespace, name, version = match.group("namespace", "dataset", "version")
    return namespace or None, name, int(version)


def dataset_id(env: str, level: str, namespace: str = DEFAULT_NAMESPACE, version: int = 0) -> str:
    """The id the builder writes, e.g. `cleandiff/hopper/medium-v0`."""
    return f"{namespace}/{env}/{level}-v{version}"


def task_of(dataset_id: str) -> str | None:
    """The task name ('hopper', ...) an id refers to, or None: the last namespace part."""
    namespace, _, _ = parse_id(dataset_id)
    env = (namespace or "").rsplit("/", 1)[-1]
    return env if env in TASKS else None


def build_command(dataset_id: str) -> str | None:
    """The shell command that builds `dataset_id` locally, or None when the builder cannot."""
    namespace, name, version = parse_id(dataset_id)
    env = task_of(dataset_id)
    if env is None or name not in LEVELS or "/" not in namespace:
        return None
    prefix = namespace.rsplit("/", 1)[0]
    cmd = f"{BUILD_SCRIPT} env={env}"
    if prefix != DEFAULT_NAMESPACE:
        cmd += f" namespace={prefix}"
    if version != 0:
        cmd += f" version={version}"
    return cmd


def reference_scores(dataset_or_env_id: Any) -> tuple[float, float]:
    """(ref_min_score, ref_max_score) for a MinariDataset, a dataset id, an env id or a task name.

    A dataset's stored references win (a local dataset id is read without loading its data);
    otherwise the D4RL table, by task name.
    """
    metadata = getattr(getattr(dataset_or_env_id, "storage", None), "metadata", None)
    if metadata is not None:
        if metadata.get("ref_min_score") is not None and metadata.get("ref_max_score") is not None:
            return float(metadata["ref_min_score"]), float(metadata["ref_max_score"])
        dataset_or_env_id = metadata["dataset_id"]
    key = str(dataset_or_env_id)
    if "/" in key:  # a dataset id
        data_path = datasets_root() / key / "data"
        if data_path.is_dir():
            from minari.dataset.minari_storage import MinariStorage

            stored = MinariStorage.read_raw_metadata(str(data_path))
            if stored.get("ref_min_score") is not None and stored.get("ref_max_score") is not None:
                return float(stored["ref_min_score"]), float(stored["ref_max_score"])
        task = task_of(key)
    else:  # 'Hopper-v5', 'hopper'
        task = key.split("-v")[0].lower()
    if task not in TASKS:
        raise ValueError(
            f"no reference scores for {key!r}: not a dataset with stored references and not one of "
            f"the tasks {sorted(TASKS)} (or their gymnasium ids)"
        )
    return TASKS[task].ref_min_score, TASKS[task].ref_max_score


def normalized_score(dataset_or_env_id: Any, returns: Any) -> np.ndarray | float:
    """D4RL-normalized score x100 (0 = random policy, 100 = expert), as papers report it."""
    lo, hi = reference_scores(dataset_or_env_id)
    score = 100.0 * (np.asarray(returns, dtype=np.float64) - lo) / (hi - lo)
    return float(score) if score.ndim == 0 else score
