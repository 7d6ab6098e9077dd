"""The benchmark suite's library: many datasets x algorithms in one run, tabulated, plotted and written as a page.

`run_suite(cfg)` is pipelines/benchmark_suite.py's job (configs/benchmark_suite.yaml). For every dataset (a task
name from configs/task, or any Minari id):
1. build it with the project's builder (configs/make_dataset.yaml) when the Minari root lacks it;
2. for every algorithm, one job (a `Cell`): train at the preset's budget (configs/train.yaml), acting by the
   preset's rule (`acting`, one per algorithm, else the paper's), then evaluate the final checkpoint, the
   paper's acting (`<algo> (paper)`) and each of its act variants, on the same `episodes` env seeds
   (configs/evaluate.yaml), so a cell's evaluations run while slower trainings go on; with
   `checkpoints=N`, the last N checkpoints, each on its share of those seeds, pooled.
Builds and cells go through the suite's Hydra launcher (`cleandiff_rl.launching`). A rerun with the same run_dir
resumes unfinished trainings and reuses finished trainings and each cell's evaluations
(run_dir/<dataset>/<algo>/evaluations/<label>/evaluation.json), so the results and the page (`report`) can be
written again from a finished run folder without training. Writes results.json, results.csv, scores.png,
TensorBoard (run_dir/tb) and, with `report=<page>.md`, one Markdown page with its figure beside it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from cleandiff_rl.agents import Agent, get_algorithm
from cleandiff_rl.agents.acting import act_only_settings
from cleandiff_rl.data import dataset_average
from cleandiff_rl.data.builder import build_datasets
from cleandiff_rl.data.registry import build_command, datasets_root, parse_id, task_of
from cleandiff_rl.ensemble import UPDATES as ENSEMBLES
from cleandiff_rl.evaluation import evaluate_checkpoint, return_statistics
from cleandiff_rl.launching import Logged, current_launcher, launch, launcher_name, override
from cleandiff_rl.training import CONFIG_DIR, compose_config, params_overrides, train, wall_budget
from cleandiff_rl.utils import atomic_write, format_table, load_checkpoint, write_csv


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
    return overrides + params_overrides(cfg.params, algo) + params_overrides(cfg.acting, algo)


def paper_acting(algo: str, preset: dict) -> dict:
    """The act settings of `algo`'s paper in place of the preset's acting (`preset`): the config's defaults of
    the settings the preset changes, and of `selection`; {} for a policy without acting rules (BC, planners
    the preset leaves alone)."""
    config = get_algorithm(algo).Config()
    keys = [*(["selection"] if hasattr(config, "selection") else []), *preset]
    return {key: getattr(config, key) for key in dict.fromkeys(keys)}


def check_acting(acting: dict) -> None:
    """One clear error for a preset's `acting` that names a training setting (one an update reads)."""
    for algo, settings in acting.items():
        allowed = act_only_settings(get_algorithm(algo).Config)
        other = sorted(set(settings or {}) - set(allowed))
        if other:
            raise ValueError(f"acting.{algo} sets {other}, which are not act-time settings of {algo} "
                             f"({', '.join(allowed) or 'none'}); training settings go under params.{algo}")


def train_job(dataset: Dataset, overrides: list[str], run_dir: Path) -> list[str]:
    """train.py's overrides for one algorithm (its preset `overrides`) on one dataset."""
    return [*overrides, f"dataset={dataset.id}", override("run_dir", run_dir)] + (
        [] if dataset.task is None else [f"task={dataset.task}"])


def suite_seeds(cfg: DictConfig) -> list[int]:
    """The training seeds of every dataset x algorithm: `seeds`, or the one `seed` where it is null."""
    if cfg.get("seeds") is None:
        return [int(cfg.seed)]
    seeds = [int(seed) for seed in cfg.seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds}: the suite trains one or more distinct seeds per dataset x algorithm")
    return seeds


