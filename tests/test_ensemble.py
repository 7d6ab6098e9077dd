"""Seed ensembles (cleandiff_rl/ensemble.py): N seeds in one batched model equal N separate runs."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

from cleandiff_rl.agents import get_algorithm
from cleandiff_rl.diffusion import DiffusionModel
from cleandiff_rl.ensemble import UPDATES, AgentEnsemble

OBS, ACT, B, N, UPDATES_RUN = 5, 3, 32, 3, 20
SMALL = {"bc": {"hidden_dim": 32}, "diffusion_bc": {"hidden_dim": 32, "ema_start": 5, "ema_every": 2},
         "fql": {"hidden_dim": 32, "normalize_q_loss": True},
         "dql": {"hidden_dim": 32, "critic_hidden": 32, "ema_start": 5, "ema_every": 2, "grad_norm": 0.5},
         "idql": {"hidden_dim": 32, "critic_hidden": 32, "dropout": 0.0, "ema_start": 5, "lr_decay_steps": 30},
         "edp": {"hidden_dim": 32, "critic_hidden": 32, "ema_start": 5, "ema_every": 2, "grad_norm": 0.5,
                 "sampling_steps": 3},
         "dac": {"hidden_dim": 32, "critic_hidden": 32, "num_qs": 3, "num_q_samples": 2, "ema_start": 5, "ema_every": 2,
                 "grad_norm": 0.5, "lr_decay_steps": 30, "eta_lr": 0.05, "bc_threshold": 0.5}}
CASES = [("bc", {}), ("diffusion_bc", {}), ("diffusion_bc", {"bc_updates": 1, "time": "discrete", "clip": 0.05}),
         ("fql", {}), ("fql", {"q_agg": "min", "normalize_q_loss": False, "clip": 0.05}),  # clip: per-seed clipping
         ("dql", {}), ("dql", {"bc_updates": 1, "ema_warmup": "hold", "time": "discrete", "grad_norm": 0.0}),
         ("idql", {}), ("idql", {"critic_updates": 2, "backbone": "mlp"}),
         ("edp", {}), ("edp", {"loss_type": "iql", "ema_warmup": "hold", "predict": "x0", "grad_norm": 0.0}),
         ("dac", {}), ("dac", {"ema_warmup": "hold", "eta_lr": 0.0, "grad_norm": 0.0})]


@contextlib.contextmanager
def injected_noise(seed: int = 0):
    """torch's draws (randn_like, rand, randint) replaced by one numpy stream: a separate run and an ensemble
    (whose vmapped call draws once for all seeds) see the same numbers in the same order."""
    rng = np.random.default_rng(seed)
    saved = torch.randn_like, torch.rand, torch.randint, torch.randn
    torch.randn_like = lambda x, **_: torch.from_numpy(rng.standard_normal(tuple(x.shape), dtype=np.float32))
    torch.randn = lambda *size, generator=None, device=None, dtype=None, **_: torch.from_numpy(
        rng.standard_normal(tuple(size[0]) if isinstance(size[0], (tuple, list)) else size, dtype=np.float32))
    torch.rand = lambda *size, device=None, generator=None, **_: torch.from_numpy(
        rng.random(tuple(size[0]) if isinstance(size[0], (tuple, list)) else size, dtype=np.float32))

    def randint(low, high=None, size=None, device=None, generator=None, **_):
        if size is None:  # randint(high, size)
            low, high, size = 0, low, high
        return torch.from_numpy(rng.integers(low, high, size=tuple(size)))
    torch.randint = randint
    try:
        yield
    finally:
        torch.randn_like, torch.rand, torch.randint, torch.randn = saved


def close(mine: torch.Tensor, theirs: torch.Tensor, what: str, scale: float = 1e-4) -> None:
    """Equal to float rounding, relative to the tensor's largest entry. Adam moments take 1e-3: IDQL's Fourier
    time weights get gradients near 20 whose rounding accumulates there (one separate run with fused against
    unfused Adam already differs by 5e-5 of the scale after 20 updates; the batched matmuls round otherwise)."""
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5 + scale * float(theirs.nan_to_num().abs().max()),
                               equal_nan=True, msg=what)


def make_agents(algo: str, extra: dict) -> list:
    """N agents seeded 0..N-1; `clip` sets their diffusion models' gradient clipping (each seed's norm differs)."""
    extra, agents = dict(extra), []
    clip = extra.pop("clip", None)
    for seed in range(N):
        torch.manual_seed(seed)
        agents.append(get_algorithm(algo)(OBS, ACT, {**SMALL[algo], **extra}, device="cpu"))
        for module in agents[-1].modules():
            if isinstance(module, DiffusionModel):
                module.grad_clip_norm = clip
    return agents


def batches(agent, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + seed)
    rows = B * agent.batches_per_step
    return [{"obs": torch.randn(rows, OBS, generator=g), "act": torch.rand(rows, ACT, generator=g) * 2 - 1,
             "rew": torch.randn(rows, generator=g), "next_obs": torch.randn(rows, OBS, generator=g),
             "terminal": (torch.rand(rows, generator=g) < 0.1).float()} for _ in range(UPDATES_RUN)]


@pytest.mark.parametrize(("algo", "extra"), CASES)
def test_ensemble_equals_separate_runs(algo, extra):
    """After 20 updates on each seed's own batches with the same injected noise, every seed's losses, gradient
    norms, weights (EMA and target copies included) and Adam moments equal its separate run's."""
    torch.set_num_threads(1)
    separate, ensemble_agents = make_agents(algo, extra), make_agents(algo, extra)
    data = [batches(separate[0], seed) for seed in range(N)]
    solo_metrics = []
    for agent, seed_batches in zip(separate, data):
        with injected_noise():
            solo_metrics.append([agent.update(batch) for batch in seed_batches])
    ensemble = AgentEnsemble(ensemble_agents, randomness="same")
    with injected_noise():
        stacked_metrics = [ensemble.update({key: torch.stack([data[i][step][key] for i in range(N)])
                                            for key in data[0][step]}) for step in range(UPDATES_RUN)]
    for i in range(N):
        for step in range(UPDATES_RUN):
            solo, stacked = solo_metrics[i][step], stacked_metrics[step][i]
            assert solo.keys() == stacked.keys()
            for key in solo:
                assert stacked[key] == pytest.approx(solo[key], rel=1e-4, abs=1e-5), (i, step, key)
    for agent, solo in zip(ensemble.sync(), separate):
        mine, theirs = agent.state_dict(), solo.state_dict()
        assert mine.keys() == theirs.keys()
        for key in theirs:
            if torch.is_tensor(theirs[key]):
                close(mine[key], theirs[key], key)
        assert agent.updates == solo.updates == UPDATES_RUN
        for key, opt in solo.optimizers().items():
            theirs_state, mine_state = opt.state_dict()["state"], agent.optimizers()[key].state_dict()["state"]
            assert mine_state.keys() == theirs_state.keys() and theirs_state
            for p in theirs_state:
                for name in theirs_state[p]:
                    close(mine_state[p][name].float(), theirs_state[p][name].float(), f"{key} {p} {name}", 1e-3)
    moved = [p for p in separate[0].parameters() if p.requires_grad]
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(moved, make_agents(algo, extra)[0].parameters()))


