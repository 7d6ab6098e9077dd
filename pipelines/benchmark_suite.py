"""Many datasets x algorithms in one command: build what is missing, train, evaluate, tabulate.

    python pipelines/benchmark_suite.py                                    # CPU preset: 9 tasks x 5 algorithms
    python pipelines/benchmark_suite.py 'datasets=[hopper-medium-replay]' 'algos=[dql,bc]'
    python pipelines/benchmark_suite.py 'datasets=[mujoco/hopper/medium-v0]'   # any Minari id
    python pipelines/benchmark_suite.py suite=gpu                          # paper-order budgets on one GPU
    python pipelines/benchmark_suite.py hydra/launcher=slurm hydra.launcher.partition=gpu   # jobs on SLURM

For every dataset (a task name from configs/task, or any Minari id):
1. build it with the project's builder (configs/make_dataset.yaml) when the Minari root lacks it;
2. for every algorithm, one job (a `Cell`): train at the preset's budget (configs/train.yaml), then
   evaluate the final checkpoint, and each of its act variants, on the same `episodes` env seeds
   (configs/evaluate.yaml), so a cell's evaluations run while slower trainings go on; with
   `checkpoints=N`, the last N checkpoints, each on its share of those seeds, pooled.
Builds and cells go through the suite's Hydra launcher (`cleandiff_rl.launching`): joblib, `jobs` at a
time, by default; `hydra/launcher=slurm` (or any installed launcher) runs the same jobs on a cluster.
A rerun with the same run_dir resumes unfinished trainings and reuses finished trainings and each
cell's evaluations (run_dir/<dataset>/<algo>/evaluations/<label>/evaluation.json). Writes results.json,
results.csv, scores.png and TensorBoard (run_dir/tb); every job logs to its run_dir/log.txt.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from cleandiff_rl.agents import Agent, get_algorithm
from cleandiff_rl.data import dataset_average
from cleandiff_rl.data.builder import build_datasets
from cleandiff_rl.data.registry import build_command, datasets_root, parse_id, task_of
from cleandiff_rl.evaluation import evaluate_checkpoint, return_statistics
from cleandiff_rl.launching import Logged, current_launcher, launch, launcher_name, override
from cleandiff_rl.training import CONFIG_DIR, compose_config, params_overrides, train, wall_budget
from cleandiff_rl.utils import atomic_write, load_checkpoint, write_csv
from cleandiff_rl.utils.cli import user_errors


@dataclass(frozen=True)
class Dataset:
    name: str        # the table's column and the run folder: the task name, or the id with '/' -> '_'
    id: str          # the Minari dataset id
    task: str | None  # the configs/task entry whose per-task settings apply, if any


def resolve_datasets(entries: list[str]) -> list[Dataset]:
    """Task names and Minari ids -> datasets; an entry that is neither is one clear error."""
    tasks = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))
    datasets = []
    for entry in entries:
        entry = str(entry)
        if entry in tasks:
            datasets.append(Dataset(entry, compose_config([f"task={entry}"]).dataset, entry))
            continue
        try:
            _, level, _ = parse_id(entry)
        except ValueError:
            raise ValueError(f"unknown dataset {entry!r}: neither a task ({', '.join(tasks)}) nor a Minari id "
                             "('namespace/name-vN')") from None
        task = f"{task_of(entry)}-{level}"
        datasets.append(Dataset(entry.replace("/", "_"), entry, task if task in tasks else None))
    if len({d.id for d in datasets}) != len(datasets):
        raise ValueError(f"datasets lists a dataset twice: {[d.id for d in datasets]}")
    return datasets


def build_missing(datasets: list[Dataset], cfg: DictConfig, out: Path) -> None:
    """Build the datasets the Minari root lacks: one builder run (one SAC training, resumable, in
    out/builds/) per env."""
    root = datasets_root()
    missing = [d for d in datasets if not (root / d.id).is_dir()]
    unbuildable = [d.id for d in missing if build_command(d.id) is None]
    if unbuildable:
        raise ValueError(f"datasets {unbuildable} are not in {root}, and the builder only makes "
                         "'<namespace>/<env>/<level>-v<N>' ids; set MINARI_DATASETS_PATH or datasets_root")
    runs: dict[tuple[str, str, int], list[str]] = {}  # (env, namespace, version) -> levels
    for d in missing:
        namespace, level, version = parse_id(d.id)
        runs.setdefault((task_of(d.id), namespace.rsplit("/", 1)[0], version), []).append(level)
    jobs = [[f"env={env}", f"namespace={namespace}", f"version={version}", f"levels=[{','.join(levels)}]",
             f"make_dataset={cfg.build_preset}", f"seed={cfg.seed}",
             override("run_dir", out / "builds" / f"{namespace}-{env}-v{version}")]
            for (env, namespace, version), levels in runs.items()]
    run_jobs(build_datasets, "make_dataset", jobs, cfg, out, "build")


def run_jobs(task: Callable[[DictConfig], Any], config_name: str, jobs: list[list[str]], cfg: DictConfig,
             out: Path, stage: str) -> list[Any]:
    """Run one stage's jobs (pipeline overrides of `config_name`) through the suite's Hydra launcher:
    joblib, `jobs` at a time, unless `hydra/launcher=` names another. Each job logs to its run_dir/log.txt
    (its Hydra folder goes under out/jobs/<stage>)."""
    if not jobs:
        return []
    launcher = current_launcher(cfg)
    print(f"{stage}: {len(jobs)} job(s) through {launcher_name(launcher)}; each logs to its run_dir/log.txt",
          flush=True)
    return launch(Logged(task), config_name, jobs, launcher, out / "jobs" / stage)


def lr_overrides(algo: str, batch_size: int | None, scaling: str) -> list[str]:
    """Scale every learning rate of `algo` with its batch size against the default one:
    lr * (B / B_default) ** p, with p = 0 (none), 1/2 (sqrt) or 1 (linear)."""
    power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[scaling]
    default_batch = compose_config([f"algo={algo}"]).batch_size
    if batch_size is None or power == 0.0 or batch_size == default_batch:
        return []
    factor = (batch_size / default_batch) ** power
    config = get_algorithm(algo).Config()
    return [f"algo.params.{key}={value * factor:.6g}" for key, value in vars(config).items() if key.endswith("lr")]


def algo_overrides(cfg: DictConfig, algo: str) -> list[str]:
    """The preset's settings for `algo` as train.py overrides."""
    overrides = [f"algo={algo}", f"steps={cfg.steps[algo]}", f"seed={cfg.seed}", f"device={cfg.device}",
                 f"eval_every={cfg.eval_every}", "eval_episodes=5", f"compile={algo in cfg.compile}",
                 override("max_minutes", cfg.max_minutes), f"checkpoint_every={cfg.checkpoint_every[algo]}",
                 f"keep_checkpoints={cfg.checkpoints}"]
    batch_size = cfg.batch_size.get(algo)
    if batch_size is not None:
        overrides.append(f"batch_size={batch_size}")
    overrides += lr_overrides(algo, batch_size, cfg.lr_scaling)
    return overrides + params_overrides(cfg.params, algo)


