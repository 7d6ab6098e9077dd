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
     "error: Could not override 'algo.params.hidden'. (Key 'hidden' not in 'FQLConfig')"),
])
def test_user_errors_are_one_message_and_write_nothing(tmp_path, monkeypatch, script, overrides, message):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    random_dataset("test/hopper/random-v0", n_steps=200)
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not really a zip")  # a truncated checkpoint
    before = sorted(tmp_path.rglob("*"))
    done = run(tmp_path, script, *overrides)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message) and "Traceback" not in done.stderr, done.stderr
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
    assert fql["params"]["hidden_dim"] == 16 and fql["params"]["alpha"] == 3.0  # walker2d medium-replay's alpha
    assert dql["params"]["critic_layer_norm"] is True and dql["params"]["critic_hidden"] == 16
    assert fql["dataset"] == "test/hopper/random-v0" and fql["batch_size"] == 32 and fql["ms_fast"] > 0


def test_a_train_run_is_named_after_its_dataset():
    assert compose_config(["algo=bc"]).run_dir == "runs/train/bc/hopper-medium-seed0"
    assert compose_config(["algo=bc", "task=walker2d-medium"]).run_dir == "runs/train/bc/walker2d-medium-seed0"
    assert compose_config(["algo=bc", "dataset=mujoco/hopper/expert-v0"]).run_dir == \
        "runs/train/bc/mujoco_hopper_expert-v0-seed0"


def test_per_task_acting_and_diffusion_qls_q_term():
    """Per-task acting and eta (docs/measurements.md, sessions 20-28): Diffusion-QL decides its acting by `auto`
    on every task, at its own higher rank threshold, and IDQL everywhere but on medium-expert, where it takes
    the argmax of 4 candidates; FQL and Diffusion BC act at their mode on medium-expert, FQL at the best of 5
    at half the noise on walker2d medium-replay (session 34) (Diffusion BC
    elsewhere: one DDPM sample at temperature 1; on hopper and halfcheetah medium-expert it takes 3 extra
    denoising steps per update). Diffusion-QL's Q term weighs 0.25 on medium-expert and walker2d medium, elsewhere the paper's 1;
    its critic has LayerNorm on walker2d medium and medium-replay."""
    for env in ("hopper", "halfcheetah", "walker2d"):
        for level, fql_selection, eta in (("medium", "auto", 0.25 if env == "walker2d" else 1.0),
                                          ("medium-replay", "argmax" if env == "walker2d" else "auto", 1.0),
                                          ("medium-expert", "mode", 0.25)):
            idql_selection = "argmax" if level == "medium-expert" else "auto"
            for algo, selection, threshold in (("dql", "auto", 1.2), ("idql", idql_selection, 0.75),
                                               ("fql", fql_selection, 0.75)):
                cfg = compose_config([f"algo={algo}", f"task={env}-{level}"])
                assert (cfg.algo.params.selection, cfg.algo.params.rank_threshold) == (selection, threshold)
                if algo == "fql":  # walker2d medium-replay: the best of 5 at half the noise
                    assert cfg.algo.params.temperature == (0.5 if (env, level) == ("walker2d", "medium-replay") else 1.0)
                if algo == "dql":
                    assert cfg.algo.params.eta == eta
                    assert cfg.algo.params.critic_layer_norm == (env == "walker2d" and level != "medium-expert")
            idql = compose_config(["algo=idql", f"task={env}-{level}"]).algo.params
            assert idql.num_candidates == (4 if level == "medium-expert" else 64)
            dbc = compose_config(["algo=diffusion_bc", f"task={env}-{level}"]).algo.params
            assert (dbc.solver, dbc.temperature) == (("ddim", 0.0) if level == "medium-expert" else ("ddpm", 1.0))
            assert dbc.bc_updates == (3 if level == "medium-expert" and env != "walker2d" else 0)
    assert compose_config(["algo=idql", "task=hopper-medium-expert", "algo.params.selection=argmax"]).algo.params.selection == "argmax"
    assert compose_config(["algo=fql", "dataset=test/hopper/random-v0"]).algo.params.selection == "auto"
    assert compose_config(["algo=diffusion_bc", "dataset=test/hopper/random-v0"]).algo.params.temperature == 1.0


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