def train_jobs(cfg: DictConfig, dataset: Dataset, algo: str, run_dir: Callable[[Dataset, str, int], Path]) -> list[list[str]]:
    """train.py's jobs for one algorithm on one dataset: one run; with `seeds`, one seed ensemble (train.py
    `seeds=[...]`, every seed in one process, each into its own run folder) where the algorithm has one
    (`cleandiff_rl.ensemble`), else one run per seed."""
    overrides, seeds = algo_overrides(cfg, algo), suite_seeds(cfg)
    if cfg.get("seeds") is None:
        return [train_job(dataset, overrides, run_dir(dataset, algo, seeds[0]))]
    if algo in ENSEMBLES:
        folder = run_dir(dataset, algo, seeds[0]).parent / "seed${seed}"
        return [train_job(dataset, [*overrides, override("seeds", seeds)], folder)]
    return [train_job(dataset, [*overrides, f"seed={seed}"], run_dir(dataset, algo, seed)) for seed in seeds]


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
        paths = train(cfg)
        for path in paths if isinstance(paths, list) else [paths]:  # `seeds`: a seed ensemble's N run folders
            self.evaluate_run(path.parent)

    def evaluate_run(self, run_dir: Path) -> None:
        evaluations = self.evaluations[str(run_dir)]  # the default acting first
        for (checkpoint, sub), episodes in zip(evaluated_checkpoints(run_dir, self.checkpoints), self.shares):
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


def score_text(mean: float, se: float | None) -> str:
    """A score cell: "mean ± s.e.", or the mean alone where there is no s.e."""
    return f"{mean:.1f}" + ("" if se is None else f" ± {se:.1f}")


def updates_text(rows: list[dict]) -> str:
    """The updates a label's runs made: one count, or a range where max_minutes stopped some ('12k-30k')."""
    counts = sorted({r["steps"] for r in rows if r["steps"]})
    return "-".join(thousands(n) for n in counts[:1] + counts[1:][-1:])


def suite_table(rows: list[dict], datasets: list[Dataset]) -> str:
    """The suite's table: one row per algorithm (and act variant) with its updates and updates/s, one score column
    per dataset, mean ± s.e.; below it, how each policy that chooses its acting per checkpoint acted."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cell = seed_cells(rows)  # over the training seeds (`seeds`)
    copies = {(r["algo"], r["dataset"]): r["label"] for r in rows if r.get("same_as_default")}
    notes = [f"- {r['label']} on {r['dataset']}: {r['acting']}" + (
        f" (the same evaluation as {copies[r['algo'], r['dataset']]})" if (r["algo"], r["dataset"]) in copies else "")
        for r in rows if r.get("acting")]
    lines = []
    for label in labels:
        scores = [score_text(r["score_mean"], r["score_se"]) if (r := cell.get((label, d.name))) else ""
                  for d in datasets]
        trained = [r for r in rows if r["label"] == label and r["updates_per_second"]]
        speed = f"{np.mean([r['updates_per_second'] for r in trained]):.1f}" if trained else ""
        lines.append([label, updates_text(trained), speed, *scores])
    table = format_table(["algo", "updates", "updates/s", *(d.name for d in datasets)], lines)
    if notes:  # policies that decide their acting per checkpoint (selection: auto)
        table += "\n\nacting chosen per checkpoint:\n" + "\n".join(notes)
    return table


def score_figure(rows: list[dict], datasets: list[Dataset]):  # -> matplotlib Figure
    """Normalized score per dataset, a bar group per dataset (s.e. as error bars), the dataset average
    as a black line across its group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in rows if r["algo"] is not None))
    cell = seed_cells(rows)  # over the training seeds (`seeds`)
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


def settings_text(settings: dict) -> str:
    """Act settings as `key=value, ...`."""
    return ", ".join(f"{key}={value}" for key, value in settings.items())


def acting_rules(algo: str, preset: dict) -> dict[str, str]:
    """How each of `algo`'s suite rows acts, by label: its own row by the preset's rule (`preset`, else the paper's),
    `<algo> (paper)` by the paper's."""
    paper = paper_acting(algo, preset)
    own = f"preset: {settings_text(preset)}" if preset else (f"paper's: {settings_text(paper)}" if paper else "")
    return {algo: own, **({f"{algo} (paper)": f"paper's: {settings_text(paper)}"} if paper else {})}