def train_job(dataset: Dataset, overrides: list[str], run_dir: Path) -> list[str]:
    """train.py's overrides for one algorithm (its preset `overrides`) on one dataset."""
    return [*overrides, f"dataset={dataset.id}", override("run_dir", run_dir)] + (
        [] if dataset.task is None else [f"task={dataset.task}"])


def timing(checkpoint: Path) -> dict:
    """A finished training's updates (fewer than `steps` where `max_minutes` stopped it), wall time, time spent
    updating (without its periodic evaluations) and batch."""
    state = load_checkpoint(checkpoint)
    wall = state["wall_seconds"]
    return {"steps": state["step"], "wall_seconds": wall, "update_seconds": wall - state.get("eval_seconds", 0.0),
            "batch_size": state["run_config"]["batch_size"]}


def evaluated_checkpoints(run_dir: Path, count: int) -> list[tuple[Path, str]]:
    """The checkpoints a cell evaluates, oldest first, each with its evaluations' subfolder: the final one
    alone (count 1, no subfolder), else the `count` latest the training kept (checkpoints/<updates>.pt)."""
    if count == 1:
        return [(run_dir / "checkpoint.pt", "")]
    kept = sorted((run_dir / "checkpoints").glob("*.pt"))[-count:]
    if len(kept) < count:
        raise ValueError(f"{run_dir} holds {len(kept)} kept checkpoint(s), not the last {count} to evaluate: it "
                         f"was trained with fewer (keep_checkpoints), or for fewer than {count} x checkpoint_every "
                         "updates; checkpoints=1 evaluates its final one")
    return [(path, path.stem) for path in kept]


