"""Time per training update of each algorithm on real batches, with the CPU fast paths on and off,
or (`compile=true`) with the networks torch.compile'd and eager.

The fast paths (`cleandiff_rl.utils.fast`: Mish from one sigmoid, fused Adam) change no numbers
(tests compare them); this prints what they save. With `compile=true` the agent's networks are
compiled (`Agent.compile_networks`, what `train.py compile=true` does) and the two settings are the
compiled networks and the same networks run eagerly (`torch.compiler.set_stance("force_eager")`),
fast paths on in both. Blocks of updates alternate between the two settings on the same agent, and
the table reports the fastest block of each, so a change in machine load between measurements does
not bias the ratio.

With `ensemble=[1,4,8]` it prints seed-updates/s instead: each algorithm's ordinary update (one agent, what
each of N separate runs does) and seed ensembles of N seeds in one batched model (`cleandiff_rl.ensemble`,
train.py's `seeds=`), on the current device (CUDA graphs on CUDA unless `cuda_graph=false`).

Each algorithm runs at its `task`'s settings (configs/task), on the task's dataset or on `dataset`, with
`params` on top (as benchmark_suite's, e.g. the CPU preset's `+params.fql.hidden_dim=256`); results.json
records every row's dataset and algorithm parameters.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cleandiff_rl.agents import get_algorithm
from cleandiff_rl.agents.base import make_config
from cleandiff_rl.data import load_dataset
from cleandiff_rl.ensemble import AgentEnsemble
from cleandiff_rl.training import compose_config, dataset_env_id, new_agent, params_overrides
from cleandiff_rl.utils import CudaGraphStep, atomic_write, fast_paths, resolve_device, seed_everything
from cleandiff_rl.utils.cli import pipeline


def training_setup(algo: str, cfg: DictConfig, device: torch.device) -> tuple:
    """`algo`'s training config at the task's settings and `cfg.params`, its class, params, dataset and data."""
    train_cfg = compose_config([f"algo={algo}", f"task={cfg.task.name}", *params_overrides(cfg.params, algo)]
                               + ([] if cfg.dataset is None else [f"dataset={cfg.dataset}"]))
    algo_cls = get_algorithm(algo)
    params = OmegaConf.to_container(train_cfg.algo.params, resolve=True)
    minari_dataset = load_dataset(train_cfg.dataset)
    data = algo_cls.training_data(minari_dataset, make_config(algo_cls.Config, params), device=device)
    return train_cfg, algo_cls, params, minari_dataset, data


def time_updates(algo: str, cfg: DictConfig, device: torch.device) -> dict:
    """ms per update (train_step + after_step) of `algo` at its configured batch size, fast paths on and off
    (`cfg.compile`: compiled networks and eager ones; the first update's seconds, compiling, too)."""
    train_cfg, algo_cls, params, minari_dataset, data = training_setup(algo, cfg, device)
    agent = new_agent(algo_cls, params, minari_dataset, data, env_id=dataset_env_id(minari_dataset), device=device)
    data.map_actions(agent.normalize_action)
    batch_size = int(cfg.batch_size or train_cfg.batch_size)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    batches = [data.sample(batch_size * agent.batches_per_step, generator) for _ in range(cfg.block_updates)]
    compile_seconds = None
    if cfg.compile:
        torch._dynamo.reset()  # the previous algorithm's graphs share code (TwinQ) and its recompile limit
        agent.compile_networks()
        start = time.perf_counter()
        agent.train_step(batches[0])  # compiles
        agent.after_step()
        compile_seconds = time.perf_counter() - start

    def setting(enabled: bool) -> AbstractContextManager:
        if cfg.compile:
            return torch.compiler.set_stance("default" if enabled else "force_eager")
        return fast_paths(enabled)

    best = {True: float("inf"), False: float("inf")}
    for block in range(-2, 2 * cfg.blocks):  # the first two blocks warm up (allocator, lazy optimizer state)
        enabled = block % 2 == 0
        with setting(enabled):
            start = time.perf_counter()
            for batch in batches:
                agent.train_step(batch)
                agent.after_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if block >= 0:
                best[enabled] = min(best[enabled], (time.perf_counter() - start) / len(batches))
    row = {"algo": algo, "batch_size": batch_size, "ms_fast": 1e3 * best[True], "ms_default": 1e3 * best[False],
           "speedup": best[False] / best[True]}
    if cfg.compile:
        row = {"algo": algo, "batch_size": batch_size, "ms_compiled": row["ms_fast"], "ms_eager": row["ms_default"],
               "speedup": row["speedup"], "compile_seconds": compile_seconds}
    return {**row, "dataset": train_cfg.dataset, "params": params}


def time_ensembles(algo: str, cfg: DictConfig, device: torch.device) -> dict:
    """Seed-updates/s of `algo`'s ordinary update (one agent: what N separate runs each do) and of seed ensembles
    of each N in `cfg.ensemble` (N seeds in one batched model, `cleandiff_rl.ensemble`), each seed on its own
    batches; on CUDA with `cuda_graph` both replay a captured update. Fastest of `blocks` timed blocks each."""
    train_cfg, algo_cls, params, minari_dataset, data = training_setup(algo, cfg, device)
    env_id = dataset_env_id(minari_dataset)
    batch_size = int(cfg.batch_size or train_cfg.batch_size)
    graphs = device.type == "cuda" and bool(cfg.cuda_graph)

    def agents(n: int) -> list:
        made = []
        for seed in range(cfg.seed, cfg.seed + n):
            seed_everything(seed)
            made.append(new_agent(algo_cls, params, minari_dataset, data, env_id=env_id, device=device))
        return made

    def best_rate(step, after, batches: list, seeds: int) -> float:
        best = float("inf")
        for block in range(-2, cfg.blocks):  # two warm-up blocks (lazy optimizer state, graph capture)
            start = time.perf_counter()
            for batch in batches:
                step(batch)
                after()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if block >= 0:
                best = min(best, (time.perf_counter() - start) / len(batches))
        return seeds / best

    one = agents(1)[0]
    data.map_actions(one.normalize_action)
    rows = batch_size * one.batches_per_step
    generators = [torch.Generator(device=device).manual_seed(cfg.seed + i) for i in range(max(cfg.ensemble))]
    single = [data.sample(rows, generators[0]) for _ in range(cfg.block_updates)]
    step = CudaGraphStep(one.train_step, one.optimizers().values()) if graphs else one.train_step
    row = {"algo": algo, "batch_size": batch_size, "separate": best_rate(step, one.after_step, single, 1)}
    for n in cfg.ensemble:
        ensemble = AgentEnsemble(agents(n))
        batches = [{key: torch.stack([part[key] for part in parts]) for key in parts[0]}
                   for parts in ([data.sample(rows, g) for g in generators[:n]] for _ in range(cfg.block_updates))]
        step = CudaGraphStep(ensemble.step, ensemble.optimizers.values()) if graphs else ensemble.step
        row[f"N={n}"] = best_rate(step, ensemble.after_step, batches, n)
    return {**row, "dataset": train_cfg.dataset, "params": params}


@pipeline("benchmark_updates")
def main(cfg: DictConfig) -> None:
    device = resolve_device(cfg.device)
    torch.set_num_threads(int(cfg.threads))
    seed_everything(cfg.seed)
    if cfg.ensemble:  # seed ensembles: seed-updates/s per N
        rows = []
        print(f"seed-updates/s on {device} ({'CUDA graphs' if device.type == 'cuda' and cfg.cuda_graph else 'eager'}"
              f", {torch.get_num_threads()} threads); separate: one ordinary agent, what each of N runs does")
        print(f"{'algo':<20}{'batch':>7}{'separate':>11}" + "".join(f"{f'N={n}':>11}" for n in cfg.ensemble))
        for algo in cfg.algos:
            row = time_ensembles(str(algo), cfg, device)
            rows.append(row)
            print(f"{row['algo']:<20}{row['batch_size']:>7}{row['separate']:>11.1f}"
                  + "".join(f"{row[f'N={n}']:>11.1f}" for n in cfg.ensemble))
        results = {"task": cfg.task.name, "device": str(device), "ensemble": list(cfg.ensemble),
                   "cuda_graph": bool(cfg.cuda_graph), "threads": torch.get_num_threads(), "rows": rows}
        path = atomic_write(Path(cfg.run_dir) / "results.json", lambda f: json.dump(results, f, indent=2))
        print(f"\nresults: {path}")
        return
    rows = []
    fast, slow = ("ms_compiled", "ms_eager") if cfg.compile else ("ms_fast", "ms_default")
    print(f"{'algo':<20}{'batch':>7}{'ms/update ' + fast[3:]:>20}{slow[3:]:>10}{'speedup':>9}{'updates/s':>11}"
          + (f"{'compile s':>11}" if cfg.compile else ""))
    for algo in cfg.algos:
        row = time_updates(str(algo), cfg, device)
        rows.append(row)
        print(f"{row['algo']:<20}{row['batch_size']:>7}{row[fast]:>20.1f}{row[slow]:>10.1f}"
              f"{row['speedup']:>8.2f}x{1e3 / row[fast]:>11.1f}"
              + (f"{row['compile_seconds']:>11.1f}" if cfg.compile else ""))
    results = {"task": cfg.task.name, "device": str(device), "compile": bool(cfg.compile), "rows": rows}
    path = atomic_write(Path(cfg.run_dir) / "results.json", lambda f: json.dump(results, f, indent=2))
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
