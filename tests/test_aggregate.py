"""pipelines/aggregate.py on fake run folders (no training): mean ± s.e. over seeds, IQM with bootstrap
intervals, sweep curves averaged over seeds, and the refusals."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata
from torch.utils.tensorboard import SummaryWriter

from cleandiff_rl.evaluation import COLUMNS, write_sweep
from cleandiff_rl.training import checkpoint_name, compose_config
from cleandiff_rl.utils import atomic_save, load_checkpoint

import rliable  # noqa: F401  (the test extra installs it: these tests must not skip)
from cleandiff_rl import aggregation as aggregate

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"

# final normalized scores of seeds 0, 1, 2, chosen by hand; dql's 5 on walker2d is the outlier IQM drops
SCORES = {("bc", "hopper-medium"): [40.0, 44.0, 51.0], ("bc", "walker2d-medium"): [60.0, 62.0, 70.0],
          ("dql", "hopper-medium"): [50.0, 58.0, 57.0], ("dql", "walker2d-medium"): [75.0, 5.0, 80.0]}
SWEEP = {("ddim", 1): [10.0, 20.0, 30.0], ("ddim", 5): [50.0, 60.0, 40.0], ("ddpm", 5): [45.0, 47.0, 49.0]}


@cache
def train_config(algo: str, task: str, overrides: tuple[str, ...]) -> dict:
    return OmegaConf.to_container(compose_config([f"algo={algo}", f"task={task}", "steps=100", *overrides]),
                                  resolve=True)


def fake_run(root: Path, algo: str, task: str, seed: int, score: float, *overrides: str, step: int = 100,
             suffix: str = "") -> Path:
    """A training run folder as train.py leaves it, without training: checkpoint.pt (run_config, step) and
    TensorBoard eval/score at update 50 (a decoy) and at the last update (`score`). `suffix`: what train.py
    appends to the folder's name for settings beyond the seed."""
    folder = root / "train" / algo / f"{task}-seed{seed}{suffix}"
    config = copy.deepcopy(train_config(algo, task, overrides)) | {"seed": seed, "run_dir": str(folder)}
    atomic_save({"algo": algo, "run_config": config, "step": step}, folder / "checkpoint.pt")
    with SummaryWriter(str(folder / "tb")) as writer:
        writer.add_scalar("eval/score", score - 30.0, 50)
        writer.add_scalar("eval/score", score, step)
    return folder


def fake_sweep(root: Path, run: Path, scores: dict[tuple[str, int], float]) -> None:
    """sweep.py's sweep.json for `run`, where sweep.py puts it by default, with one failed cell (ddpm x 20)."""
    rows = [{"env_id": "Hopper-v5", "episodes": 4, "returns": [1.0] * 4, "return_mean": 1.0, "return_se": 0.0,
             "score_mean": score, "score_se": 2.0, "length_mean": 10.0, "time_per_action_ms": 1.0, "solver": solver,
             "steps": steps, "temperature": 1.0, "nfe": steps, "guidance_calls": 0, "cfg_batched": False,
             "error": None} for (solver, steps), score in scores.items()]
    rows.append({"env_id": "Hopper-v5", "episodes": 4, **dict.fromkeys(COLUMNS), "solver": "ddpm", "steps": 20,
                 "error": "steps=20 exceeds the 5 diffusion steps"})
    write_sweep(rows, root / "sweep" / checkpoint_name(run / "checkpoint.pt") / "2026-01-01_00-00-00")


def run_aggregate(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(PIPELINES / "aggregate.py"), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)


