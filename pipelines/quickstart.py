"""The main job: dataset -> diffusion policy -> solver x steps sweep, offline, in about 10 minutes.

See configs/quickstart.yaml. Prints the score table (normalized score, NFE per solver and steps)
and where the checkpoint, the table files and the TensorBoard logs are.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from cleandiff_rl.data import dataset_average
from cleandiff_rl.data.builder import build_datasets
from cleandiff_rl.data.registry import dataset_id, datasets_root
from cleandiff_rl.evaluation import format_table, sweep_checkpoint
from cleandiff_rl.training import compose_config, register_configs, train
from cleandiff_rl.utils.cli import user_errors

register_configs()  # the algo group's settings schemas


@hydra.main(config_path="../configs", config_name="quickstart", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    out = Path(cfg.run_dir)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)  # small MLPs: one thread is fastest on a few shared cores

    data_id = dataset_id(cfg.env, "medium", cfg.namespace)
    if (datasets_root() / data_id).exists():
        print(f"[1/3] dataset {data_id} exists in {datasets_root()}")
    else:
        print(f"[1/3] building {data_id} in {datasets_root()} (SAC behavior policy)")
        build_datasets(compose_config([f"env={cfg.env}", "make_dataset=quickstart", f"namespace={cfg.namespace}",
                                       f"seed={cfg.seed}", f"device={cfg.device}", f"run_dir={out / 'make_dataset'}"],
                                      config_name="make_dataset"))
    average = dataset_average(data_id)
    print(f"      dataset average score {average:.1f}; {time.perf_counter() - start:.0f} s")

    print(f"[2/3] {cfg.algo.name}, {cfg.train_steps} updates")
    checkpoint = train(compose_config([f"algo={cfg.algo.name}", f"dataset={data_id}", f"steps={cfg.train_steps}",
                                       f"batch_size={cfg.batch_size}", "eval_every=0", f"seed={cfg.seed}",
                                       f"device={cfg.device}", f"checkpoint_every={cfg.train_steps}",
                                       f"run_dir={out / 'train'}",
                                       *(f"algo.params.{k}={v}" for k, v in cfg.algo_params.items())]))
    print(f"      {time.perf_counter() - start:.0f} s")

    print(f"[3/3] sweep: {len(cfg.solvers)} solvers x steps {list(cfg.steps)}, {cfg.episodes} episodes each")
    rows = sweep_checkpoint(checkpoint, out, out / "tb_sweep", device=cfg.device, solvers=list(cfg.solvers),
                            steps=list(cfg.steps), episodes=cfg.episodes, seed=cfg.seed)
    print(format_table(rows))
    print(f"dataset {data_id}: its own episodes average score {average:.1f} (a policy should beat that)")
    print(f"\ndone in {(time.perf_counter() - start) / 60:.1f} min")
    print(f"checkpoint:  {checkpoint}\ntables:      {out / 'sweep.csv'}, {out / 'sweep.json'}")
    print(f"TensorBoard: tensorboard --logdir {out}")


if __name__ == "__main__":
    main()
