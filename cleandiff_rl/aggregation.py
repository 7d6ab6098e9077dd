"""Results over seeds: training runs found on disk, grouped by dataset x algorithm (their settings must match),
mean ± s.e. per group, IQM and mean across datasets with 95% stratified-bootstrap confidence intervals
(rliable), and score vs NFE per solver from sweeps. pipelines/aggregate.py's library; its docstring says
which runs, evaluations and sweeps it reads.
"""

from __future__ import annotations

import glob
import json
import math
import os
import warnings
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cleandiff_rl.training import checkpoint_name, run_name
from cleandiff_rl.utils import format_table, load_checkpoint

if TYPE_CHECKING:  # matplotlib loads with rliable, only when the pipeline runs
    from matplotlib.figure import Figure

# run_config keys that change neither what a run learns nor how its score is measured; every other key
# must match across the seeds of one dataset x algorithm. `task` reaches a run only through algo.params
# (compared), and train.py reads the top-level steps and batch_size, not algo.steps / algo.batch_size.
# eval_episodes is compared as evaluation.episodes when the score comes from training's own evaluation.
IGNORED = ("seed", "run_dir", "device", "threads", "cuda_graph", "compile", "resume", "log_every",
           "checkpoint_every", "eval_every", "eval_episodes", "task", "algo.steps", "algo.batch_size")
CONFIDENCE = 0.95


@dataclass
class Run:
    folder: Path
    dataset: str              # train.py's name for it: the task's, or the dataset id with '/' -> '_'
    algo: str
    seed: int
    settings: dict[str, Any]  # run_config flattened, minus IGNORED, plus how the score was measured
    score: float              # normalized score (D4RL x100) of the final policy
    score_from: Path
    sweep: list[dict] | None = None  # sweep.py's rows for this run
    sweep_from: Path | None = None