def test_three_seeds_two_datasets_two_algorithms_end_to_end(tmp_path):
    """Mean ± s.e. per cell and IQM / mean across datasets equal the hand-computed values, each CI holds its
    point estimate, the sweeps average per (solver, steps); table, CSV, JSON, PNGs and HParams written."""
    runs = tmp_path / "runs"
    for (algo, task), scores in SCORES.items():
        for seed, score in enumerate(scores):
            folder = fake_run(runs, algo, task, seed, score)
            if (algo, task) == ("dql", "hopper-medium"):
                fake_sweep(runs, folder, {cell: values[seed] for cell, values in SWEEP.items()})
    done = run_aggregate(tmp_path, "runs=[runs/train/*/*,runs/sweep]", "reps=200", "run_dir=out")
    assert done.returncode == 0, done.stderr
    printed = re.sub(" +", " ", done.stdout)  # the table's cells, without the padding that lines them up
    assert "| dql | 55.0 ± 2.5 (3) | 53.3 ± 24.2 (3) | 60.0 [" in printed

    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    by = {(r["algo"], r["dataset"], r["statistic"]): r for r in results["results"]}
    bc = by["bc", "hopper-medium", "mean over seeds"]  # 40, 44, 51: mean 45, sample variance (25 + 1 + 36) / 2
    assert (bc["score"], bc["runs"], bc["seeds"]) == (45.0, 3, [0, 1, 2])
    assert bc["se"] == pytest.approx(math.sqrt(31 / 3))
    for (algo, task), scores in SCORES.items():
        row = by[algo, task, "mean over seeds"]
        assert row["score"] == pytest.approx(np.mean(scores))
        assert row["se"] == pytest.approx(np.std(scores, ddof=1) / math.sqrt(3))
    # IQM of the 6 scores: drop the lowest and the highest, average the middle 4
    for algo, iqm, mean in [("dql", (50 + 57 + 58 + 75) / 4, 325 / 6), ("bc", (44 + 51 + 60 + 62) / 4, 327 / 6)]:
        for statistic, value in (("IQM", iqm), ("mean", mean)):
            row = by[algo, "all", statistic]
            assert row["score"] == pytest.approx(value) and row["runs"] == 6
            assert row["ci_low"] < value < row["ci_high"]

    curves = {(c["solver"], c["steps"]): c for c in results["curves"]}
    assert set(curves) == set(SWEEP)  # the failed ddpm x 20 cell is left out
    for cell, values in SWEEP.items():
        assert curves[cell]["score"] == pytest.approx(np.mean(values)) and curves[cell]["nfe"] == cell[1]
        assert curves[cell]["se"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(3))
    assert "| ddim | 20.0 ± 5.8 (3) nfe 1 | 50.0 ± 5.8 (3) nfe 5 |" in printed
    assert {(r["dataset"], r["algo"]) for r in results["runs"] if r["sweep_from"]} == {("hopper-medium", "dql")}

    assert len((out / "results.csv").read_text().splitlines()) == 1 + 4 + 4
    assert len((out / "curves.csv").read_text().splitlines()) == 1 + 3
    assert (out / "intervals.png").stat().st_size > 10_000 and (out / "score_vs_nfe.png").stat().st_size > 10_000
    for (algo, task), scores in SCORES.items():  # one HParams session per cell, all with the same columns
        session = EventAccumulator(str(out / "tb" / task / algo)).Reload()
        start = metadata.parse_session_start_info_plugin_data(
            session.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG]).hparams
        assert start["dataset"].string_value == f"cleandiff/{task.replace('-', '/')}-v0"
        assert start["algo.params.lr"].number_value == 3e-4 and "algo.params.eta" in start and "seed" not in start
        assert session.Scalars("score/mean")[0].value == pytest.approx(np.mean(scores))


@pytest.mark.slow
def test_runs_that_differ_beyond_the_seed_are_refused_and_nothing_is_written(tmp_path):
    """One error line names the differing key, its values and their folders; exit 2, no run_dir."""
    runs = tmp_path / "runs"
    for seed in range(3):
        fake_run(runs, "bc", "hopper-medium", seed, 50.0, *(["algo.params.lr=0.001"] if seed == 2 else []))
    fake_run(runs, "bc", "walker2d-medium", 0, 50.0, "batch_size=64")  # another dataset may differ
    done = run_aggregate(tmp_path, "runs=runs", "run_dir=out")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(
        "error: cannot average bc on hopper-medium over seeds: its runs differ in algo.params.lr "
        "(0.0003 in hopper-medium-seed0, hopper-medium-seed1; 0.001 in hopper-medium-seed2); aggregate them separately")
    assert not (tmp_path / "out").exists()


def test_runs_named_for_other_settings_are_their_own_row(tmp_path):
    """train.py's `+key:value` folders beside the default runs form their own row (a variant, not a
    refusal), and a setting that only newer runs record does not count as a difference."""
    runs = tmp_path / "runs"
    for seed in range(2):
        fake_run(runs, "bc", "hopper-medium", seed, 40.0 + seed)
        fake_run(runs, "bc", "hopper-medium", seed, 60.0 + seed, "algo.params.lr=0.001",
                 suffix="+algo.params.lr:0.001")
    older = load_checkpoint(runs / "train/bc/hopper-medium-seed0/checkpoint.pt")
    del older["run_config"]["algo"]["params"]["lr"]  # as if written before the setting existed
    atomic_save(older, runs / "train/bc/hopper-medium-seed0/checkpoint.pt")
    done = run_aggregate(tmp_path, "runs=runs", "run_dir=out", "reps=50")
    assert done.returncode == 0, done.stderr
    rows = {(r["algo"], r["statistic"]): r for r in json.loads((tmp_path / "out/results.json").read_text())["results"]}
    assert rows["bc", "mean over seeds"]["score"] == pytest.approx(40.5)
    assert rows["bc+algo.params.lr:0.001", "mean over seeds"]["score"] == pytest.approx(60.5)


