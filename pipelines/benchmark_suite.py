"""Many datasets x algorithms in one command: build what is missing, train, evaluate, tabulate.

    python pipelines/benchmark_suite.py                                    # CPU preset: 9 tasks x 5 algorithms
    python pipelines/benchmark_suite.py 'datasets=[hopper-medium-replay]' 'algos=[dql,bc]'
    python pipelines/benchmark_suite.py 'datasets=[mujoco/hopper/medium-v0]'   # any Minari id
    python pipelines/benchmark_suite.py suite=gpu                          # paper-order budgets on one GPU
    python pipelines/benchmark_suite.py hydra/launcher=slurm hydra.launcher.partition=gpu   # jobs on SLURM
    python pipelines/benchmark_suite.py suite=smoke report=docs/results/smoke.md   # + a results page and its figure

What it runs, resumes and writes: `cleandiff_rl.benchmarking` (configs/benchmark_suite.yaml for the settings).
A rerun with the same run_dir reuses finished trainings and evaluations, so adding `report=<page>.md` to a
finished run's command writes its page without training again.
"""

from __future__ import annotations

from omegaconf import DictConfig

from cleandiff_rl.benchmarking import run_suite
from cleandiff_rl.utils.cli import pipeline


@pipeline("benchmark_suite")
def main(cfg: DictConfig) -> None:
    run_suite(cfg)


if __name__ == "__main__":
    main()
