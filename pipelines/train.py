"""Train a policy or planner on a Minari dataset; see configs/train.yaml.

    python pipelines/train.py algo=idql task=hopper-medium
    python pipelines/train.py -m algo=dql,idql seed=0,1,2 hydra/launcher=local   # a grid, 2 processes at a time
    python pipelines/train.py algo=fql 'seeds=[0,1,2,3]'   # 4 seeds in one process, one batched model
    torchrun --standalone --nproc_per_node=2 pipelines/train.py algo=diffuser    # one training, 2 processes
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from cleandiff_rl.training import register_configs, train
from cleandiff_rl.utils.cli import pipeline

register_configs()


@pipeline("train")
def main(cfg: DictConfig) -> None:
    paths = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        for path in paths if isinstance(paths, list) else [paths]:  # seeds=[...]: one checkpoint per seed
            print(f"checkpoint: {path}\nTensorBoard: tensorboard --logdir {path.parent / 'tb'}")


if __name__ == "__main__":
    main()