def import_rliable() -> tuple[Any, Any, Any]:
    """rliable's library, metrics and plot_utils; one clear error when the optional extra is missing."""
    import matplotlib

    matplotlib.use("Agg")
    try:
        from rliable import library, metrics, plot_utils
    except ImportError:
        raise ValueError('aggregate.py needs rliable (IQM, bootstrap CIs): pip install -e ".[cluster]"') from None
    return library, metrics, plot_utils


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'algo': {'params': {'lr': 1}}} -> {'algo.params.lr': 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not readable JSON: {error}") from None


def shown(path: Path) -> Path:
    """`path` relative to the working directory when it lies below it (for messages and tables)."""
    return Path(os.path.relpath(path)) if path.is_relative_to(Path.cwd()) else path


def expand(entries: list[str]) -> list[Path]:
    """The folders `entries` name, globs expanded; an entry that names no folder is an error."""
    if not entries:
        raise ValueError("runs names no folder: runs=<folder> or 'runs=[<folder or glob>,...]'")
    folders = []
    for entry in entries:
        found = [Path(p) for p in sorted(glob.glob(os.path.expanduser(entry))) if Path(p).is_dir()]
        if not found:
            raise FileNotFoundError(f"runs entry {entry!r} names no folder")
        folders += found
    return list(dict.fromkeys(folders))


def final_tb_score(tb: Path, step: int) -> float:
    """The eval/score that training logged at `step` (its last update), from the events in `tb`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scores = []
    if tb.is_dir():
        events = EventAccumulator(str(tb), size_guidance={"scalars": 0}).Reload()
        scores = events.Scalars("eval/score") if "eval/score" in events.Tags()["scalars"] else []
    last = max(scores, key=lambda event: event.step, default=None)
    if last is None or last.step != step:
        raise ValueError(f"{tb} holds no eval/score of the final policy (update {step}): train with "
                         "eval_every > 0, or evaluate it with evaluate.py and pass that folder too")
    return float(last.value)


def load_run(folder: Path, state: dict, evaluation: Path | None, sweep: Path | None) -> Run:
    """One finished training run: its settings, its final score (see the module docstring) and its sweep."""
    config = state["run_config"]
    if state["step"] < config["steps"]:
        raise ValueError(f"{folder} is unfinished ({state['step']} of {config['steps']} updates): finish it "
                         "(rerun its train.py command) or leave it out")
    variant = Path(folder).name.partition("+")[2]  # train.py's folder suffix for settings given beyond the seed
    algo = config["algo"]["name"] + (f"+{variant}" if variant else "")
    settings = {key: value for key, value in flatten(config).items()
                if not any(key == name or key.startswith(f"{name}.") for name in IGNORED)}
    if evaluation is not None:
        source, result = evaluation, read_json(evaluation)
        score = result["score_mean"]
        settings |= {f"evaluation.{key}": result[key] for key in ("episodes", "solver", "steps", "temperature")}
        settings["evaluation.source"] = "evaluate"
    else:
        source = folder / "tb"
        score = final_tb_score(source, state["step"])
        settings |= {"evaluation.episodes": config["eval_episodes"], "evaluation.source": "training"}
    if score is None:
        raise ValueError(f"{source} has no normalized score (no reference scores for {config['dataset']})")
    task = config["task"]
    return Run(folder, run_name(config["dataset"], task["name"], task["dataset"]), algo, int(config["seed"]),
               settings, float(score), source, None if sweep is None else read_json(sweep), sweep)


def find_runs(folders: list[Path]) -> tuple[list[Run], list[str]]:
    """Every training run under `folders`, with its score and sweep; and notes on what was left out."""
    found: dict[str, dict[Path, None]] = {"checkpoint.pt": {}, "evaluation.json": {}, "sweep.json": {}}
    for folder in folders:
        files = {name: sorted(folder.rglob(name)) for name in found}
        if not any(files.values()):
            raise ValueError(f"{folder} holds no training run (checkpoint.pt) and no evaluation.json or sweep.json")
        for name, paths in files.items():
            found[name].update(dict.fromkeys(path.resolve() for path in paths))
    states, notes = {}, []
    for path in found["checkpoint.pt"]:
        state = load_checkpoint(path)
        if "run_config" in state:
            states[path.parent] = state
        else:
            notes.append(f"left out {shown(path.parent)}: its checkpoint.pt is not train.py's (no run_config)")
    if not states:
        raise ValueError(f"no training runs (train.py's checkpoint.pt) under {', '.join(map(str, folders))}")

    names: dict[str, list[Path]] = {}  # evaluate.py's and sweep.py's folder names -> the runs they may mean
    for folder in states:
        names.setdefault(checkpoint_name(str(folder / "checkpoint.pt")), []).append(folder)
    results: dict[tuple[Path, str], list[Path]] = {}  # (run folder, file name) -> its results
    for kind in ("evaluation.json", "sweep.json"):
        for path in found[kind]:
            owners = [folder for folder in states if folder in path.parents or path.parent == folder.parent]
            owners += names.get(path.parent.parent.name, [])
            if len(set(owners)) > 1:
                raise ValueError(f"{shown(path)} could belong to several runs "
                                 f"({', '.join(str(shown(owner)) for owner in owners)}); pass fewer folders")
            if owners:
                results.setdefault((owners[0], kind), []).append(path)
            else:
                notes.append(f"left out {shown(path)}: it belongs to none of the runs found")

    def newest(folder: Path, kind: str) -> Path | None:
        """The newest result of `kind` written after the run's checkpoint; act variants (+settings.*, the
        suite's) evaluate another policy."""
        written, paths = (folder / "checkpoint.pt").stat().st_mtime, []
        for path in results.get((folder, kind), []):
            if path.stat().st_mtime < written:
                notes.append(f"left out {shown(path)}: older than its run's checkpoint.pt")
            elif kind == "sweep.json" or not read_json(path).get("settings"):
                paths.append(path)
        path = max(paths, key=lambda p: p.stat().st_mtime, default=None)
        return None if path is None else shown(path)

    runs = [load_run(shown(folder), state, newest(folder, "evaluation.json"), newest(folder, "sweep.json"))
            for folder, state in states.items()]
    return runs, notes


def check_same(what: str, items: list[tuple[Path, dict]]) -> None:
    """One clear error when the settings in `items` differ: the differing keys, and which folders hold what."""
    if not items:
        return
    # a training setting only some runs record came in with newer code; how a score was measured always counts
    compared = set.intersection(*(set(s) for _, s in items))
    compared |= {key for _, s in items for key in s if key.startswith("evaluation.")}
    keys = sorted(key for key in compared if len({repr(s.get(key, "<unset>")) for _, s in items}) > 1)
    if not keys:
        return
    listed = keys[:5]
    by_value: dict[str, list[str]] = {}
    for folder, s in items:
        values = [f"{k}={s.get(k, '<unset>')}" if len(listed) > 1 else str(s.get(k, "<unset>")) for k in listed]
        by_value.setdefault(", ".join(values), []).append(Path(folder).name)  # names: the line stays short
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    raise ValueError(f"cannot average {what} over seeds: its runs differ in {', '.join(listed)}{more} ("
                     + "; ".join(f"{value} in {', '.join(folders)}" for value, folders in by_value.items())
                     + "); aggregate them separately")


def group_runs(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs by (dataset, algo), sorted by seed; the runs of one group may differ in nothing but the seed."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.dataset, r.algo, r.seed)):
        groups.setdefault((run.dataset, run.algo), []).append(run)
    for (dataset, algo), members in groups.items():
        for a, b in pairwise(members):
            if a.seed == b.seed:
                raise ValueError(f"{a.folder} and {b.folder} are both {algo} on {dataset} with seed {a.seed}: "
                                 "pass only one of them")
        check_same(f"{algo} on {dataset}", [(r.folder, r.settings) for r in members])
        check_same(f"the sweeps of {algo} on {dataset}", [(r.sweep_from, sweep_settings(r.sweep)) for r in members
                                                           if r.sweep])
    return groups


def sweep_settings(rows: list[dict]) -> dict[str, Any]:
    """How a sweep measured its scores (a failed cell's row records neither)."""
    done = [row for row in rows if not row.get("error")]
    return {key: done[0][key] for key in ("episodes", "temperature")} if done else {}


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error over seeds (sample std / sqrt(n)); no s.e. for a single seed."""
    values = np.asarray(values, dtype=float)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return float(values.mean()), se


def summarize(groups: dict[tuple[str, str], list[Run]], reps: int, seed: int) -> tuple[list[dict], list[str]]:
    """Result rows: mean ± s.e. over seeds per dataset x algorithm, then per algorithm the IQM and the mean
    over its (seeds x datasets) scores with `CONFIDENCE` stratified-bootstrap intervals (rliable).

    rliable needs as many runs on every dataset of one algorithm: where they differ, the intervals use each
    dataset's lowest seeds, as many as the dataset with fewest has, and a note says so.
    """
    library, metrics, _ = import_rliable()
    rows, notes, matrices = [], [], {}
    for (dataset, algo), runs in groups.items():
        mean, se = mean_se([r.score for r in runs])
        rows.append({"algo": algo, "dataset": dataset, "statistic": "mean over seeds", "score": mean, "se": se,
                     "ci_low": None, "ci_high": None, "runs": len(runs), "seeds": [r.seed for r in runs]})
    algos = sorted({algo for _, algo in groups})
    for algo in algos:
        cells = {dataset: runs for (dataset, a), runs in groups.items() if a == algo}
        n = min(len(runs) for runs in cells.values())
        if any(len(runs) > n for runs in cells.values()):
            notes.append(f"{algo}: IQM and mean use the {n} lowest seeds of each dataset (rliable needs as many "
                         f"runs on every dataset; {', '.join(f'{d} has {len(r)}' for d, r in cells.items())})")
        matrices[algo] = np.array([[run.score for run in runs[:n]] for runs in cells.values()]).T  # seeds x datasets
    covered = {algo: sorted(d for d, a in groups if a == algo) for algo in algos}
    if len({tuple(datasets) for datasets in covered.values()}) > 1:
        notes.append("the algorithms cover different datasets, so their IQMs do not compare: "
                     + "; ".join(f"{algo}: {', '.join(datasets)}" for algo, datasets in covered.items()))
    with warnings.catch_warnings():  # arch deprecates the random_state that rliable passes it
        warnings.simplefilter("ignore", FutureWarning)
        points, intervals = library.get_interval_estimates(
            matrices, lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)]), reps=reps,
            confidence_interval_size=CONFIDENCE, random_state=np.random.RandomState(seed))
    for algo in algos:
        runs, datasets = matrices[algo].shape
        for i, statistic in enumerate(("IQM", "mean")):
            rows.append({"algo": algo, "dataset": "all", "statistic": statistic, "score": float(points[algo][i]),
                         "se": None, "ci_low": float(intervals[algo][0, i]), "ci_high": float(intervals[algo][1, i]),
                         "runs": runs * datasets, "seeds": None})
    return rows, notes


def average_curves(groups: dict[tuple[str, str], list[Run]]) -> list[dict]:
    """Score vs NFE per solver, averaged over the seeds whose sweep has that (solver, steps) cell."""
    rows = []
    for (dataset, algo), runs in groups.items():
        cells: dict[tuple[str, int], list[dict]] = {}
        for run in runs:
            for row in run.sweep or []:
                if row.get("error") is None and row.get("score_mean") is not None:
                    cells.setdefault((row["solver"], row["steps"]), []).append(row)
        for (solver, steps), found in cells.items():
            mean, se = mean_se([row["score_mean"] for row in found])
            rows.append({"dataset": dataset, "algo": algo, "solver": solver, "steps": steps,
                         "nfe": float(np.mean([row["nfe"] for row in found])), "score": mean, "se": se,
                         "runs": len(found)})
    return rows


def cell(score: float, se: float | None, runs: int) -> str:
    """A table cell: "mean ± s.e. (runs)"."""
    return f"{score:.1f}" + ("" if se is None else f" ± {se:.1f}") + f" ({runs})"


def seed_table(rows: list[dict]) -> str:
    """Markdown: one row per algorithm; mean ± s.e. (runs) per dataset, then IQM and mean [95% CI]."""
    datasets = sorted({r["dataset"] for r in rows if r["statistic"] == "mean over seeds"})
    by = {(r["algo"], r["dataset"] if r["statistic"] == "mean over seeds" else r["statistic"]): r for r in rows}
    ci = f"{CONFIDENCE:.0%} CI"
    lines = []
    for algo in sorted({r["algo"] for r in rows}):
        cells = [cell(by[algo, d]["score"], by[algo, d]["se"], by[algo, d]["runs"]) if (algo, d) in by else ""
                 for d in datasets]
        cells += [f"{by[algo, s]['score']:.1f} [{by[algo, s]['ci_low']:.1f}, {by[algo, s]['ci_high']:.1f}]"
                  for s in ("IQM", "mean")]
        lines.append([algo, *cells])
    return format_table(["algo", *datasets, f"IQM [{ci}]", f"mean [{ci}]"], lines)


def curve_table(curves: list[dict]) -> str:
    """Markdown per dataset x algorithm: one row per solver, cells "score ± s.e. (runs) nfe N" per steps."""
    blocks = []
    for dataset, algo in dict.fromkeys((c["dataset"], c["algo"]) for c in curves):
        mine = [c for c in curves if (c["dataset"], c["algo"]) == (dataset, algo)]
        steps = sorted({c["steps"] for c in mine})
        by = {(c["solver"], c["steps"]): c for c in mine}
        table = format_table(["solver", *(f"{n} step" + "s" * (n > 1) for n in steps)],
                             [[solver, *(f"{cell(c['score'], c['se'], c['runs'])} nfe {c['nfe']:g}"
                                         if (c := by.get((solver, n))) else "" for n in steps)]
                              for solver in dict.fromkeys(c["solver"] for c in mine)])
        blocks.append(f"{algo} on {dataset}:\n{table}")
    return "\n\n".join(blocks)


def interval_figure(rows: list[dict], plot_utils: Any) -> Figure:
    """rliable's interval plot: IQM and mean per algorithm, point estimate and confidence interval."""
    by = {(r["algo"], r["statistic"]): r for r in rows}
    algos = sorted({r["algo"] for r in rows})
    fig, _ = plot_utils.plot_interval_estimates(
        {a: np.array([by[a, s]["score"] for s in ("IQM", "mean")]) for a in algos},
        {a: np.array([[by[a, s][f"ci_{end}"] for s in ("IQM", "mean")] for end in ("low", "high")]) for a in algos},
        metric_names=["IQM", "Mean"], algorithms=algos, xlabel="normalized score (D4RL x100)", row_height=0.6,
        xlabel_y_coordinate=-0.75 / len(algos))  # about half an inch below the axis, under its tick labels
    return fig


def curve_figure(curves: list[dict]) -> Figure:
    """Score vs NFE (log axis), one line per solver with s.e. bars, one panel per dataset x algorithm."""
    from matplotlib.figure import Figure

    panels = list(dict.fromkeys((c["dataset"], c["algo"]) for c in curves))
    columns = min(3, len(panels))
    fig = Figure(figsize=(4.5 * columns, 3.6 * math.ceil(len(panels) / columns)))
    axes = fig.subplots(math.ceil(len(panels) / columns), columns, squeeze=False).flat
    for ax, (dataset, algo) in zip(axes, panels):
        mine = [c for c in curves if (c["dataset"], c["algo"]) == (dataset, algo)]
        for solver in dict.fromkeys(c["solver"] for c in mine):
            points = sorted((c["nfe"], c["score"], c["se"] or 0.0) for c in mine if c["solver"] == solver)
            nfe, score, se = zip(*points)
            ax.errorbar(nfe, score, yerr=se, marker="o", markersize=3, capsize=2, label=solver)
        ticks = sorted({c["nfe"] for c in mine})
        ax.set(xscale="log", title=f"{algo} on {dataset}", xlabel="NFE (network calls per action)",
               ylabel="normalized score")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def hparams(settings: list[dict]) -> list[dict]:
    """The groups' settings as TensorBoard hparams with the same keys and one type per key (TensorBoard's
    HParams view takes its columns from one run): numbers stay numbers (nan where a group lacks the key),
    anything else becomes text."""
    keys = sorted(set().union(*settings))
    numeric = {key for key in keys if all(isinstance(s[key], (int, float)) and not isinstance(s[key], bool)
                                          for s in settings if key in s)}
    return [{key: float(s.get(key, math.nan)) if key in numeric else str(s.get(key, "")) for key in keys}
            for s in settings]


def write_tensorboard(tb: Path, groups: dict[tuple[str, str], list[Run]], rows: list[dict], table: str) -> None:
    """The table as text, and one HParams session per dataset x algorithm (tb/<dataset>/<algo>): its settings,
    and its mean, s.e. and number of seeds as metrics, so all of them compare in one view."""
    from torch.utils.tensorboard import SummaryWriter

    cells = {(r["dataset"], r["algo"]): r for r in rows if r["statistic"] == "mean over seeds"}
    with SummaryWriter(str(tb)) as writer:
        writer.add_text("aggregate/table", table)
        for (dataset, algo), hp in zip(groups, hparams([members[0].settings for members in groups.values()])):
            r = cells[dataset, algo]
            writer.add_hparams(hp, {"score/mean": r["score"], "score/se": math.nan if r["se"] is None else r["se"],
                                    "score/seeds": r["runs"]}, run_name=f"{dataset}/{algo}")