def test_ensemble_seeds_draw_their_own_noise():
    """In training (randomness 'different') two seeds with the same weights and batch get different updates."""
    torch.manual_seed(0)
    agent = get_algorithm("fql")(OBS, ACT, SMALL["fql"], device="cpu")
    twins = [agent, copy.deepcopy(agent)]
    ensemble = AgentEnsemble(twins)
    batch = {key: torch.stack([value, value]) for key, value in batches(agent, 0)[0].items()}
    metrics = ensemble.step(batch)
    assert metrics["flow/bc_loss"][0] != metrics["flow/bc_loss"][1]


def test_ensemble_refuses_unsupported():
    """Planners are refused by name, as is FQL's sequential order."""
    assert set(UPDATES) == {"bc", "diffusion_bc", "fql", "dql", "idql", "edp", "dac"}
    with pytest.raises(ValueError, match="support"):
        AgentEnsemble([get_algorithm("diffuser")(OBS, ACT, {"horizon": 8, "model_dim": 16, "dim_mults": [1, 2]},
                                                 device="cpu")])
    with pytest.raises(ValueError, match="sequential_steps"):
        AgentEnsemble([get_algorithm("fql")(OBS, ACT, {"hidden_dim": 16, "sequential_steps": True}, device="cpu")])


@pytest.fixture
def hopper_random(minari_root) -> str:
    from offline_data import random_dataset
    random_dataset("test/hopper/random-v0", n_steps=600)
    return "test/hopper/random-v0"