def test_where_a_score_comes_from_and_what_is_refused(tmp_path, monkeypatch):
    """evaluate.py's result (found in its default folder, named after the run) wins over training's last
    eval/score, an act variant's evaluation does not count; unfinished runs, a seed given twice, a run
    without its final evaluation and folders without runs are one clear error each."""
    monkeypatch.chdir(tmp_path)
    runs = Path("runs")
    first = fake_run(runs, "bc", "hopper-medium", 0, 50.0)
    fake_run(runs, "bc", "hopper-medium", 1, 60.0)
    evaluation = runs / "evaluate" / checkpoint_name(first / "checkpoint.pt") / "2026-01-01_00-00-00"
    evaluation = evaluation / "evaluation.json"  # evaluate.py's default run_dir, named after the run
    evaluation.parent.mkdir(parents=True)
    evaluation.write_text(json.dumps({"checkpoint": str(first / "checkpoint.pt"), "score_mean": 42.0, "episodes": 20,
                                      "solver": "ode_dpmsolver++_2M", "steps": 10, "temperature": 1.0}))
    variant = first / "evaluations" / "bc_T=0.5_" / "evaluation.json"  # an act variant: another policy
    variant.parent.mkdir(parents=True)
    variant.write_text(json.dumps({"score_mean": 99.0, "episodes": 20, "solver": None, "steps": None,
                                   "temperature": None, "settings": {"temperature": 0.5}}))
    found, _ = aggregate.find_runs([runs])
    assert [(r.seed, r.score, r.score_from) for r in found] == [
        (0, 42.0, evaluation), (1, 60.0, runs / "train" / "bc" / "hopper-medium-seed1" / "tb")]
    with pytest.raises(ValueError, match="runs differ in evaluation.episodes, evaluation.solver, evaluation.source"):
        aggregate.group_runs(found)  # one score from evaluate.py's 20 episodes, one from training's 10
    written = (first / "checkpoint.pt").stat().st_mtime
    os.utime(evaluation, (written - 60, written - 60))  # evaluated before the run trained on: stale
    found, notes = aggregate.find_runs([runs])
    assert found[0].score == 50.0 and notes == [f"left out {evaluation}: older than its run's checkpoint.pt"]

    found, _ = aggregate.find_runs([runs / "train"])
    duplicate = fake_run(Path("copy"), "bc", "hopper-medium", 0, 50.0)
    with pytest.raises(ValueError, match=f"^{found[0].folder} and {duplicate} are both bc on hopper-medium with seed"):
        aggregate.group_runs(found + aggregate.find_runs([Path("copy")])[0])
    fake_run(Path("short"), "bc", "hopper-medium", 0, 50.0, step=60)
    with pytest.raises(ValueError, match=r"is unfinished \(60 of 100 updates\)"):
        aggregate.find_runs([Path("short")])
    untested = fake_run(Path("untested"), "bc", "hopper-medium", 0, 50.0)
    for events in (untested / "tb").iterdir():
        events.unlink()
    with pytest.raises(ValueError, match="holds no eval/score of the final policy"):
        aggregate.find_runs([Path("untested")])
    Path("empty").mkdir()
    with pytest.raises(ValueError, match="holds no training run"):
        aggregate.find_runs([Path("empty")])
    with pytest.raises(FileNotFoundError, match="names no folder"):
        aggregate.expand(["runs/nothing-*"])


def test_iqm_uses_as_many_seeds_on_every_dataset():
    """rliable needs a full (seeds x datasets) matrix: an algorithm with 3 seeds on one dataset and 2 on
    the other gets the 2 lowest seeds of each, and a note says so; the IQM is the hand value."""
    def run(dataset: str, seed: int, score: float) -> aggregate.Run:
        return aggregate.Run(Path(f"{dataset}-{seed}"), dataset, "dql", seed, {}, score, Path("tb"))

    groups = {("a", "dql"): [run("a", 0, 10.0), run("a", 1, 20.0), run("a", 2, 1000.0)],
              ("b", "dql"): [run("b", 0, 30.0), run("b", 1, 40.0)]}
    rows, notes = aggregate.summarize(groups, reps=300, seed=0)
    iqm = next(r for r in rows if r["statistic"] == "IQM")
    assert iqm["score"] == pytest.approx((20 + 30) / 2) and iqm["runs"] == 4  # 10, 20, 30, 40: the middle two
    assert iqm["ci_low"] <= 25.0 <= iqm["ci_high"] < 1000
    assert notes == [("dql: IQM and mean use the 2 lowest seeds of each dataset (rliable needs as many runs on "
                      "every dataset; a has 3, b has 2)")]
