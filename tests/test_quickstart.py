"""pipelines/quickstart.py end to end at tiny settings, on a prepared dataset (the SAC build is skipped):
the solver x steps table, the acting line, the verdict against the dataset's average, and the PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offline_data import random_dataset

from cleandiff_rl.data import dataset_average

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_prints_the_table_the_acting_and_the_verdict_and_writes_the_figure(minari_root, tmp_path):
    data_id = "quickstart/hopper/medium-replay-v0"  # the quickstart's dataset id: its build is skipped
    random_dataset(data_id, n_steps=600)
    average = dataset_average(data_id)
    run_dir = tmp_path / "run"
    solvers, steps = ["ddim", "ode_dpmsolver++_2M"], [1, 2]
    done = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "quickstart.py"), "train_steps=20", "batch_size=32",
         "+algo_params.num_candidates=4", f"solvers=[{','.join(solvers)}]", f"steps=[{','.join(map(str, steps))}]",
         "episodes=2", "jobs=2", "device=cpu", f"run_dir={run_dir}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "MINARI_DATASETS_PATH": str(minari_root)})
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert f"dataset {data_id} exists" in out and f"dataset average score {average:.1f}" in out

    rows = json.loads((run_dir / "sweep.json").read_text())
    assert [(r["solver"], r["steps"]) for r in rows] == [(s, n) for s in solvers for n in steps]
    assert [r["nfe"] for r in rows] == [1, 2, 1, 2]
    assert "normalized score (x100)" in out
    for r in rows:  # every cell is printed with its score and NFE
        assert f"{r['score_mean']:.1f} ± {r['score_se']:.1f} (nfe {r['nfe']})" in out

    acting = next(line for line in out.splitlines() if line.startswith("acting: "))
    assert "argmax" in acting and "4" in acting, acting  # IDQL's rule at the candidates asked for
    above = sum(r["score_mean"] > average for r in rows)
    if above:
        assert f"{above} of 4 cells beat the dataset's average {average:.1f}" in out
    else:
        assert f"no cell beats the dataset's average {average:.1f}" in out
    assert "should beat" not in out

    png = run_dir / "score_vs_nfe.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"figure:      {png}" in out


def test_quickstart_refuses_an_unknown_level_before_writing(minari_root, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "quickstart.py"), "level=expert-replay",
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MINARI_DATASETS_PATH": str(minari_root)})
    assert done.returncode == 2 and done.stderr.startswith("error: unknown level 'expert-replay'"), done.stderr
    assert not (tmp_path / "run").exists() and not minari_root.exists()
