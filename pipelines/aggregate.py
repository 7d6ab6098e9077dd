"""Aggregate training runs over seeds: mean ± s.e. per dataset x algorithm, IQM and mean across datasets
with 95% stratified-bootstrap confidence intervals (rliable), and score vs NFE per solver from sweeps.

    python pipelines/aggregate.py runs=runs/train
    python pipelines/aggregate.py 'runs=[runs/train/dql/*,runs/train/idql/*,runs/sweep]'

See configs/aggregate.yaml. A run is a folder with train.py's checkpoint.pt (a train run_dir, a benchmark
suite's <dataset>/<algo>, the quickstart's train/), found anywhere under the folders given. Its score:
evaluate.py's evaluation.json for it (the newest, if several; the suite writes one in <run>/evaluations/),
else the final eval/score that training logged to <run>/tb. Evaluations with act-time settings
(+settings.*: the suite's act variants) evaluate another policy and are left out, and so is any result
older than the run's checkpoint. Its solver x NFE curve: sweep.py's sweep.json for it (the newest). An evaluation or sweep belongs to a run when it lies inside the
run's folder or beside it (the quickstart's sweep), or in a folder named after the run, evaluate.py's and
sweep.py's default (runs/sweep/dql-hopper-medium-seed0/<time>/).
Writes run_dir/results.csv, results.json, curves.csv, intervals.png, score_vs_nfe.png and tb/ (HParams).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from cleandiff_rl.aggregation import (CONFIDENCE, average_curves, curve_figure, curve_table, expand, find_runs,
                                      group_runs, import_rliable, interval_figure, seed_table, summarize,
                                      write_tensorboard)
from cleandiff_rl.utils import atomic_write, write_csv
from cleandiff_rl.utils.cli import pipeline


@pipeline("aggregate")
def main(cfg: DictConfig) -> None:
    _, _, plot_utils = import_rliable()
    if cfg.reps < 1:
        raise ValueError(f"reps must be >= 1, got {cfg.reps}")
    runs, notes = find_runs(expand([cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs)))
    groups = group_runs(runs)
    rows, interval_notes = summarize(groups, cfg.reps, cfg.seed)
    notes += interval_notes
    curves = average_curves(groups)
    table = seed_table(rows)

    figures = {"intervals.png": interval_figure(rows, plot_utils),
               **({"score_vs_nfe.png": curve_figure(curves)} if curves else {})}

    record = {"reps": cfg.reps, "confidence": CONFIDENCE, "results": rows, "curves": curves, "notes": notes,
              "runs": [{"folder": str(r.folder), "dataset": r.dataset, "algo": r.algo, "seed": r.seed,
                        "score": r.score, "score_from": str(r.score_from),
                        "sweep_from": r.sweep_from and str(r.sweep_from)} for r in runs],
              "settings": [{"dataset": d, "algo": a, "settings": members[0].settings}
                           for (d, a), members in groups.items()]}
    out = Path(cfg.run_dir)  # everything above is checked before the first file is written
    atomic_write(out / "results.json", lambda f: json.dump(record, f, indent=1))
    write_csv(out / "results.csv", rows)
    if curves:
        write_csv(out / "curves.csv", curves)
    for name, fig in figures.items():
        atomic_write(out / name, lambda f, fig=fig: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"),
                     binary=True)

    write_tensorboard(out / "tb", groups, rows, table)

    print(f"normalized score (D4RL x100): mean ± s.e. over seeds (runs) per dataset; IQM and mean over all "
          f"runs x datasets with {CONFIDENCE:.0%} stratified-bootstrap CIs ({cfg.reps} resamples)\n{table}")
    if curves:
        print(f"\nscore vs NFE, mean ± s.e. over seeds (runs):\n{curve_table(curves)}")
    for note in notes:
        print(f"note: {note}")
    print(f"\nresults: {out / 'results.csv'}, {out / 'results.json'}" + (f", {out / 'curves.csv'}" if curves else "")
          + f"\nplots:   {', '.join(str(out / name) for name in figures)}"
          + f"\nTensorBoard: tensorboard --logdir {out / 'tb'} (HParams tab)")


if __name__ == "__main__":
    main()
