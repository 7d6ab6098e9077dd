"""The main job: dataset -> diffusion policy -> solver x steps sweep, offline, in about 10 minutes on 2 cores.

See configs/quickstart.yaml. Prints the score table (normalized score, NFE per solver and steps), how the
policy acts, and whether it beats its dataset's average; writes score_vs_nfe.png, the table files and
TensorBoard logs in run_dir.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from itertools import product
from multiprocessing import get_context
from pathlib import Path

import torch
from omegaconf import DictConfig

from cleandiff_rl.agents import load_policy
from cleandiff_rl.agents.acting import describe
from cleandiff_rl.data import dataset_average
from cleandiff_rl.data.builder import build_datasets
from cleandiff_rl.data.registry import LEVELS, dataset_id, datasets_root
from cleandiff_rl.evaluation import sweep, sweep_table, write_sweep
from cleandiff_rl.plotting import metric_vs_nfe
from cleandiff_rl.training import compose_config, register_configs, train
from cleandiff_rl.utils.cli import pipeline

register_configs()  # the algo group's settings schemas

_POLICIES: dict[str, object] = {}  # a sweep worker's loaded policy, per checkpoint


def sweep_cell(checkpoint: str, device: str, solver: str, steps: int, episodes: int, seed: int) -> dict:
    """One (solver, steps) cell of the sweep, in a worker process (one torch thread) that keeps its policy."""
    torch.set_num_threads(1)
    if checkpoint not in _POLICIES:
        _POLICIES[checkpoint] = load_policy(checkpoint, device)
    return sweep(_POLICIES[checkpoint], solvers=[solver], steps=[steps], episodes=episodes, seed=seed,
                 progress=False)[0]


def sweep_parallel(checkpoint: str, cfg: DictConfig) -> list[dict]:
    """Every (solver, steps) cell, `jobs` processes at a time; rows in solver x steps order."""
    cells = list(product(cfg.solvers, cfg.steps))
    rows: dict[tuple[str, int], dict] = {}
    with ProcessPoolExecutor(cfg.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(sweep_cell, checkpoint, cfg.device, s, n, cfg.episodes, cfg.seed): (s, n)
                   for s, n in cells}
        for done, future in enumerate(as_completed(futures), start=1):
            row = future.result()
            rows[futures[future]] = row
            cell = "error" if row["error"] else f"score {row['score_mean']:.1f}, nfe {row['nfe']}"
            print(f"      {done:>2}/{len(cells)} {row['solver']} x {row['steps']} steps: {cell}", flush=True)
    return [rows[c] for c in cells]


def write_tensorboard(rows: list[dict], tb_dir: Path) -> None:
    """sweep/score/<solver> and sweep/return/<solver> against NFE, replacing an earlier run's scalars."""
    from torch.utils.tensorboard import SummaryWriter

    for previous in tb_dir.glob("events.out.tfevents.*"):
        previous.unlink()
    with SummaryWriter(str(tb_dir)) as writer:
        for r in rows:
            if not r["error"]:
                writer.add_scalar(f"sweep/score/{r['solver']}", r["score_mean"], r["nfe"])
                writer.add_scalar(f"sweep/return/{r['solver']}", r["return_mean"], r["nfe"])


def acting_line(rows: list[dict], checkpoint: str, device: str) -> str:
    """How the policy acted: the evaluation's own record of it, else its acting rule in words."""
    recorded = next((r["acting"] for r in rows if r.get("acting")), None)
    if recorded:
        return recorded
    settings = load_policy(checkpoint, device).act_settings()
    if "selection" not in settings:
        return "deterministic"
    rule = describe(settings["selection"], settings.get("num_candidates", 1), settings["solver"])
    return f"{rule} (selection={settings['selection']}; the rules: docs/algorithms.md#acting)"


def verdict(rows: list[dict], average: float, data_id: str) -> str:
    """Whether the policy beats the data, in plain words."""
    scored = [r for r in rows if not r["error"] and r["score_mean"] is not None]
    if not scored:
        return f"no cell was scored, so none beats the dataset's average {average:.1f} ({data_id})"
    best = max(scored, key=lambda r: r["score_mean"])
    above = [r for r in scored if r["score_mean"] > average]
    where = f"{best['score_mean']:.1f} ({best['solver']}, {best['steps']} steps, nfe {best['nfe']})"
    if above:
        return (f"{len(above)} of {len(scored)} cells beat the dataset's average {average:.1f} "
                f"({data_id}, its own episodes); best {where}")
    return (f"no cell beats the dataset's average {average:.1f} ({data_id}) at this budget; best {where}. "
            f"Train longer (train_steps) to beat it.")


@pipeline("quickstart")
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    if cfg.level not in LEVELS:
        raise ValueError(f"unknown level {cfg.level!r}; valid: {', '.join(LEVELS)}")
    out = Path(cfg.run_dir)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)  # small MLPs: one thread is fastest on a few shared cores

    data_id = dataset_id(cfg.env, cfg.level, cfg.namespace)
    if (datasets_root() / data_id).exists():
        print(f"[1/3] dataset {data_id} exists in {datasets_root()}")
    else:
        print(f"[1/3] building {data_id} in {datasets_root()} (SAC behavior policy)")
        build_datasets(compose_config([f"env={cfg.env}", f"make_dataset={cfg.make_dataset}", f"levels=[{cfg.level}]",
                                       f"namespace={cfg.namespace}", f"seed={cfg.seed}", f"device={cfg.device}",
                                       f"run_dir={out / 'make_dataset'}"], config_name="make_dataset"))
    average = dataset_average(data_id)
    print(f"      dataset average score {average:.1f}; {time.perf_counter() - start:.0f} s")

    print(f"[2/3] {cfg.algo.name}, {cfg.train_steps} updates")
    checkpoint = str(train(compose_config([
        f"algo={cfg.algo.name}", f"dataset={data_id}", f"steps={cfg.train_steps}", f"batch_size={cfg.batch_size}",
        "eval_every=0", f"seed={cfg.seed}", f"device={cfg.device}", f"checkpoint_every={cfg.train_steps}",
        f"run_dir={out / 'train'}", *(f"algo.params.{k}={v}" for k, v in cfg.algo_params.items())])))
    print(f"      {time.perf_counter() - start:.0f} s")

    print(f"[3/3] sweep: {len(cfg.solvers)} solvers x steps {list(cfg.steps)}, {cfg.episodes} episodes each, "
          f"{cfg.jobs} processes")
    rows = sweep_parallel(checkpoint, cfg)
    write_sweep(rows, out)
    write_tensorboard(rows, out / "tb_sweep")
    figure = metric_vs_nfe(rows, out / "score_vs_nfe.png", metric="score_mean", se="score_se",
                           ylabel="normalized score (x100, D4RL)", reference=average,
                           reference_label=f"dataset average {average:.1f}",
                           title=f"{cfg.algo.name} on {data_id}, {cfg.train_steps} updates\n"
                                 f"score vs NFE per solver ({cfg.episodes} episodes per point, ± s.e.)")
    print(sweep_table(rows))
    print(f"acting: {acting_line(rows, checkpoint, cfg.device)}")
    print(verdict(rows, average, data_id))
    print(f"\ndone in {(time.perf_counter() - start) / 60:.1f} min")
    print(f"figure:      {figure}\ncheckpoint:  {checkpoint}\ntables:      {out / 'sweep.csv'}, {out / 'sweep.json'}")
    print(f"TensorBoard: tensorboard --logdir {out}")


if __name__ == "__main__":
    main()
