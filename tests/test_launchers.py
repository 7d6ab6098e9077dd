"""Grids on Hydra's launchers: parallel local jobs, submitit (local executor; a SLURM array job built but
not submitted) and a training that saves and requeues when the cluster signals preemption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from offline_data import random_dataset
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cleandiff_rl.agents import BC
from cleandiff_rl.launching import JobCallbacks, launch
from cleandiff_rl.training import CONFIG_DIR, compose_config, register_configs, train
from cleandiff_rl.utils import exclusive_run_dir, keep_latest, load_checkpoint

TRAIN = Path(__file__).resolve().parents[1] / "pipelines" / "train.py"
TINY = ["steps=20", "eval_every=0", "log_every=10", "device=cpu", "algo.params.hidden_dim=32"]


@pytest.fixture
def hopper_random(minari_root) -> str:
    random_dataset("test/hopper/random-v0", n_steps=600)
    return "test/hopper/random-v0"


def run_train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(TRAIN), *overrides], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def tensors(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        flat.update(tensors(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def same_weights(a: Path, b: Path) -> bool:
    """Whether two run folders' checkpoints (or two checkpoint files) hold the same weights."""
    wa, wb = (tensors(load_checkpoint(p / "checkpoint.pt" if p.is_dir() else p)["model"]) for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(torch.as_tensor(wa[key]), torch.as_tensor(wb[key])) for key in wa)


def launcher_config(*overrides: str) -> DictConfig:
    """The `hydra.launcher` node that `train.py <overrides>` would get."""
    register_configs()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True).hydra.launcher


@pytest.mark.slow
def test_a_grid_of_12_runs_on_two_local_processes_matches_the_runs_one_by_one(hopper_random, tmp_path):
    """`train.py -m` over 2 algorithms x 3 seeds x 2 batch sizes on the local launcher (2 processes): 12 run
    folders, one per job (the batch size, a setting beyond the folder's name, is appended to it), each
    holding the weights the same training gives alone."""
    grid = tmp_path / "grid"
    grid.mkdir()
    run_train(grid, "-m", "hydra/launcher=local", "algo=bc,diffusion_bc", "seed=0,1,2", "batch_size=32,64",
              f"dataset={hopper_random}", *TINY)
    runs = sorted(p.parent.relative_to(grid / "runs" / "train") for p in grid.glob("runs/train/*/*/checkpoint.pt"))
    assert [str(r) for r in runs] == [f"{algo}/test_hopper_random-v0-seed{seed}+algo.params.hidden_dim:32+batch_size:{batch}"
                                      for algo in ("bc", "diffusion_bc") for seed in (0, 1, 2) for batch in (32, 64)]
    alone = tmp_path / "alone"
    alone.mkdir()
    for algo, seed in (("bc", 1), ("diffusion_bc", 2)):
        run_train(alone, f"algo={algo}", f"seed={seed}", "batch_size=64", f"dataset={hopper_random}", *TINY)
        name = f"{algo}/test_hopper_random-v0-seed{seed}+algo.params.hidden_dim:32+batch_size:64"
        assert same_weights(grid / "runs" / "train" / name, alone / "runs" / "train" / name)
    assert not same_weights(*(grid / f"runs/train/bc/test_hopper_random-v0-seed{seed}+algo.params.hidden_dim:32+batch_size:64"
                              for seed in (0, 1)))


