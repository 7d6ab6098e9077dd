"""Build D4RL-style Minari datasets for one MuJoCo task (see configs/make_dataset.yaml).

python pipelines/make_dataset.py env=hopper                    # full D4RL sizes
python pipelines/make_dataset.py env=walker2d make_dataset=tiny
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from cleandiff_rl.data.builder import build_datasets
from cleandiff_rl.utils.cli import pipeline


@pipeline("make_dataset")
def main(cfg: DictConfig) -> None:
    print(json.dumps(build_datasets(cfg), indent=2))


if __name__ == "__main__":
    main()
