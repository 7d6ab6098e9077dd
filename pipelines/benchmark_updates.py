"""Time per training update of each algorithm on real batches, with the CPU fast paths on and off,
or (`compile=true`) with the networks torch.compile'd and eager.

The fast paths (`cleandiff_rl.utils.fast`: Mish from one sigmoid, fused Adam) change no numbers
(tests compare them); this prints what they save. With `compile=true` the agent's networks are
compiled (`Agent.compile_networks`, what `train.py compile=true` does) and the two settings are the
compiled networks and the same networks run eagerly (`torch.compiler.set_stance("force_eager")`),
fast paths on in both. Blocks of updates alternate between the two settings on the same agent, and
the table reports the fastest block of each, so a change in machine load between measurements does
not bias the ratio.

Each algorithm runs at its `task`'s settings (configs/task), on the task's dataset or on `dataset`, with
`params` on top (as benchmark_suite's, e.g. the CPU preset's `+params.fql.hidden_dim=256`); results.json
records every row's dataset and algorithm parameters.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cleandiff_rl.agents import get_algorithm
from cleandiff_rl.agents.base import make_config
from cleandiff_rl.data import load_dataset
from cleandiff_rl.training import compose_config, dataset_env_id, new_agent, params_overrides
from cleandiff_rl.utils import atomic_write, fast_paths, resolve_device, seed_everything
from cleandiff_rl.utils.cli import user_errors


def time_updates(algo: str, cfg: DictConfig, device: torch.device) -> dict:
    """ms per update (train_step + after_step) of `algo` at its configured batch size, fast paths on and off
    (`cfg.compile`: compiled networks and eager ones; the first update's seconds, compiling, too)."""
    train_cfg = compose_config([f"algo={algo}", f"task={cfg.task.name}", *params_overrides(cfg.params, algo)]
                               + ([] if cfg.dataset is None else [f"dataset={cfg.dataset}"]))
    algo_cls = get_algorithm(algo)
    params = OmegaConf.to_container(train_cfg.algo.params, resolve=True)
    minari_dataset = load_dataset(train_cfg.dataset)
    data = algo_cls.training_data(minari_dataset, make_config(algo_cls.Config, params), device=device)
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


@hydra.main(config_path="../configs", config_name="benchmark_updates", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> None:
    device = resolve_device(cfg.device)
    torch.set_num_threads(int(cfg.threads))
    seed_everything(cfg.seed)
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