@pytest.mark.slow
def test_submitit_runs_the_jobs_locally_and_builds_a_slurm_array_job_without_submitting(hopper_random, tmp_path,
                                                                                        monkeypatch):
    """submitit's local executor runs launched trainings in their own processes, with the weights of the same
    training run here; `hydra/launcher=slurm` builds one array job with the documented resources, a
    preemption signal and a pickled task per training, stopped here just before `sbatch`."""
    jobs = [[f"dataset={hopper_random}", "algo=bc", f"seed={seed}", *TINY, f"run_dir={tmp_path / f'seed{seed}'}"]
            for seed in (0, 1)]
    local = launcher_config("hydra/launcher=submitit_local")
    paths = launch(train, "train", jobs, local, tmp_path / "sweep")
    assert paths == [tmp_path / "seed0" / "checkpoint.pt", tmp_path / "seed1" / "checkpoint.pt"]
    train(compose_config([*jobs[1][:-1], f"run_dir={tmp_path / 'here'}"]))
    assert same_weights(tmp_path / "seed1", tmp_path / "here")

    import submitit

    built = {}

    def stop_before_sbatch(executor, command):
        built["sbatch"] = executor._make_submission_file_text(command, "uid")
        raise KeyboardInterrupt("stopped before sbatch")

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # as if srun were here
    monkeypatch.setattr(submitit.SlurmExecutor, "_submit_command", stop_before_sbatch)
    slurm = launcher_config("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.array_parallelism=2")
    grid = [[f"dataset={hopper_random}", f"algo={algo}", f"seed={seed}"] for algo in ("dql", "idql") for seed in (0, 1, 2)]
    with pytest.raises(KeyboardInterrupt, match="before sbatch"):
        launch(train, "train", grid, slurm, tmp_path / "slurm")
    sbatch = built["sbatch"]
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --time=240", "#SBATCH --mem=32GB", "#SBATCH --array=0-5%2", "#SBATCH --signal=USR2@120"):
        assert line in sbatch, sbatch
    assert len(list((tmp_path / "slurm" / ".submitit").rglob("*.pkl"))) == 6


def test_a_preempted_training_saves_at_once_hands_the_signal_on_and_resumes_exactly(hopper_random, tmp_path,
                                                                                   monkeypatch):
    """The preemption signal (SIGUSR2) during an update stops the training once the update ends; between
    updates (here, in an evaluation) at once. Either way it first writes its checkpoint at that update,
    then calls the handler that was there (submitit's requeue-and-exit); the requeued run resumes from it
    and ends with the weights of a run never stopped."""
    import cleandiff_rl.training

    overrides = [f"dataset={hopper_random}", "algo=bc", "steps=30", "eval_every=0", "log_every=5", "device=cpu",
                 "algo.params.hidden_dim=32", "checkpoint_every=1000"]
    train(compose_config([*overrides, f"run_dir={tmp_path / 'whole'}"]))

    step, calls, requeued = BC.train_step, [], []

    def preempted_in_update_12(agent, batch):
        calls.append(1)
        if len(calls) == 12:
            os.kill(os.getpid(), signal.SIGUSR2)
        return step(agent, batch)

    def preempted_in_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR2)
        raise AssertionError("the signal should have stopped the run")

    def requeue_and_exit(signum, frame):  # what submitit's handler does
        requeued.append(signum)
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, requeue_and_exit)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(BC, "train_step", preempted_in_update_12)
            with pytest.raises(SystemExit):
                train(compose_config([*overrides, f"run_dir={tmp_path / 'update'}"]))
        with monkeypatch.context() as patch:
            patch.setattr(cleandiff_rl.training, "evaluate", preempted_in_evaluation)
            with pytest.raises(SystemExit):
                train(compose_config([*overrides, "eval_every=10", f"run_dir={tmp_path / 'evaluation'}"]))
        assert requeued == [signal.SIGUSR2] * 2 and signal.getsignal(signal.SIGUSR2) is requeue_and_exit
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert load_checkpoint(tmp_path / "update" / "checkpoint.pt")["step"] == 12
    assert load_checkpoint(tmp_path / "evaluation" / "checkpoint.pt")["step"] == 10
    train(compose_config([*overrides, f"run_dir={tmp_path / 'update'}"]))
    assert load_checkpoint(tmp_path / "update" / "checkpoint.pt")["step"] == 30
    assert same_weights(tmp_path / "whole", tmp_path / "update")


