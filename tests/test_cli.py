"""A user's mistake on a pipeline is one short error, exit code 2, and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from offline_data import random_dataset

from cleandiff_rl.training import compose_config

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def run(tmp_path: Path, script: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINARI_DATASETS_PATH": str(tmp_path / "minari")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(PIPELINES / f"{script}.py"), *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


@pytest.mark.parametrize("script,overrides,message", [
    ("evaluate", [], "error: Missing mandatory value: checkpoint"),
    ("evaluate", ["checkpoint=missing.pt"], "error: checkpoint not found: missing.pt"),
    ("evaluate", ["checkpoint=bad.pt"], "error: bad.pt is not a readable checkpoint (truncated"),
    ("train", ["algo=idql", "dataset=nope/hopper/medium-v0"], "error: Dataset 'nope/hopper/medium-v0' is not in"),
    ("train", ["algo=idql", "dataset=test/hopper/random-v0", "algo.params.selection=best"],
     "error: unknown selection 'best'"),
    ("sweep", ["checkpoint=missing.pt"], "error: checkpoint not found: missing.pt"),
    ("toy2d", ["model.predict=v", "model.time=discrete", "train.steps=1"], "error: predict='v' (the velocity"),
    ("solver_convergence", ["settings=[[discrete,flow,uniform]]"], "error: the 'flow' schedule is continuous-time only"),
    ("benchmark_updates", ["dataset=test/hopper/random-v0", "algos=[fql]", "+params.fql.hidden=32"],
     "error: unknown setting 'algo.params.hidden'; did you mean algo.params.hidden_dim?"),
])
def test_user_errors_are_one_message_and_write_nothing(tmp_path, monkeypatch, script, overrides, message):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    random_dataset("test/hopper/random-v0", n_steps=200)
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not really a zip")  # a truncated checkpoint
    before = sorted(tmp_path.rglob("*"))
    done = run(tmp_path, script, *overrides)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message) and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1 and len(done.stderr.rstrip("\n")) < 200, done.stderr
    assert sorted(tmp_path.rglob("*")) == before  # no runs/, no Hydra folders or logs, nothing in the Minari root


def test_benchmark_updates_times_each_algorithm_at_its_task_settings_and_params(tmp_path, monkeypatch):
    """The task's per-algorithm settings and the command's `params` reach the timed agent, and
    results.json records them."""
    import json

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    random_dataset("test/hopper/random-v0", n_steps=300)
    done = run(tmp_path, "benchmark_updates", "task=walker2d-medium-replay", "dataset=test/hopper/random-v0",
               "algos=[fql,dql]", "+params.fql.hidden_dim=16", "+params.dql.hidden_dim=16", "+params.dql.critic_hidden=16",
               "blocks=1", "block_updates=2", "batch_size=32")
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "runs/benchmark_updates/results.json").read_text())["rows"]
    fql, dql = rows
    assert fql["params"]["hidden_dim"] == 16 and fql["params"]["normalize_q_loss"] is True  # fql.yaml's rule
    assert dql["params"]["grad_norm"] == 4.0 and dql["params"]["critic_hidden"] == 16  # walker2d medium-replay's
    assert fql["dataset"] == "test/hopper/random-v0" and fql["batch_size"] == 32 and fql["ms_fast"] > 0


def test_a_train_run_is_named_after_its_dataset():
    assert compose_config(["algo=bc"]).run_dir == "runs/train/bc/hopper-medium-seed0"
    assert compose_config(["algo=bc", "task=walker2d-medium"]).run_dir == "runs/train/bc/walker2d-medium-seed0"
    assert compose_config(["algo=bc", "dataset=mujoco/hopper/expert-v0"]).run_dir == \
        "runs/train/bc/mujoco_hopper_expert-v0-seed0"


# Diffusion-QL's per-task grad_norm (main.py's hyperparameters table); eta is 1.0 on every task
DQL_GRAD_NORM = {"halfcheetah": {"medium": 9.0, "medium-replay": 2.0, "medium-expert": 7.0},
                 "hopper": {"medium": 9.0, "medium-replay": 4.0, "medium-expert": 5.0},
                 "walker2d": {"medium": 1.0, "medium-replay": 4.0, "medium-expert": 5.0}}


def test_every_task_takes_the_papers_settings_and_acting():
    """Each task composes to the originals' settings and acting: Diffusion-QL main.py's eta and grad_norm and its
    softmax over 50 candidates of the online actor, IDQL's argmax of 64, FQL's one action with one rule for
    every task (alpha 10, normalized Q loss), Diffusion BC's one DDPM sample; a dataset no task file names
    acts the same."""
    paper = {"dql": {"selection": "softmax", "num_candidates": 50, "act_with_ema": False, "temperature": 1.0},
             "idql": {"selection": "argmax", "num_candidates": 64, "temperature": 1.0},
             "fql": {"selection": "sample", "temperature": 1.0, "acting": "onestep", "alpha": 10.0,
                     "normalize_q_loss": True},
             "diffusion_bc": {"selection": "sample", "solver": "ddpm", "temperature": 1.0, "bc_updates": 0}}
    for env, levels in DQL_GRAD_NORM.items():
        for level, grad_norm in levels.items():
            for algo, expected in paper.items():
                params = compose_config([f"algo={algo}", f"task={env}-{level}"]).algo.params
                assert {key: params[key] for key in expected} == expected, (env, level, algo)
            dql = compose_config(["algo=dql", f"task={env}-{level}"]).algo.params
            assert (dql.eta, dql.grad_norm, dql.critic_layer_norm, dql.bc_updates) == (1.0, grad_norm, False, 0)
    for algo, expected in paper.items():
        params = compose_config([f"algo={algo}", "dataset=test/hopper/random-v0"]).algo.params
        assert {key: params[key] for key in expected if key in ("selection", "num_candidates")} == \
            {key: value for key, value in expected.items() if key in ("selection", "num_candidates")}
    assert compose_config(["algo=idql", "task=hopper-medium-expert", "algo.params.selection=mode"]).algo.params.selection == "mode"


def test_evaluate_and_sweep_folders_are_named_after_the_run():
    for script in ("evaluate", "sweep"):
        dql = compose_config(["checkpoint=runs/train/dql/hopper-medium-seed0/checkpoint.pt"], config_name=script)
        quickstart = compose_config(["checkpoint=runs/quickstart/hopper-idql-seed0/train/checkpoint.pt"],
                                    config_name=script)
        assert Path(dql.run_dir).parent == Path(f"runs/{script}/dql-hopper-medium-seed0")
        assert Path(quickstart.run_dir).parent == Path(f"runs/{script}/hopper-idql-seed0-train")


def test_configs_ship_inside_the_package():
    """An installed cleandiff_rl composes its configs without the repository: they live in the package
    (configs/ at the top links there) and pyproject's package-data globs cover every one of them."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    import cleandiff_rl
    from cleandiff_rl.training import CONFIG_DIR

    root = Path(__file__).resolve().parents[1]
    assert CONFIG_DIR == Path(cleandiff_rl.__file__).resolve().parent / "configs"
    assert (root / "configs").resolve() == CONFIG_DIR
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cleandiff_rl"]
    files = [path.relative_to(CONFIG_DIR.parent) for path in CONFIG_DIR.rglob("*") if path.is_file()]
    assert len(files) > 30 and all(path.suffix == ".yaml" for path in files)
    assert all(any(path.match(glob) for glob in globs) for path in files)