def machine() -> str:
    """The CPU model and cores, the GPU (if any) and torch's version, for a results page."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = models[0].strip() if models else cpu
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def command_line() -> str:
    """The command that runs this process, as typed: the script relative to the working directory."""
    script = Path(sys.argv[0])
    if script.is_absolute() and script.is_relative_to(Path.cwd()):
        script = script.relative_to(Path.cwd())
    return shlex.join(["python", str(script), *sys.argv[1:]])


def seed_cells(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Rows by (label, dataset), over training seeds: mean ± s.e. of the seeds' scores (sample std / sqrt(n));
    one seed keeps its own (episode) s.e."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["dataset"]), []).append(r)
    cells = {}
    for key, found in groups.items():
        scores = [r["score_mean"] for r in found]
        se = (float(np.std(scores, ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else found[0]["score_se"])
        cells[key] = {**found[0], "score_mean": float(np.mean(scores)), "score_se": se, "seeds": len(found)}
    return cells


# What a policy should reach against BC, by the data's level (the suite's targets): the first level the name holds
BC_MARGINS = {"medium-replay": 5.0, "medium-expert": -2.0, "expert": -2.0}


def bc_margin(dataset_name: str) -> float | None:
    """The target margin over BC for a dataset whose name gives its level; None where it gives none."""
    return next((margin for level, margin in BC_MARGINS.items() if level in dataset_name), None)


def against_bc(cells: dict[tuple[str, str], dict], labels: list[str], datasets: list[Dataset]) -> str:
    """Each policy's score minus BC's (± the s.e. of the difference) per dataset and, where the dataset's name
    gives its level, whether that meets the target margin (`BC_MARGINS`)."""
    def cell(label: str, d: Dataset) -> str:
        mine, bc = cells.get((label, d.name)), cells.get(("bc", d.name))
        if mine is None or bc is None:
            return ""
        diff = mine["score_mean"] - bc["score_mean"]
        ses = [c["score_se"] for c in (mine, bc) if c["score_se"] is not None]
        text = f"{diff:+.1f}" + (f" ± {math.hypot(*ses):.1f}" if len(ses) == 2 else "")
        margin = bc_margin(d.name)
        return text if margin is None else f"{text} ({'meets' if diff >= margin else 'misses'} {margin:+g})"
    return format_table(["algo", *(d.name for d in datasets)], [[label, *(cell(label, d) for d in datasets)]
                                                                 for label in labels], "l" + "r" * len(datasets))


def report_page(rows: list[dict], datasets: list[Dataset], cfg: DictConfig, figure: str, command: str,
                host: str, date: str) -> str:
    """The suite's results as one Markdown page: algorithm x dataset (the dataset's average and BC first, as
    references), how each row acts, the figure (`figure`, a file beside the page), and how the page was made."""
    cells = seed_cells(rows)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    references = [label for label in ("dataset average", "bc", "bc (paper)") if label in labels]
    order = references + [label for label in labels if label not in references]
    seeds = sorted({r["seed"] for r in rows if r.get("seed") is not None})
    table = format_table(
        ["algo", "acting", "updates", *(d.name for d in datasets)],
        [[f"{label} (reference)" if label in references else label,
          next((c["rule"] for (lbl, _), c in cells.items() if lbl == label and c.get("rule")), ""),
          updates_text([r for r in rows if r["label"] == label]),
          *(score_text(c["score_mean"], c["score_se"]) if (c := cells.get((label, d.name))) else "" for d in datasets)]
         for label in order], "llr")
    pooling = "" if cfg.checkpoints == 1 else f", pooled over the last {cfg.checkpoints} checkpoints"
    spread = (f"mean ± standard error over {len(seeds)} training seeds ({', '.join(map(str, seeds))})"
              if len(seeds) > 1 else
              f"one training seed ({seeds[0] if seeds else cfg.seed}): ± is the standard error over its "
              f"{cfg.episodes} evaluation episodes{pooling}, not over training seeds")
    notes = [f"- {r['label']} on {r['dataset']}: {r['acting']}" for r in rows if r.get("acting")]
    algos = list(dict.fromkeys(r["algo"] for r in rows if r["algo"] is not None))
    budget = ", ".join(f"{algo} {thousands(int(cfg.steps[algo]))}" for algo in algos)
    batches = ", ".join(f"{algo} {cfg.batch_size[algo]}" if cfg.batch_size.get(algo) else f"{algo} its own"
                        for algo in algos)
    lines = [
        f"# Benchmark suite: preset `{cfg.suite_name}`", "",
        f"Normalized score (D4RL x100) of each policy's evaluation on {cfg.episodes} episodes (env seeds "
        f"{cfg.seed + 1000} on); {spread}. The dataset's average and BC are the reference rows. "
        "`acting` is how the row's policy acts: the preset's rule, or the paper's (`<algo> (paper)`).", "",
        table, "",
        *(["Acting chosen per checkpoint (`selection: auto`):", *notes, ""] if notes else []),
        f"![normalized score per algorithm and dataset, s.e. as error bars]({figure})", "",
        *(["## Against BC", "",
           "Each policy's score minus BC's, ± the standard error of the difference. Where the dataset's name gives "
           "its level, the target it meets or misses: at least BC + 5 on medium-replay data, at least BC - 2 on "
           "expert and medium-expert data.", "",
           against_bc(cells, [label for label in order if label not in references], datasets), ""]
          if "bc" in labels else []),
        "## How this page was made", "",
        f"- command: `{command}`",
        f"- preset: `{cfg.suite_name}` (updates: {budget}; batch sizes: "
        f"{batches}; "
        f"wall budget per training: {'none' if cfg.max_minutes is None else f'{cfg.max_minutes} minutes'}; "
        f"device: {cfg.device})",
        f"- machine: {host}",
        f"- date: {date}", ""]
    return "\n".join(lines)


def write_report(page: Path, rows: list[dict], datasets: list[Dataset], cfg: DictConfig) -> None:
    """The page `report_page` describes at `page`, its figure beside it (`<page>.png`), each written atomically."""
    figure = page.with_suffix(".png")
    fig = score_figure(rows, datasets)
    page.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(figure, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), binary=True)
    text = report_page(rows, datasets, cfg, figure.name, command_line(), machine(),
                       datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    atomic_write(page, lambda f: f.write(text))


def run_suite(cfg: DictConfig) -> list[dict]:
    """The suite a `configs/benchmark_suite.yaml` config describes (see the module); returns its result rows."""
    if cfg.datasets_root is not None:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(cfg.datasets_root).resolve())
    algos = [str(a) for a in cfg.algos]
    for algo in algos:
        get_algorithm(algo)
        if cfg.steps.get(algo) is None:
            raise ValueError(f"the suite preset {cfg.suite_name!r} sets no budget for {algo!r} (steps.{algo})")
    if not isinstance(cfg.checkpoints, int) or cfg.checkpoints < 1:
        raise ValueError(f"checkpoints={cfg.checkpoints}: the suite evaluates the last N >= 1 checkpoints")
    for algo in algos:  # the last `checkpoints` kept checkpoints must exist when training ends
        if cfg.checkpoints > 1 and cfg.checkpoints * int(cfg.checkpoint_every[algo]) > int(cfg.steps[algo]):
            raise ValueError(f"steps.{algo}={cfg.steps[algo]} keeps fewer than the last {cfg.checkpoints} checkpoints "
                             f"(checkpoint_every.{algo}={cfg.checkpoint_every[algo]}) the suite evaluates: lower "
                             f"checkpoint_every.{algo}, or pass checkpoints=1")
    wall_budget(cfg.max_minutes)
    page = None if cfg.get("report") is None else Path(cfg.report)
    if page is not None and page.suffix != ".md":
        raise ValueError(f"report={cfg.report}: the results page is a Markdown file (<name>.md); its figure "
                         "goes beside it as <name>.png")
    acting = OmegaConf.to_container(cfg.acting)
    check_acting({algo: acting.get(algo) for algo in algos})
    episode_shares(cfg)  # episodes split evenly over the checkpoints, checked before anything runs
    suite_seeds(cfg)
    datasets = resolve_datasets(list(cfg.datasets))
    out = Path(cfg.run_dir)
    build_missing(datasets, cfg, out)
    print(f"{len(datasets)} datasets x {len(algos)} algorithms under {datasets_root()}")

    cells = [(d, a) for a in algos for d in datasets]  # the slow algorithms first keeps the pool busy
    evaluations = []  # (dataset, algo, label, act settings): the preset's acting, the paper's, then the variants
    for d, algo in cells:
        variants = OmegaConf.to_container(cfg.act_variants[algo]) if cfg.act_variants.get(algo) else {}
        paper = paper_acting(algo, acting.get(algo) or {})
        variants = {**({"paper": paper} if paper else {}), **variants}
        evaluations += [(d, algo, algo, {})] + [(d, algo, f"{algo} ({name})", s) for name, s in variants.items()]
    acts_by = {label: rule for algo in algos for label, rule in acting_rules(algo, acting.get(algo) or {}).items()}
    seeds = suite_seeds(cfg)

    def run_dir(d: Dataset, algo: str, seed: int) -> Path:  # `seeds`: one run folder per training seed
        return out / d.name / algo if cfg.get("seeds") is None else out / d.name / algo / f"seed{seed}"

    folders = {(i, seed): run_dir(d, algo, seed) / "evaluations" / re.sub(r"[^A-Za-z0-9.=_-]+", "_", label)
               for i, (d, algo, label, _) in enumerate(evaluations) for seed in seeds}
    per_run: dict[str, list[tuple[Path, dict]]] = {}
    for (i, seed), folder in folders.items():
        d, algo, _, settings = evaluations[i]
        per_run.setdefault(str(run_dir(d, algo, seed)), []).append((folder, settings))
    run_jobs(Cell(per_run, cfg), "train", [job for d, a in cells for job in train_jobs(cfg, d, a, run_dir)],
             cfg, out, "train-evaluate")
    timings = {(d, a, seed): timing(run_dir(d, a, seed) / "checkpoint.pt") for d, a in cells for seed in seeds}
    evaluated = []
    for (i, seed), folder in folders.items():
        d, algo, label, settings = evaluations[i]
        result = pooled([json.loads((folder / sub / "evaluation.json").read_text())
                         for _, sub in evaluated_checkpoints(run_dir(d, algo, seed), cfg.checkpoints)])
        run = timings[(d, algo, seed)]
        evaluated.append({
            "dataset": d.name, "dataset_id": d.id, "label": label, "algo": algo, "steps": run["steps"],
            "batch_size": run["batch_size"], "train_minutes": run["wall_seconds"] / 60,
            "updates_per_second": run["steps"] / run["update_seconds"], "score_mean": result["score_mean"],
            "score_se": result["score_se"], "return_mean": result["return_mean"], "episodes": cfg.episodes,
            "acting": result.get("acting"), "same_as_default": "same_as" in result, "seed": seed,
            "rule": acts_by.get(label, settings_text(settings))})
    references = [{"dataset": d.name, "dataset_id": d.id, "label": "dataset average", "algo": None, "steps": 0,
                   "batch_size": 0, "train_minutes": 0.0, "updates_per_second": None,
                   "score_mean": dataset_average(d.id), "score_se": None, "return_mean": None, "episodes": None,
                   "acting": None, "same_as_default": False, "seed": None, "rule": ""} for d in datasets]
    rows = references + evaluated
    table = suite_table(rows, datasets)

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
    rules = "; ".join(f"{algo} {settings}" for algo, settings in acting.items() if algo in algos and settings)
    budget += f"; acting: {rules} (the paper's: `<algo> (paper)`)" if rules else "; acting: the papers'"
    print(f"\nnormalized score (D4RL x100), mean ± s.e. over {cfg.episodes} episodes{pooling}; "
          f"suite {cfg.suite_name}, device {cfg.device}{budget}\n{table}\n\nresults: {out / 'results.json'}, {out / 'scores.png'}   "
          f"TensorBoard: tensorboard --logdir {out}")
    if page is not None:
        write_report(page, rows, datasets, cfg)
        print(f"results page: {page}, {page.with_suffix('.png')}")
    return rows
