"""Normalized scores of BC, Diffusion BC, Diffusion-QL and IDQL (or any `algos`) at a stated training budget.

Each algorithm trains through pipelines/train.py (in `jobs` parallel processes); every final
checkpoint, and each of its `act_variants`, is then evaluated on the same seeds (`jobs` at a time).
Rerunning with the same run_dir resumes unfinished trainings and evaluates only what is new: each
cell's result is kept in run_dir/<algo>/evaluations/ and reused while its checkpoint, settings,
episodes and seed are the same (add `act_variants` and only those run). Prints a table (with the
dataset's own average and the wall time of each training run) and writes results.json /
results.csv / TensorBoard in run_dir.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cleandiff_rl.agents import Agent, load_policy
from cleandiff_rl.data import normalized_score, read_episodes
from cleandiff_rl.evaluation import evaluate, write_atomic
from cleandiff_rl.training import compose_config
from cleandiff_rl.utils import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def use_datasets_root(setting: str, dataset_id: str) -> None:
    """Point MINARI_DATASETS_PATH at the benchmark datasets when asked to and they hold `dataset_id`."""
    if setting == "auto":
        if (SHARED_DATASETS / dataset_id).is_dir():
            os.environ["MINARI_DATASETS_PATH"] = str(SHARED_DATASETS)
    else:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(setting).resolve())


def train_one(cfg: DictConfig, algo: str, run_dir: Path) -> float:
    """Train (or resume) one algorithm in a subprocess (one torch thread); return the run's wall time in
    seconds, as its checkpoint records it (so a finished run that is only re-evaluated keeps its time)."""
    overrides = [f"algo={algo}", f"task={cfg.task}", f"dataset={cfg.dataset}", f"steps={cfg.steps[algo]}",
                 f"seed={cfg.seed}", f"device={cfg.device}", f"eval_every={cfg.eval_every}", "eval_episodes=5",
                 f"run_dir={run_dir}"]
    if cfg.batch_size[algo] is not None:
        overrides.append(f"batch_size={cfg.batch_size[algo]}")
    overrides += [f"algo.params.{key}={value}" for key, value in (cfg.params.get(algo) or {}).items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{algo}.log", "a") as log:
        subprocess.run([sys.executable, str(REPO / "pipelines" / "train.py"), *overrides], check=True, env=env,
                       stdout=log, stderr=subprocess.STDOUT)
    return load_checkpoint(run_dir / "checkpoint.pt")["wall_seconds"]


def with_settings(policy: Agent, settings: dict) -> Agent:
    """`policy` acting with other settings: solver / steps / temperature, or any field of its config."""
    sampling = {key: settings.pop(key) for key in ("solver", "steps", "temperature") if key in settings}
    for key, value in settings.items():
        if not hasattr(policy.config, key):
            raise ValueError(f"{policy.name} has no setting {key!r}")
        setattr(policy.config, key, value)
    return policy.set_sampling(**sampling)


@hydra.main(config_path="../configs", config_name="benchmark_quality", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = Path(cfg.run_dir)
    if cfg.dataset is None:
        cfg.dataset = compose_config([f"task={cfg.task}"]).dataset
    dataset_id = cfg.dataset
    use_datasets_root(cfg.datasets_root, dataset_id)
    episodes = read_episodes(dataset_id)
    dataset_score = float(np.mean(normalized_score(dataset_id, np.add.reduceat(episodes.rew.astype(np.float64),
                                                                                  episodes.starts))))
    print(f"dataset {dataset_id} ({os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')}): "
          f"{len(episodes.lengths)} episodes, {len(episodes.rew)} steps, average score {dataset_score:.1f}")

    with ThreadPoolExecutor(cfg.jobs) as pool:
        walls = dict(zip(cfg.algos, pool.map(lambda a: train_one(cfg, a, out / a), cfg.algos)))

    batch_sizes = {algo: cfg.batch_size[algo] or compose_config([f"algo={algo}"]).batch_size for algo in cfg.algos}
    cells = []  # (algo, row label, act settings): each algorithm's default acting, then its variants
    for algo in cfg.algos:
        variants = cfg.act_variants.get(algo) or {}
        cells += [(algo, algo, {})] + [(algo, f"{algo} ({name})", dict(settings)) for name, settings in variants.items()]

    def evaluate_cell(cell: tuple[str, str, dict]) -> dict:
        algo, label, settings = cell
        key = {"settings": settings, "episodes": cfg.episodes, "seed": cfg.seed + 1000, "run_seconds": walls[algo]}
        cache = out / algo / "evaluations" / f"{re.sub(r'[^A-Za-z0-9.=_-]+', '_', label)}.json"
        cached = json.loads(cache.read_text()) if cache.is_file() else None
        if cached is not None and cached["key"] == key:
            result = cached["result"]
        else:
            policy = with_settings(load_policy(str(out / algo / "checkpoint.pt"), cfg.device), dict(settings))
            result = evaluate(policy, episodes=cfg.episodes, seed=cfg.seed + 1000)
            cache.parent.mkdir(exist_ok=True)
            write_atomic(cache, lambda f: json.dump({"key": key, "result": result}, f))
        return {"algo": label, "steps": cfg.steps[algo], "batch_size": batch_sizes[algo],
                "train_minutes": walls[algo] / 60, "score_mean": result["score_mean"],
                "score_se": result["score_se"], "return_mean": result["return_mean"]}

    torch.set_num_threads(1)  # `jobs` evaluations share the cores, one thread each
    with ThreadPoolExecutor(cfg.jobs) as pool:
        evaluated = list(tqdm(pool.map(evaluate_cell, cells), total=len(cells), desc=f"evaluate x{cfg.episodes}"))
    rows = [{"algo": "dataset average", "steps": 0, "batch_size": 0, "train_minutes": 0.0,
             "score_mean": dataset_score, "score_se": float("nan"), "return_mean": float("nan")}, *evaluated]
    writer = SummaryWriter(str(out / "tb"))
    for row in evaluated:
        writer.add_scalar(f"benchmark/score/{row['algo']}", row["score_mean"], row["steps"])
    writer.close()

    (out / "results.json").write_text(json.dumps({"dataset": dataset_id, "rows": rows}, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        table = csv.DictWriter(f, fieldnames=list(rows[0]))
        table.writeheader()
        table.writerows(rows)
    print(f"\n{'algo':<26}{'updates':>9}{'batch':>7}{'train min':>11}{'score':>16}{'return':>9}")
    for r in rows:
        score = f"{r['score_mean']:.1f}" + (f" ± {r['score_se']:.1f}" if np.isfinite(r["score_se"]) else "")
        print(f"{r['algo']:<26}{r['steps']:>9}{r['batch_size']:>7}{r['train_minutes']:>11.1f}{score:>16}"
              f"{r['return_mean']:>9.0f}")
    print(f"\nresults: {out / 'results.json'}   TensorBoard: tensorboard --logdir {out}")


if __name__ == "__main__":
    main()