def test_max_minutes_ends_a_run_as_a_finished_one_and_a_rerun_keeps_to_it(hopper_random, tmp_path):
    """`max_minutes` stops a training at its wall-clock budget, with the final checkpoint and evaluation
    written as at `steps`; rerun with the same budget it trains nothing, with a larger one it goes on.
    A budget of 0 is refused."""
    base = [f"dataset={hopper_random}", "algo=bc", "steps=1000000", "eval_every=1000000", "eval_episodes=1",
            "log_every=10", "device=cpu", "batch_size=32", "algo.params.hidden_dim=32", f"run_dir={tmp_path / 'run'}"]
    path = tmp_path / "run" / "checkpoint.pt"
    train(compose_config([*base, "max_minutes=0.002"]))  # 0.12 s
    first = load_checkpoint(path)
    assert 0 < first["step"] < 1_000_000 and 0.12 <= first["wall_seconds"] < 60
    assert first["eval_seconds"] > 0  # the final evaluation ran
    written = path.stat().st_mtime_ns
    train(compose_config([*base, "max_minutes=0.002"]))
    assert path.stat().st_mtime_ns == written
    train(compose_config([*base, "max_minutes=0.004"]))
    second = load_checkpoint(path)
    assert second["step"] > first["step"] and second["wall_seconds"] >= 0.24
    for bad in ("0", "abc"):
        with pytest.raises(ValueError, match=f"max_minutes={bad}: a wall-clock budget per training is a number > 0"):
            train(compose_config([*base, f"max_minutes={bad}", f"run_dir={tmp_path / 'zero'}"]))
    with pytest.raises(ValueError, match="keep_checkpoints=None: 1 keeps checkpoint.pt alone"):
        train(compose_config([*base, "keep_checkpoints=null", f"run_dir={tmp_path / 'zero'}"]))
    with pytest.raises(ValueError, match="keep_checkpoints=0: 1 keeps checkpoint.pt alone"):
        train(compose_config([*base, "keep_checkpoints=0", f"run_dir={tmp_path / 'zero'}"]))
    assert not (tmp_path / "zero").exists()


def test_keep_checkpoints_keeps_the_latest_states_a_run_passed_through(hopper_random, tmp_path):
    """keep_checkpoints=N keeps the N latest checkpoints as checkpoints/<updates>.pt: the last one is the
    final checkpoint, an earlier one holds the weights of a run that stopped there; older ones are deleted."""
    base = [f"dataset={hopper_random}", "algo=bc", "eval_every=0", "device=cpu", "batch_size=32",
            "algo.params.hidden_dim=32", "checkpoint_every=10"]
    train(compose_config([*base, "steps=40", "keep_checkpoints=2", f"run_dir={tmp_path / 'run'}"]))
    kept = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [path.name for path in kept] == ["000000030.pt", "000000040.pt"]
    assert kept[1].samefile(tmp_path / "run" / "checkpoint.pt") and load_checkpoint(kept[0])["step"] == 30
    train(compose_config([*base, "steps=30", f"run_dir={tmp_path / 'short'}"]))
    assert same_weights(kept[0], tmp_path / "short") and not same_weights(kept[0], kept[1])
    assert not (tmp_path / "short" / "checkpoints").exists()


def test_keep_latest_copies_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    def no_hard_links(*args):
        raise OSError("no hard links here")

    monkeypatch.setattr(os, "link", no_hard_links)
    state = tmp_path / "checkpoint.pt"
    for step in (10, 20, 30):
        state.write_bytes(b"state %d" % step)
        kept = keep_latest(state, tmp_path / "kept", step, 2)
    assert [(path.name, path.read_bytes()) for path in kept] == [("000000020.pt", b"state 20"), ("000000030.pt", b"state 30")]
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["000000020.pt", "000000030.pt"]


def test_a_run_folder_holding_other_settings_is_not_resumed(hopper_random, tmp_path):
    """Pointing a training at a folder whose checkpoint was trained with another seed, batch or parameter
    is one clear error (not a continuation of that run, nor a report that it finished); run-only settings resume; a
    folder another process is training in is refused."""
    base = [f"dataset={hopper_random}", "algo=bc", "steps=10", "eval_every=0", "device=cpu", "batch_size=32",
            "algo.params.hidden_dim=32", f"run_dir={tmp_path / 'run'}"]
    train(compose_config(base))
    with pytest.raises(ValueError, match=r"other settings \(algo.params.lr: 0.0003 -> 0.001\)"):
        train(compose_config([*base, "algo.params.lr=1e-3"]))
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 32 -> 64, seed: 0 -> 1\)"):
        train(compose_config([*base, "batch_size=64", "seed=1"]))
    train(compose_config([*base, "steps=20", "log_every=5", "threads=1"]))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 20
    with exclusive_run_dir(tmp_path / "run"):  # as a second suite process training the same cell would hold it
        with pytest.raises(FileExistsError, match="another process is writing to"):
            train(compose_config([*base, "steps=30"]))
    with pytest.raises(ValueError, match="unknown"):  # refused input in a new folder leaves no folder
        train(compose_config([*base, f"run_dir={tmp_path / 'new'}", "+algo.params.nope=1"]))
    assert not (tmp_path / "new").exists()


