"""Train a policy or planner on a Minari dataset; see configs/train.yaml.

    python pipelines/train.py algo=idql task=hopper-medium
    python pipelines/train.py -m algo=dql,idql seed=0,1,2 hydra/launcher=local   # a grid, 2 processes at a time
    torchrun --standalone --nproc_per_node=2 pipelines/train.py algo=diffuser    # one training, 2 processes
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from cleandiff_rl.training import register_configs, train
from cleandiff_rl.utils.cli import user_errors

register_configs()


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> None:
    path = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(f"checkpoint: {path}\nTensorBoard: tensorboard --logdir {path.parent / 'tb'}")


if __name__ == "__main__":
    main()
