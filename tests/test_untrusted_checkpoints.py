"""A checkpoint file runs no code when loaded: checkpoints are loaded weights-only, so a file whose pickle
would call a function is refused unread, through every entry point that takes a checkpoint, with one short
error; random bytes and a truncated checkpoint are one short error too. Checkpoints written before saves
became plain values (numpy RNG state) still load and resume."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from offline_data import random_dataset

from cleandiff_rl.agents import load_policy
from cleandiff_rl.training import compose_config, train
from cleandiff_rl.utils import load_checkpoint

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
DATASET = "test/hopper/random-v0"
REFUSED = ("is not a readable checkpoint: it holds objects other than tensors and plain values (refused; nothing in it "
           "was run)")
UNREADABLE = "is not a readable checkpoint (truncated or not written by cleandiff_rl)"


class Payload:
    """What a malicious checkpoint hides: unpickling it calls `call(*args)`, e.g. open(path, "w")."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def train_overrides(run_dir: str, steps: int) -> list[str]:
    return ["algo=bc", f"dataset={DATASET}", f"steps={steps}", "batch_size=16", "eval_every=0", "device=cpu",
            "algo.params.hidden_dim=16", f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder holding a tiny dataset (minari/) and a real 2-update BC checkpoint (real.pt)."""
    root = tmp_path_factory.mktemp("untrusted")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(root / "minari"))
        random_dataset(DATASET, n_steps=200)
        path = train(compose_config(train_overrides(str(root / "trained"), steps=2)))
    (root / "real.pt").write_bytes(path.read_bytes())
    return root


def malicious(path: Path, marker: Path, call=builtins.open) -> Path:
    """A checkpoint laid out as `Agent.save` writes one (torch.save's zip), whose model state would create `marker`."""
    args = (str(marker), "w") if call is builtins.open else (f"touch {marker}",)
    torch.save({"format": 1, "algo": "bc", "step": 2, "model": {"net.0.weight": Payload(call, *args)}}, path)
    return path


def bad_file(kind: str, folder: Path, root: Path) -> Path:
    """`folder`/checkpoint.pt of `kind`: malicious, random bytes, or the real checkpoint cut in half."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint.pt"
    if kind == "malicious":
        return malicious(path, root / "pwned")
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        real = (root / "real.pt").read_bytes()
        path.write_bytes(real[: len(real) // 2])
    return path


@pytest.mark.parametrize("call", [builtins.open, os.system])
def test_load_policy_refuses_a_malicious_checkpoint_without_running_it(root, tmp_path, call):
    marker = tmp_path / "pwned"
    path = malicious(tmp_path / "checkpoint.pt", marker, call)
    with pytest.raises(ValueError) as error:
        load_policy(str(path))
    assert str(error.value) == f"{path} {REFUSED}"
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # the refusal is torch's own
        torch.load(path, weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_load_policy_on_random_bytes_or_a_truncated_checkpoint_is_one_short_error(root, tmp_path, kind):
    path = bad_file(kind, tmp_path, root)
    with pytest.raises(ValueError) as error:
        load_policy(str(path))
    assert str(error.value) == f"{path} {UNREADABLE}" and error.value.__cause__ is None


@pytest.mark.parametrize("kind,scripts", [("malicious", ["evaluate", "sweep", "distill", "train"]),
                                          ("random", ["evaluate", "sweep"]), ("truncated", ["distill", "train"])])
def test_every_pipeline_that_takes_a_checkpoint_refuses_a_bad_one(root, tmp_path, kind, scripts):
    """evaluate, sweep and distill (checkpoint=...) and a training's resume (run_dir/checkpoint.pt): one
    `error:` line under 200 characters, exit 2, no payload run and nothing written. (Every entry point
    reads through `load_checkpoint`: random and truncated files take two each, to keep the test short.)"""
    path = bad_file(kind, tmp_path / "run", root)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINARI_DATASETS_PATH": str(root / "minari")}
    env.pop("HYDRA_FULL_ERROR", None)
    commands = {script: [f"checkpoint={path.relative_to(tmp_path)}", "device=cpu"] for script in scripts}
    if "train" in scripts:
        commands["train"] = train_overrides("run", steps=4)  # resumes run/checkpoint.pt
    before = sorted(tmp_path.rglob("*"))
    running = {script: subprocess.Popen([sys.executable, str(PIPELINES / f"{script}.py"), *overrides], cwd=tmp_path,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for script, overrides in commands.items()}
    expected = f"error: run/checkpoint.pt {REFUSED if kind == 'malicious' else UNREADABLE}\n"
    for script, process in running.items():
        _, stderr = process.communicate(timeout=120)
        assert (process.returncode, stderr) == (2, expected), script
        assert len(stderr) < 200
    assert not (root / "pwned").exists()
    assert sorted(tmp_path.rglob("*")) == before  # no run folder, TensorBoard file or lock


def test_new_checkpoints_hold_only_tensors_and_plain_values(root):
    """torch's own weights-only load, with nothing allow-listed, reads a training checkpoint."""
    assert torch.serialization.get_unsafe_globals_in_checkpoint(root / "real.pt") == []
    state = torch.load(root / "real.pt", weights_only=True)
    assert state["step"] == 2 and state["algo"] == "bc" and torch.is_tensor(state["rng"]["numpy"][1])


def test_a_checkpoint_written_before_loads_and_resumes_exactly(root, tmp_path, monkeypatch):
    """A checkpoint with numpy's RNG state as a numpy array (as saves wrote it before) loads and resumes:
    the same weights as the same run from a new-style checkpoint."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root / "minari"))
    state = load_checkpoint(root / "real.pt")
    name, keys, *rest = state["rng"]["numpy"]
    old = {**state, "rng": {**state["rng"], "numpy": (name, keys.numpy().astype(np.uint32), *rest)}}
    for folder, saved in (("old", old), ("new", state)):
        (tmp_path / folder).mkdir()
        torch.save(saved, tmp_path / folder / "checkpoint.pt")
    assert isinstance(load_checkpoint(tmp_path / "old" / "checkpoint.pt")["rng"]["numpy"][1], np.ndarray)
    resumed = {folder: load_checkpoint(train(compose_config(train_overrides(str(tmp_path / folder), steps=4))))
               for folder in ("old", "new")}
    assert resumed["old"]["step"] == resumed["new"]["step"] == 4
    torch.testing.assert_close(resumed["old"]["model"], resumed["new"]["model"], rtol=0, atol=0)
    assert any(not torch.equal(value, state["model"][key]) for key, value in resumed["new"]["model"].items())
