"""Train a policy (Diffusion BC, Diffusion-QL, IDQL or BC) on a Minari dataset; see configs/train.yaml.

    python pipelines/train.py algo=idql task=hopper-medium
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cleandiff_rl.training import register_configs, train
from cleandiff_rl.utils.cli import user_errors

register_configs()


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> None:
    path = train(cfg)
    print(f"checkpoint: {path}\nTensorBoard: tensorboard --logdir {path.parent / 'tb'}")


if __name__ == "__main__":
    main()
