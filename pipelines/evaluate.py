"""Evaluate one saved policy in MuJoCo and print its return and normalized score (mean ± se).

See configs/evaluate.yaml. Writes run_dir/evaluation.json (the result, with the checkpoint path).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cleandiff_rl.evaluation import evaluate_checkpoint
from cleandiff_rl.training import register_configs
from cleandiff_rl.utils.cli import pipeline

register_configs()  # the checkpoint_name resolver of the run folder


@pipeline("evaluate")
def main(cfg: DictConfig) -> None:
    result = evaluate_checkpoint(cfg)
    sampling = ""
    if result["solver"] is not None:
        sampling = f", solver {result['solver']}, {result['steps']} steps (nfe {result['nfe']})"
        if result["temperature"] is not None:
            sampling += f", temperature {result['temperature']:g}"
    print(f"{result['algo']} policy (trained on {result['dataset_id']}, {result['updates']} updates) from {cfg.checkpoint}")
    print(f"{result['env_id']}, {result['episodes']} episodes{sampling}")
    if result["acting"] is not None:
        print(f"acting           {result['acting']}")
    print(f"return           {result['return_mean']:.1f} ± {result['return_se']:.1f}")
    if result["score_mean"] is not None:
        print(f"normalized score {result['score_mean']:.1f} ± {result['score_se']:.1f}")
    print(f"episode length   {result['length_mean']:.0f}")
    print(f"time per action  {result['time_per_action_ms']:.2f} ms (one batched call for all running episodes)")
    print(f"result: {Path(cfg.run_dir) / 'evaluation.json'}")


if __name__ == "__main__":
    main()