@dataclass(frozen=True)
class Episodes:
    """The env seeds one evaluation runs: `count` episodes from env seed `seed` on."""
    count: int
    seed: int


def episode_shares(cfg: DictConfig) -> list[Episodes]:
    """The suite's `episodes` (env seeds seed+1000 ...) split evenly over the `checkpoints` it evaluates."""
    if cfg.episodes % cfg.checkpoints:
        raise ValueError(f"episodes={cfg.episodes} must split evenly over checkpoints={cfg.checkpoints}")
    share = cfg.episodes // cfg.checkpoints
    return [Episodes(share, cfg.seed + 1000 + i * share) for i in range(cfg.checkpoints)]


def fresh_record(folder: Path, checkpoint: Path, episodes: Episodes) -> dict | None:
    """The evaluation in `folder` when it was written after `checkpoint` on these episodes."""
    done = folder / "evaluation.json"
    if not done.is_file() or done.stat().st_mtime <= checkpoint.stat().st_mtime:
        return None
    record = json.loads(done.read_text())
    return record if (record["episodes"], record.get("seed")) == (episodes.count, episodes.seed) else None


def evaluation_job(checkpoint: Path, folder: Path, settings: dict, act_settings: dict, episodes: Episodes,
                   device: str) -> list[str] | None:
    """evaluate.py's overrides for one checkpoint and act variant; None when `folder` already holds that
    evaluation of this checkpoint (`fresh_record`, same settings), acting as the policy acts now with them
    (`act_settings`; not if a default changed since)."""
    record = fresh_record(folder, checkpoint, episodes)
    if record is not None and (record["settings"], record.get("act_settings")) == (settings, act_settings):
        return None
    return [override("checkpoint", checkpoint), override("run_dir", folder), f"episodes={episodes.count}",
            f"seed={episodes.seed}", f"device={device}",
            *(override(f"+settings.{key}", value) for key, value in settings.items())]


def default_acts_as(default: Path, checkpoint: Path, settings: dict, act_settings: dict,
                    episodes: Episodes) -> dict | None:
    """The default acting's evaluation (in folder `default`) recorded as the act variant `settings`, when the
    default acted exactly as that variant acts (its `acts_as` equals the variant's `act_settings`: e.g. IDQL's
    `selection: auto` chose argmax here); else None. So each distinct acting of a checkpoint is evaluated once."""
    record = fresh_record(default, checkpoint, episodes)
    if record is None or record.get("acts_as") != act_settings:
        return None
    return {**record, "settings": settings, "act_settings": act_settings, "acting": None,
            "same_as": str(default / "evaluation.json")}


def thousands(count: int) -> str:
    """An update count for a table: '30k', or the number itself below 1000."""
    return f"{count / 1000:.0f}k" if count >= 1000 else str(count)


def pooled(records: list[dict]) -> dict:
    """One act setting's evaluations of the last checkpoints as one: their episodes pooled (mean ± s.e.), the
    acting each chose where it chose (`<updates>: <acting>`), and `same_as` where every one took the default's."""
    if len(records) == 1:
        return records[0]
    actings = [f"{thousands(r['updates'])}: {r['acting']}" for r in records if r.get("acting")]
    return {**return_statistics([x for r in records for x in r["returns"]], records[0]["dataset_id"],
                                records[0]["env_id"]),
            "acting": "; ".join(actings) or None, **({"same_as": True} if all("same_as" in r for r in records) else {})}