def ensemble_config(folder, steps: int, *extra: str):
    from cleandiff_rl.training import compose_config
    return compose_config(["algo=fql", "dataset=test/hopper/random-v0", f"steps={steps}", "batch_size=32",
                           "eval_every=0", "log_every=2", "device=cpu", f"checkpoint_every={steps}",
                           "algo.params.hidden_dim=32", f"run_dir={folder}/fql-seed${{seed}}", *extra])


def test_ensemble_training_writes_ordinary_checkpoints_and_resumes_exactly(hopper_random, tmp_path):
    """seeds=[3,5]: one ordinary checkpoint per seed in its own run folder, each loadable by load_policy with
    its own weights and seed; stopping at 4 updates and rerunning to 8 equals 8 updates straight."""
    from cleandiff_rl.agents import load_policy
    from cleandiff_rl.training import train
    from cleandiff_rl.utils import load_checkpoint
    paths = train(ensemble_config(tmp_path / "a", 4, "seeds=[3,5]"))
    assert [p.parent.name for p in paths] == ["fql-seed3", "fql-seed5"]
    resumed = [load_checkpoint(p) for p in train(ensemble_config(tmp_path / "a", 8, "seeds=[3,5]"))]
    straight = [load_checkpoint(p) for p in train(ensemble_config(tmp_path / "b", 8, "seeds=[3,5]",
                                                                      "checkpoint_every=4"))]
    for one, other, seed in zip(resumed, straight, (3, 5)):
        assert one["step"] == other["step"] == 8 and one["run_config"]["seed"] == seed
        assert one["run_config"]["seeds"] is None and one["run_config"]["ensemble"] == 1  # an ordinary run's
        for key, value in other["model"].items():
            torch.testing.assert_close(one["model"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    first, second = resumed
    assert not torch.equal(first["model"]["actor.0.weight"], second["model"]["actor.0.weight"])
    policy = load_policy(paths[1], device="cpu")
    torch.testing.assert_close(policy.state_dict()["actor.0.weight"], second["model"]["actor.0.weight"])
    assert (tmp_path / "a" / "fql-seed5" / "tb").is_dir()


def test_ensemble_training_refuses_a_shared_folder_and_partial_resume(hopper_random, tmp_path):
    from cleandiff_rl.training import compose_config, train
    shared = compose_config(["algo=fql", "dataset=test/hopper/random-v0", "steps=2", "device=cpu",
                             f"run_dir={tmp_path}/one", "ensemble=2"])
    with pytest.raises(ValueError, match="share run_dir"):
        train(shared)
    train(ensemble_config(tmp_path, 2, "seeds=[0]"))
    with pytest.raises(ValueError, match="resumes all its seeds or none"):
        train(ensemble_config(tmp_path, 4, "seeds=[0,1]"))
    from cleandiff_rl.ensemble import ensemble_seeds
    assert ensemble_seeds(ensemble_config(tmp_path, 4, "ensemble=3", "seed=7")) == [7, 8, 9]
    assert ensemble_seeds(ensemble_config(tmp_path, 4)) is None
    with pytest.raises(ValueError, match="disagree"):
        train(ensemble_config(tmp_path, 4, "seeds=[0,1]", "ensemble=3"))
    with pytest.raises(ValueError, match="support"):
        train(compose_config(["algo=diffuser", "dataset=test/hopper/random-v0", "steps=2", "device=cpu", "ensemble=2"]))


def test_benchmark_updates_prints_seed_updates_per_second(hopper_random, tmp_path):
    """benchmark_updates ensemble=[1,2]: a row per algorithm with the ordinary update's and each N's seed-updates/s."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # MINARI_DATASETS_PATH: the test's (minari_root)
    script = Path(__file__).resolve().parents[1] / "pipelines" / "benchmark_updates.py"
    done = subprocess.run([sys.executable, str(script), "dataset=test/hopper/random-v0", "algos=[fql,bc]",
                           "+params.fql.hidden_dim=16", "ensemble=[1,2]", "blocks=1", "block_updates=2", "batch_size=16"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "N=2" in done.stdout and "separate" in done.stdout
    results = json.loads((tmp_path / "runs/benchmark_updates/results.json").read_text())
    assert results["ensemble"] == [1, 2] and [row["algo"] for row in results["rows"]] == ["fql", "bc"]
    assert all(row[key] > 0 for row in results["rows"] for key in ("separate", "N=1", "N=2"))
    assert results["rows"][0]["params"]["hidden_dim"] == 16


def test_suite_trains_seeds_as_ensembles(hopper_random, tmp_path):
    """The suite with seeds=[0,1]: one train job per dataset x algorithm, each seed's ordinary run folder
    <dataset>/<algo>/seed<N>, each seed evaluated, and the table's score the mean over the seeds."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from cleandiff_rl.utils import load_checkpoint
    script = Path(__file__).resolve().parents[1] / "pipelines" / "benchmark_suite.py"
    out = tmp_path / "suite"
    done = subprocess.run([sys.executable, str(script), "suite=smoke", f"datasets=[{hopper_random}]", "algos=[fql,bc]",
                           "seeds=[0,1]", "~act_variants.fql", f"run_dir={out}"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "train-evaluate: 2 job(s)" in done.stdout  # one per algorithm, both seeds in it
    rows = json.loads((out / "results.json").read_text())["rows"]
    for algo in ("fql", "bc"):
        states = [load_checkpoint(out / "test_hopper_random-v0" / algo / f"seed{seed}" / "checkpoint.pt") for seed in (0, 1)]
        assert [s["run_config"]["seed"] for s in states] == [0, 1] and all(s["step"] == 10 for s in states)
        weight = next(key for key in states[0]["model"] if key.endswith("weight"))
        assert not torch.equal(states[0]["model"][weight], states[1]["model"][weight])  # each seed its own
        found = [r for r in rows if r["label"] == algo]
        assert sorted(r["seed"] for r in found) == [0, 1]
        mean = np.mean([r["score_mean"] for r in found])
        [line] = [line for line in done.stdout.splitlines() if line.startswith("|") and line.split("|")[1].strip() == algo]
        assert line.split("|")[4].strip().startswith(f"{mean:.1f} ± "), line


def test_gpu_protocol_smoke_writes_small_files_and_resumes(hopper_random, tmp_path):
    """protocol=smoke: FQL's and Diffusion-QL's seeds trained as ensembles, curves and a results page, every file
    under part_mib (checkpoints as parts); a second run with more steps joins the parts and resumes from them
    (its seeds continue from update 8, and the first window's curve points stay)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from cleandiff_rl.utils import load_checkpoint
    script = Path(__file__).resolve().parents[1] / "pipelines" / "gpu_protocol.py"
    out = tmp_path / "protocol"
    command = [sys.executable, str(script), "protocol=smoke", f"dataset={hopper_random}", f"out={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    limit = int(0.25 * 2**20)
    assert all(p.stat().st_size <= limit for p in out.rglob("*") if p.is_file())
    assert len(list(out.glob("fql/*/checkpoint.pt.part001"))) == 2 and not list(out.glob("fql/*/checkpoint.pt"))
    rows = json.loads((out / "curves.json").read_text())["rows"]
    assert [(r["algo"], r["updates"], r["updates_this_window"]) for r in rows] == [("fql", 8, 8), ("dql", 8, 8)]
    assert [p["step"] for p in rows[0]["curves"]["1"]] == [4, 8]
    second = subprocess.run([*command, "steps=12"], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "joined" in second.stdout and "from update 8" in second.stdout
    rows = json.loads((out / "curves.json").read_text())["rows"]
    assert [(r["algo"], r["updates"], r["updates_this_window"]) for r in rows] == [("fql", 12, 4), ("dql", 12, 4)]
    assert [p["step"] for p in rows[1]["curves"]["0"]] == [4, 8, 12]
    from importlib import util
    spec = util.spec_from_file_location("gpu_protocol", script)
    protocol = util.module_from_spec(spec)
    spec.loader.exec_module(protocol)
    protocol.unpack(out)  # the checkpoints are ordinary ones again
    state = load_checkpoint(out / "dql" / "hopper-medium-seed1" / "checkpoint.pt")
    assert state["step"] == 12 and state["run_config"]["seed"] == 1 and state["algo"] == "dql"
    assert "| fql | 2 | 12 | 4 |" in (out / "results.md").read_text()
