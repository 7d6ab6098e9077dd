"""Run a list of pipeline jobs through a Hydra launcher: the same plugins `pipeline.py -m` uses.

`python pipelines/train.py -m algo=dql,idql seed=0,1,2 hydra/launcher=joblib` is Hydra's own multirun.
The benchmark suite needs more than a grid (each algorithm has its own overrides), so `launch` hands
Hydra's launcher an explicit list of override lists. Whatever launcher the calling pipeline was given
(`hydra/launcher=joblib`, `submitit_slurm`, `slurm`, `submitit_local`, ...) runs them, so one command
scales from a laptop to a cluster. This uses Hydra's public launcher interface (`Launcher.launch`), the
one its sweepers call, and its public `Callback` interface for the callbacks a config names (`hydra.callbacks`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.types import HydraContext, RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from cleandiff_rl.training import CONFIG_DIR, register_configs
from cleandiff_rl.utils import made_dirs


class Logged:
    """A job's task that writes its output (progress bars included) to `<cfg.run_dir>/log.txt` instead of
    the launcher's terminal, where parallel jobs would overwrite each other's lines. A job that fails in a
    folder it created and wrote nothing else to removes it (the error still reaches the launcher).
    Picklable, so that joblib and submitit can ship it to their workers."""

    def __init__(self, task: Callable[[DictConfig], Any]) -> None:
        self.task = task

    def __call__(self, cfg: DictConfig) -> Any:
        log = Path(cfg.run_dir) / "log.txt"
        with made_dirs(log.parent) as new:
            try:
                with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                    return self.task(cfg)
            except BaseException:
                if new and [p.name for p in log.parent.iterdir()] == ["log.txt"]:
                    log.unlink()  # and `made_dirs` removes the folders
                raise


class JobCallbacks(Callback):
    """The job callbacks a config names (`hydra.callbacks`), called in order at a job's start and in reverse at
    its end, as Hydra's own multirun calls them; what a launcher's `HydraContext` needs."""

    def __init__(self, config: DictConfig) -> None:
        self.callbacks = [instantiate(node) for node in (config.hydra.get("callbacks") or {}).values()]

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        for callback in self.callbacks:
            callback.on_job_start(config=config, **kwargs)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        for callback in reversed(self.callbacks):
            callback.on_job_end(config=config, job_return=job_return, **kwargs)


def current_launcher(cfg: DictConfig) -> DictConfig:
    """The launcher the running pipeline was given (`hydra/launcher=...` and `hydra.launcher.*`), with
    references to the pipeline's own settings (e.g. `n_jobs: ${jobs}`) resolved and those to Hydra's
    job and sweep folders (`${hydra.sweep.dir}`) kept, to follow each launch."""
    launcher = OmegaConf.to_container(HydraConfig.get().launcher, resolve=False)
    scope = OmegaConf.merge(OmegaConf.to_container(cfg, resolve=False), {"launcher": launcher})
    resolved = {key: value if isinstance(value, str) and "${hydra." in value else scope.launcher[key]
                for key, value in launcher.items()}
    return OmegaConf.create(resolved)


def launch(task: Callable[[DictConfig], Any], config_name: str, jobs: Sequence[Sequence[str]],
           launcher: DictConfig, sweep_dir: str | Path) -> list[Any]:
    """Run `task` on the config `config_name` composed with each job's overrides, through `launcher`
    (a `hydra.launcher` node, e.g. `current_launcher(cfg)`); return the tasks' return values in order.

    Hydra's per-job folders (and submitit's logs, in `.submitit/`) go under `sweep_dir`. A failed job
    raises its error after every job has run.
    """
    if not jobs:
        return []
    register_configs()
    with contextlib.ExitStack() as stack:
        if not GlobalHydra.instance().is_initialized():
            stack.enter_context(initialize_config_dir(str(CONFIG_DIR), version_base="1.3"))
        loader = GlobalHydra.instance().config_loader()
        config = loader.load_configuration(config_name, [override("hydra.sweep.dir", Path(sweep_dir).resolve()),
                                                         f"hydra.job.name={config_name}"], run_mode=RunMode.MULTIRUN)
        with open_dict(config.hydra):
            config.hydra.launcher = launcher
        instance = Plugins.instance().instantiate_launcher(
            hydra_context=HydraContext(config_loader=loader, callbacks=JobCallbacks(config)),  # type: ignore[arg-type]
            task_function=task,
            config=config)
        returns = instance.launch([list(job) for job in jobs], initial_job_idx=0)
    return [job.return_value for job in returns]  # re-raises a failed job's exception


def override(key: str, value: Any) -> str:
    """`key=value` as a Hydra override that keeps `value`'s type: a string stays a literal string (paths may
    hold '=', ',', spaces), None is null, numbers and booleans stay what they are."""
    if isinstance(value, (str, os.PathLike)):
        text = str(value).replace('"', '\\"')  # in a quoted Hydra string only quotes need escaping
        return f'{key}="{text}"'
    return f"{key}={json.dumps(value)}"  # null, true/false, numbers, [lists] and {maps} read as Hydra values


def launcher_name(launcher: DictConfig) -> str:
    """A launcher node's short name for messages ('JoblibLauncher', 'SlurmLauncher', ...)."""
    return str(launcher.get("_target_", "?")).rsplit(".", 1)[-1]


__all__ = ["Logged", "current_launcher", "launch", "launcher_name", "override"]