class Cell:
    """One dataset x algorithm as one launcher job (a task of train.py's config): train (or resume, or
    reuse a finished run), then evaluate its final checkpoint (or its last `checkpoints`, each on its share of
    the episodes) with each act setting whose evaluation is not already on disk, each logging to its own
    folder; an act variant the default acting already acted as on a checkpoint takes the default's evaluation
    there. Picklable, for joblib and submitit workers."""

    def __init__(self, evaluations: dict[str, list[tuple[Path, dict]]], cfg: DictConfig) -> None:
        self.evaluations = evaluations  # run_dir -> [(evaluation folder, act settings)]
        self.checkpoints, self.device, self.shares = int(cfg.checkpoints), str(cfg.device), episode_shares(cfg)

    def __call__(self, cfg: DictConfig) -> None:
        train(cfg)
        evaluations = self.evaluations[str(cfg.run_dir)]  # the default acting first
        for (checkpoint, sub), episodes in zip(evaluated_checkpoints(Path(cfg.run_dir), self.checkpoints), self.shares):
            for base, settings in evaluations:
                folder = base / sub
                act_settings = Agent.load(checkpoint, "cpu").with_settings(settings).act_settings()
                job = evaluation_job(checkpoint, folder, settings, act_settings, episodes, self.device)
                if job is None:
                    continue
                default = evaluations[0][0] / sub
                same = settings and default_acts_as(default, checkpoint, settings, act_settings, episodes)
                if not same:
                    Logged(evaluate_checkpoint)(compose_config(job, config_name="evaluate"))
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                with open(folder / "log.txt", "a") as log:
                    print(f"acts exactly as the default acting did: its evaluation, {same['same_as']}", file=log)
                atomic_write(folder / "evaluation.json", lambda f: json.dump(same, f, indent=1))