def test_a_run_resumes_with_other_act_settings_and_acts_with_them(hopper_random, tmp_path):
    """Settings only acting reads (IDQL's selection, its number of candidates) may change on resume: the
    updates are those of one straight run, and the final checkpoint acts as configured now. A bad new
    value is refused as in a new run, leaving the checkpoint as it was."""
    base = [f"dataset={hopper_random}", "algo=idql", "eval_every=0", "device=cpu", "batch_size=32",
            "algo.params.hidden_dim=32", "algo.params.critic_hidden=32", "algo.params.num_candidates=4"]
    train(compose_config([*base, "steps=10", "algo.params.selection=expectile", f"run_dir={tmp_path / 'run'}"]))
    with pytest.raises(ValueError, match="unknown selection 'nope'"):
        train(compose_config([*base, "steps=20", "algo.params.selection=nope", f"run_dir={tmp_path / 'run'}"]))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 10
    acting = ["algo.params.selection=argmax", "algo.params.num_candidates=8"]
    train(compose_config([*base, "steps=20", *acting, f"run_dir={tmp_path / 'run'}"]))
    train(compose_config([*base, "steps=20", *acting, f"run_dir={tmp_path / 'straight'}"]))
    resumed = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (resumed["step"], resumed["config"]["selection"], resumed["config"]["num_candidates"]) == (20, "argmax", 8)
    assert same_weights(tmp_path / "run", tmp_path / "straight")


def _fails_on_input(cfg: DictConfig) -> None:
    print("checking input")
    raise ValueError("bad input")


def _fails_after_writing(cfg: DictConfig) -> None:
    (Path(cfg.run_dir) / "checkpoint.pt").write_text("partial")
    raise RuntimeError("crashed")


def test_a_logged_job_keeps_its_output_and_a_job_refused_in_a_new_folder_leaves_no_folder(tmp_path):
    from omegaconf import OmegaConf

    from cleandiff_rl.launching import Logged

    def job(name: str) -> DictConfig:
        return OmegaConf.create({"run_dir": str(tmp_path / name)})

    with pytest.raises(ValueError, match="bad input"):
        Logged(_fails_on_input)(job("refused"))
    assert not (tmp_path / "refused").exists()
    (tmp_path / "existing").mkdir()
    with pytest.raises(ValueError):
        Logged(_fails_on_input)(job("existing"))  # a folder that was there stays, with the log of the failure
    assert "checking input" in (tmp_path / "existing" / "log.txt").read_text()
    with pytest.raises(RuntimeError):
        Logged(_fails_after_writing)(job("crashed"))  # a job that wrote something keeps it, to resume or inspect
    assert sorted(p.name for p in (tmp_path / "crashed").iterdir()) == ["checkpoint.pt", "log.txt"]
    assert Logged(print)(job("ok")) is None and (tmp_path / "ok" / "log.txt").read_text().startswith("{'run_dir'")


class Recorder(Callback):
    """A job callback that notes its calls in `calls`."""

    calls: list[tuple[str, str, object]] = []

    def __init__(self, name: str) -> None:
        self.name = name

    def on_job_start(self, config: DictConfig, **kwargs: object) -> None:
        Recorder.calls.append(("start", self.name, config.value))

    def on_job_end(self, config: DictConfig, job_return: object, **kwargs: object) -> None:
        Recorder.calls.append(("end", self.name, job_return))


def test_the_callbacks_a_config_names_run_around_each_job_in_hydras_order():
    """`launch` gives the launcher the config's hydra.callbacks through Hydra's public Callback interface: in
    order at a job's start, in reverse at its end, with what Hydra's job runner passes them."""
    target = f"{Recorder.__module__}.Recorder"
    callbacks = JobCallbacks(OmegaConf.create({"hydra": {"callbacks": {
        "first": {"_target_": target, "name": "first"}, "second": {"_target_": target, "name": "second"}}}}))
    Recorder.calls.clear()
    callbacks.on_job_start(config=OmegaConf.create({"value": 7}), task_function=print)
    callbacks.on_job_end(config=OmegaConf.create({"value": 7}), job_return="done")
    assert Recorder.calls == [("start", "first", 7), ("start", "second", 7), ("end", "second", "done"),
                              ("end", "first", "done")]
    assert JobCallbacks(OmegaConf.create({"hydra": {}})).callbacks == []  # none named: nothing to call
