"""Vectorized evaluation and solver x steps sweeps, on an untrained diffusion policy in InvertedPendulum-v5."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from cleandiff_rl import evaluation
from cleandiff_rl.agents.base import Agent
from cleandiff_rl.data.registry import reference_scores
from cleandiff_rl.diffusion import DiffusionModel
from cleandiff_rl.evaluation import COLUMNS, evaluate, sweep, sweep_table
from cleandiff_rl.nn import DQLMlp

ENV = "InvertedPendulum-v5"  # obs 4, act 1, no reference scores


@dataclass
class StubConfig:
    solver: str = "ddim"
    sampling_steps: int = 5
    time: str = "continuous"
    diffusion_steps: int = 1000


class StubDiffusionPolicy(Agent):
    """A real (untrained) DiffusionModel over actions, conditioned on the observation."""

    name = "stub_diffusion"
    Config = StubConfig

    def __init__(self, obs_dim: int, act_dim: int, config: dict | StubConfig | None = None, **kwargs):
        super().__init__(obs_dim, act_dim, config, **kwargs)
        torch.manual_seed(0)
        self.actor = DiffusionModel(DQLMlp(act_dim, cond_dim=obs_dim, hidden_dim=32), time=self.config.time,
                                    schedule="linear", diffusion_steps=self.config.diffusion_steps,
                                    x_min=-1.0, x_max=1.0, device=self.device)

    def _act(self, obs: Tensor, solver: str, steps: int, generator: torch.Generator | None) -> Tensor:
        action, self.last_sample_log = self.actor.sample(obs.new_zeros(obs.shape[0], self.act_dim), solver=solver,
                                                         steps=steps, condition_cfg=obs, generator=generator)
        return action


@dataclass
class NoConfig:
    pass


class ZeroPolicy(Agent):
    name = "zero"
    Config = NoConfig
    is_diffusion = False

    def _act(self, obs: Tensor, solver: str, steps: int, generator: torch.Generator | None) -> Tensor:
        return obs.new_zeros(obs.shape[0], self.act_dim)


def stub(obs_dim: int = 4, act_dim: int = 1, **config) -> StubDiffusionPolicy:
    return StubDiffusionPolicy(obs_dim, act_dim, config, env_id=ENV, device="cpu")


def test_evaluate_statistics():
    policy = stub()
    result = evaluate(policy, episodes=3, seed=1)
    returns = np.array(result["returns"])
    assert len(returns) == 3 and np.isfinite(returns).all()
    assert result["return_mean"] == pytest.approx(returns.mean())
    assert result["return_se"] == pytest.approx(returns.std(ddof=1) / np.sqrt(3))
    assert result["length_mean"] == pytest.approx(returns.mean() + 1)  # reward 1 per step, 0 on the falling step
    assert result["score_mean"] is None and result["score_se"] is None
    assert (result["env_id"], result["solver"], result["steps"], result["nfe"]) == (ENV, "ddim", 5, 5)
    assert result["time_per_action_ms"] > 0
    assert evaluate(policy, episodes=3, seed=1)["returns"] == result["returns"]  # env seeds + sampler noise

    one = evaluate(policy, episodes=1, seed=1, solver="ddpm", steps=2)
    assert (one["return_se"], one["solver"], one["steps"], one["nfe"]) == (0.0, "ddpm", 2, 2)


def test_evaluate_normalized_score_and_non_diffusion():
    result = evaluate(ZeroPolicy(11, 3, device="cpu"), "Hopper-v5", episodes=2)
    lo, hi = reference_scores("Hopper-v5")
    assert result["score_mean"] == pytest.approx(100 * (result["return_mean"] - lo) / (hi - lo))
    assert result["score_se"] == pytest.approx(100 * result["return_se"] / (hi - lo))
    assert result["nfe"] is None and result["solver"] is None


def test_evaluate_dimension_mismatch():
    with pytest.raises(ValueError, match=r"obs dim 5.*InvertedPendulum-v5.*\(4,\)"):
        evaluate(stub(obs_dim=5), episodes=2)
    with pytest.raises(ValueError, match="env_id"):
        evaluate(StubDiffusionPolicy(4, 1, device="cpu"))


def test_sweep_writes_tables_and_tensorboard(tmp_path: Path):
    policy = stub()
    solvers, steps = ["ddim", "heun", "ode_dpmsolver_2M"], [1, 2, 5]
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        rows = sweep(policy, solvers=solvers, steps=steps, episodes=2, out_dir=tmp_path, writer=writer,
                     progress=False)
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(COLUMNS)
    assert len(table) == len(rows) == len(json.loads((tmp_path / "sweep.json").read_text())) == 9
    # network calls per action: one per step for ddim and DPM-Solver-2M; Heun two per step, one on the last
    nfe = {"ddim": [1, 2, 5], "heun": [1, 3, 9], "ode_dpmsolver_2M": [1, 2, 5]}
    assert [(row["solver"], int(row["steps"]), int(row["nfe"])) for row in table] == [
        (solver, n, nfe[solver][i]) for solver in solvers for i, n in enumerate(steps)]
    assert all(row["error"] == "" for row in table)
    assert list(tmp_path.glob("tb/events.out.tfevents.*"))
    assert not list(tmp_path.glob("*.tmp"))
    text = sweep_table(rows)
    assert "heun" in text and "nfe" in text and "5 steps" in text


def test_sweep_records_sampler_errors(tmp_path: Path):
    policy = stub(time="discrete", diffusion_steps=2, solver="ddpm", sampling_steps=2)
    rows = sweep(policy, solvers=["ddim"], steps=[1, 5], episodes=1, out_dir=tmp_path, progress=False)
    assert rows[0]["error"] is None and rows[0]["nfe"] == 1
    assert "at most 2 steps" in rows[1]["error"] and rows[1]["return_mean"] is None
    assert "error" in sweep_table(rows)


def test_sweep_rejects_bad_input_before_evaluating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def fail(*args, **kwargs):
        raise AssertionError("evaluate must not run")

    monkeypatch.setattr(evaluation, "evaluate", fail)
    with pytest.raises(ValueError, match="unknown solver 'nope'"):
        sweep(stub(), solvers=["ddim", "nope"], out_dir=tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="diffusion policy"):
        sweep(ZeroPolicy(4, 1, env_id=ENV, device="cpu"), progress=False)
    with pytest.raises(ValueError, match="obs dim 5"):
        sweep(stub(obs_dim=5), progress=False)
    assert not (tmp_path / "out").exists()


def test_one_process_at_a_time_writes_a_run_dir(tmp_path: Path):
    """A second training or build into a folder in use is refused with one clear error; a folder the lock
    made is gone again if nothing else was written to it."""
    from cleandiff_rl.utils import exclusive_run_dir

    with exclusive_run_dir(tmp_path / "run") as run_dir:
        (run_dir / "checkpoint.pt").write_text("x")
        with pytest.raises(FileExistsError, match="another process is writing to .*run"):
            with exclusive_run_dir(run_dir):  # flock: a second open file, as another process would hold
                pass
    with exclusive_run_dir(tmp_path / "run"):  # released
        pass
    with pytest.raises(ValueError, match="refused"):
        with exclusive_run_dir(tmp_path / "refused"):
            raise ValueError("refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_lock_taken_as_its_holder_ends_is_on_the_file_that_stays(tmp_path: Path, monkeypatch):
    """A process that opens `.lock` just before its holder ends (and removes it) locks a file no one else
    sees; it must lock the new one, so that a third process is still refused."""
    import builtins

    from cleandiff_rl.utils import checkpoint, exclusive_run_dir

    calls = []

    def open_then_holder_ends(path, *args, **kwargs):
        handle = builtins.open(path, *args, **kwargs)
        if not calls:
            Path(path).unlink()  # the holder's block ends between our open and our flock
        calls.append(path)
        return handle

    monkeypatch.setattr(checkpoint, "open", open_then_holder_ends, raising=False)
    with exclusive_run_dir(tmp_path / "run"):
        monkeypatch.undo()
        assert len(calls) == 2
        with pytest.raises(FileExistsError, match="another process is writing to"):
            with exclusive_run_dir(tmp_path / "run"):
                pass


def test_atomic_write_replaces_whole_files_or_nothing(tmp_path: Path):
    """Results and checkpoints go through one `atomic_write`: a write that fails half way leaves the previous
    file as it was and no temporary file behind."""
    from cleandiff_rl.utils import atomic_save, atomic_write, load_checkpoint

    target = atomic_write(tmp_path / "sub" / "table.csv", lambda f: f.write("a,b\r\n1,2\n"))
    assert target.read_bytes() == b"a,b\r\n1,2\n"  # text mode, newlines as written (csv's \r\n kept)

    def fail_half_way(f) -> None:
        f.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail_half_way)
    assert target.read_bytes() == b"a,b\r\n1,2\n"
    with pytest.raises(AttributeError, match="pickle"):
        atomic_save({"x": lambda: None}, tmp_path / "ckpt.pt")  # pickling fails part way through
    assert not (tmp_path / "ckpt.pt").exists()
    atomic_save({"x": torch.arange(3)}, tmp_path / "ckpt.pt")
    assert torch.equal(load_checkpoint(tmp_path / "ckpt.pt")["x"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ckpt.pt", "sub", "table.csv"]