def format_table(rows: list[dict], datasets: list[Dataset]) -> str:
    """A markdown table: one row per algorithm (and act variant) with its updates and updates/s, one score column
    per dataset, mean ± s.e.; below it, how each policy that chooses its acting per checkpoint acted."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cell = {(r["label"], r["dataset"]): r for r in rows}
    copies = {(r["algo"], r["dataset"]): r["label"] for r in rows if r.get("same_as_default")}
    notes = [f"- {r['label']} on {r['dataset']}: {r['acting']}" + (
        f" (the same evaluation as {copies[r['algo'], r['dataset']]})" if (r["algo"], r["dataset"]) in copies else "")
        for r in rows if r.get("acting")]
    lines = ["| algo | updates | updates/s | " + " | ".join(d.name for d in datasets) + " |",
             "|---|---:|---:|" + "---:|" * len(datasets)]
    for label in labels:
        scores = []
        for d in datasets:
            r = cell.get((label, d.name))
            scores.append("" if r is None else f"{r['score_mean']:.1f}" + (
                f" ± {r['score_se']:.1f}" if r["score_se"] is not None else ""))
        trained = [r for r in rows if r["label"] == label and r["updates_per_second"]]
        counts = sorted({r["steps"] for r in trained})  # one count, or a range where max_minutes stopped runs
        steps = "-".join(thousands(n) for n in counts[:1] + counts[1:][-1:])
        speed = np.mean([r["updates_per_second"] for r in trained]) if trained else float("nan")
        lines.append(f"| {label} | {steps} | {speed:.1f} | " + " | ".join(scores) + " |")
    if notes:  # policies that decide their acting per checkpoint (selection: auto)
        lines += ["", "acting chosen per checkpoint:", *notes]
    return "\n".join(lines).replace("| nan |", "|  |")


def score_figure(rows: list[dict], datasets: list[Dataset]):  # -> matplotlib Figure
    """Normalized score per dataset, a bar group per dataset (s.e. as error bars), the dataset average
    as a black line across its group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in rows if r["algo"] is not None))
    cell = {(r["label"], r["dataset"]): r for r in rows}
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(datasets) * max(1, len(labels) / 3)) + 2.5, 4.5))
    for i, label in enumerate(labels):
        xs = [j for j, d in enumerate(datasets) if (label, d.name) in cell]
        found = [cell[(label, datasets[j].name)] for j in xs]
        ax.bar([x - 0.4 + (i + 0.5) * width for x in xs], [r["score_mean"] for r in found], width, label=label,
               yerr=[r["score_se"] or 0.0 for r in found], capsize=2)
    for j, d in enumerate(datasets):
        ax.hlines(cell[("dataset average", d.name)]["score_mean"], j - 0.45, j + 0.45, colors="black",
                  label="dataset average" if j == 0 else None)
    ax.set_xticks(range(len(datasets)), [d.name for d in datasets], rotation=20, ha="right")
    ax.set_ylabel("normalized score (D4RL x100)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    return fig


@hydra.main(config_path="../configs", config_name="benchmark_suite", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> None:
    if cfg.datasets_root is not None:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(cfg.datasets_root).resolve())
    algos = [str(a) for a in cfg.algos]
    for algo in algos:
        get_algorithm(algo)
        if cfg.steps.get(algo) is None:
            raise ValueError(f"the suite preset {cfg.suite_name!r} sets no budget for {algo!r} (steps.{algo})")
    if not isinstance(cfg.checkpoints, int) or cfg.checkpoints < 1:
        raise ValueError(f"checkpoints={cfg.checkpoints}: the suite evaluates the last N >= 1 checkpoints")
    wall_budget(cfg.max_minutes)
    episode_shares(cfg)  # episodes split evenly over the checkpoints, checked before anything runs
    datasets = resolve_datasets(list(cfg.datasets))
    out = Path(cfg.run_dir)
    build_missing(datasets, cfg, out)
    print(f"{len(datasets)} datasets x {len(algos)} algorithms under {datasets_root()}")

    cells = [(d, a) for a in algos for d in datasets]  # the slow algorithms first keeps the pool busy
    evaluations = []  # (dataset, algo, label, act settings): each algorithm's default acting, then its variants
    for d, algo in cells:
        variants = OmegaConf.to_container(cfg.act_variants[algo]) if cfg.act_variants.get(algo) else {}
        evaluations += [(d, algo, algo, {})] + [(d, algo, f"{algo} ({name})", s) for name, s in variants.items()]
    folders = [out / d.name / algo / "evaluations" / re.sub(r"[^A-Za-z0-9.=_-]+", "_", label)
               for d, algo, label, _ in evaluations]
    per_run: dict[str, list[tuple[Path, dict]]] = {}
    for (d, algo, _, settings), folder in zip(evaluations, folders):
        per_run.setdefault(str(out / d.name / algo), []).append((folder, settings))
    run_jobs(Cell(per_run, cfg), "train", [train_job(d, algo_overrides(cfg, a), out / d.name / a) for d, a in cells],
             cfg, out, "train-evaluate")
    timings = {(d, a): timing(out / d.name / a / "checkpoint.pt") for d, a in cells}
    evaluated = []
    for (d, algo, label, _), folder in zip(evaluations, folders):
        result = pooled([json.loads((folder / sub / "evaluation.json").read_text())
                         for _, sub in evaluated_checkpoints(out / d.name / algo, cfg.checkpoints)])
        run = timings[(d, algo)]
        evaluated.append({
            "dataset": d.name, "dataset_id": d.id, "label": label, "algo": algo, "steps": run["steps"],
            "batch_size": run["batch_size"], "train_minutes": run["wall_seconds"] / 60,
            "updates_per_second": run["steps"] / run["update_seconds"], "score_mean": result["score_mean"],
            "score_se": result["score_se"], "return_mean": result["return_mean"], "episodes": cfg.episodes,
            "acting": result.get("acting"), "same_as_default": "same_as" in result})
    references = [{"dataset": d.name, "dataset_id": d.id, "label": "dataset average", "algo": None, "steps": 0,
                   "batch_size": 0, "train_minutes": 0.0, "updates_per_second": None,
                   "score_mean": dataset_average(d.id), "score_se": None, "return_mean": None, "episodes": None,
                   "acting": None, "same_as_default": False} for d in datasets]
    rows = references + evaluated
    table = format_table(rows, datasets)

    atomic_write(out / "results.json", lambda f: json.dump(
        {"suite": cfg.suite_name, "config": OmegaConf.to_container(cfg, resolve=True), "rows": rows}, f, indent=2))
    write_csv(out / "results.csv", rows)
    fig = score_figure(rows, datasets)
    fig.savefig(out / "scores.png", dpi=120)
    writer = SummaryWriter(str(out / "tb"))
    for row in evaluated:
        writer.add_scalar(f"suite/{row['dataset']}/{row['label']}", row["score_mean"], row["steps"])
    writer.add_text("suite/table", table)
    writer.add_figure("suite/scores", fig)
    writer.close()
    budget = "" if cfg.max_minutes is None else f", at most {cfg.max_minutes} minutes per training"
    pooling = "" if cfg.checkpoints == 1 else f" of the last {cfg.checkpoints} checkpoints"
    print(f"\nnormalized score (D4RL x100), mean ± s.e. over {cfg.episodes} episodes{pooling}; "
          f"suite {cfg.suite_name}, device {cfg.device}{budget}\n{table}\n\nresults: {out / 'results.json'}, {out / 'scores.png'}   "
          f"TensorBoard: tensorboard --logdir {out}")


if __name__ == "__main__":
    main()
