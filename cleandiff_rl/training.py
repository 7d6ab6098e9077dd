"""Offline training of any policy in `cleandiff_rl.agents`: progress, TensorBoard, evaluation, resume.

`train(cfg)` takes the composed `configs/train.yaml` (algo x task) and writes, in `cfg.run_dir`:
`checkpoint.pt` (weights, optimizers, config, normalizer, step and RNG states, the run's wall time
so far and the part of it spent in periodic evaluations; written atomically every `checkpoint_every`
steps and at the end) and `tb/` (train/*, eval/score, eval/return).
Rerunning the same command resumes from the checkpoint. `max_minutes` ends a run early, as a finished
one (final evaluation and checkpoint), once its wall time, resumes included, reaches that budget.
`keep_checkpoints=N` also keeps the N latest checkpoints as `checkpoints/<updates>.pt`.

Under `torchrun --nproc_per_node=N pipelines/train.py ...` the N processes train one model together, data
parallel (`utils.distributed`): `batch_size` is the global batch, of which each rank trains on its 1/N
share, and the gradients are averaged over the ranks before clipping and stepping, so the learning rate
means what it means in one process. Rank 0 alone writes the checkpoint (the same format as a single
process's), TensorBoard and evaluations.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cleandiff_rl.agents import ALGORITHMS, Agent, get_algorithm
from cleandiff_rl.agents.acting import act_only_settings
from cleandiff_rl.agents.base import make_config
from cleandiff_rl.agents.planning import Planner
from cleandiff_rl.data import load_dataset
from cleandiff_rl.evaluation import evaluate, plan_figure
from cleandiff_rl.utils import (CudaGraphStep, Preemption, barrier, exclusive_run_dir, finite_floats, keep_latest,
                                load_checkpoint, mean_over_ranks, process_group, rank, rank_share, resolve_device,
                                seed_everything, world_size)
from cleandiff_rl.utils.cli import message as command_line_message

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the repository's configs/ links here


def run_name(dataset: str, task_name: str, task_dataset: str) -> str:
    """A run folder's name: the task's, or the dataset id's (with '/' -> '_') when `dataset=` names another."""
    return task_name if dataset == task_dataset else dataset.replace("/", "_")


def checkpoint_name(path: str) -> str:
    """The name evaluate and sweep give their folders for a checkpoint: its run folder and the one above
    it ('dql-hopper-medium-seed0' for runs/train/dql/hopper-medium-seed0/checkpoint.pt,
    'hopper-idql-seed0-train' for the quickstart's runs/quickstart/hopper-idql-seed0/train/checkpoint.pt)."""
    folder = Path(str(path)).resolve().parent
    return f"{folder.parent.name}-{folder.name}"


def settings_suffix() -> str:
    """'+<key>:<value>+...' for train.yaml's run_dir when pipelines/train.py was given settings beyond the
    run folder's name (Hydra's `override_dirname`, without the keys train.yaml excludes); '' otherwise, and
    for configs composed without the command line (`compose_config`)."""
    if not HydraConfig.initialized() or HydraConfig.get().job.config_name != "train":
        return ""
    overrides = HydraConfig.get().job.override_dirname
    return f"+{overrides.replace('/', '_')}" if overrides else ""


def register_configs() -> None:
    """Store each algorithm's `Config` dataclass as the Hydra schema `algo_params/<name>`, so every
    setting can be overridden on the command line (`algo.params.lr=1e-4`) with its type checked; and
    the resolvers the configs name their run folders with (`run_name`, `settings_suffix`, `checkpoint_name`)."""
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("settings_suffix", settings_suffix, replace=True)
    OmegaConf.register_new_resolver("checkpoint_name", checkpoint_name, replace=True)
    store = ConfigStore.instance()
    for name, cls in ALGORITHMS.items():
        store.store(group="algo_params", name=name, node=cls.Config)


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose a config from configs/ without the command line (quickstart, benchmarks, tests); a bad
    override raises a one-line ValueError (what `user_errors` reports)."""
    register_configs()
    try:
        if GlobalHydra.instance().is_initialized():  # inside a @hydra.main pipeline, whose search path is configs/
            return compose(config_name, overrides=overrides or [])
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name, overrides=overrides or [])
    except (ConfigCompositionException, MissingConfigException) as error:
        raise ValueError(command_line_message(error)) from error  # the one line a pipeline prints


def params_overrides(params: Any, algo: str) -> list[str]:
    """A pipeline's `params` (algorithm -> extra algo.params) for `algo`, as train.py overrides."""
    return [f"algo.params.{key}={value}" for key, value in (params.get(algo) or {}).items()]


def dataset_env_id(dataset: Any) -> str:
    """The gymnasium id a Minari dataset is evaluated on (its eval env, else its env)."""
    eval_spec = dataset.storage.metadata.get("eval_env_spec")
    if eval_spec:
        return json.loads(eval_spec)["id"]
    if dataset.spec.env_spec is None:
        raise ValueError(f"dataset {dataset.spec.dataset_id} records no environment; set env_id=<gymnasium id>")
    return dataset.spec.env_spec.id


def changed_settings(saved: dict, current: dict) -> list[str]:
    """The settings that shape a training (seed, batch size, every algorithm parameter but the act-only ones)
    in which a run's saved config and the current one differ, as 'key: saved -> current'; keys only one of
    them has are skipped (a parameter added since the checkpoint was written). Run-only settings (device,
    threads, cuda_graph, compile, logging, evaluation) and act-only settings are not compared: a run may resume
    with others."""
    def flat(config: dict) -> dict:
        algo, params = config.get("algo", {}), config.get("algo", {}).get("params", {})
        acting = act_only_settings(ALGORITHMS[algo["name"]].Config) if algo.get("name") in ALGORITHMS else ()
        return {"seed": config.get("seed"), "batch_size": config.get("batch_size"),
                **{f"algo.params.{k}": v for k, v in params.items() if k not in acting}}
    old, new = flat(saved), flat(current)
    return [f"{key}: {old[key]} -> {new[key]}" for key in sorted(old.keys() & new.keys()) if old[key] != new[key]]


def _rng_state(generator: torch.Generator) -> dict:
    """Every random stream's state as tensors and plain values (what a weights-only load reads)."""
    name, keys, *rest = np.random.get_state()  # ('MT19937', uint32 array, position, has_gauss, cached_gaussian)
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), *rest),
            "python": random.getstate(), "batches": generator.get_state()}


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]  # keys: a tensor, or a numpy array in checkpoints written before
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    generator.set_state(state["batches"])


def new_agent(algo_cls: type[Agent], params: dict, minari_dataset: Any, data: Any, *, env_id: str,
              device: torch.device) -> Agent:
    """A freshly initialized agent for `data` (what `algo_cls.training_data` made of `minari_dataset`),
    with the data's observation normalizer, the dataset's action bounds and its statistics (`prepare`)."""
    space = minari_dataset.action_space
    agent = algo_cls(data.obs_dim, data.act_dim, params, obs_normalizer=data.normalizer_state()["obs"], env_id=env_id,
                     dataset_id=minari_dataset.spec.dataset_id, action_bounds=(space.low, space.high), device=device)
    agent.prepare(data)
    return agent


def wall_budget(max_minutes: Any) -> float | None:
    """`max_minutes` (a training's wall-clock budget) in seconds; None for none. One clear error for
    anything else than a number > 0, from train and from the suite before it starts any."""
    if max_minutes is None:
        return None
    if isinstance(max_minutes, bool) or not isinstance(max_minutes, (int, float)) or max_minutes <= 0:
        raise ValueError(f"max_minutes={max_minutes}: a wall-clock budget per training is a number > 0 (null: none)")
    return 60.0 * float(max_minutes)


def log_evaluation(writer: SummaryWriter, result: dict, step: int) -> str:
    """Write an evaluation's mean score and return to TensorBoard at `step`; return its one-line summary."""
    for key in ("score", "return"):
        if result[f"{key}_mean"] is not None:
            writer.add_scalar(f"eval/{key}", result[f"{key}_mean"], step)
    score = f", score {result['score_mean']:.1f}" if result["score_mean"] is not None else ""
    return f"return {result['return_mean']:.1f} ± {result['return_se']:.1f}{score}"


def train(cfg: DictConfig) -> Path | list[Path]:
    """Train (or resume) the policy `cfg` describes; return the path of the final checkpoint.

    Launched by torchrun, every rank calls this: it joins the process group (`process_group`) and trains
    its share of each global batch; every rank returns once rank 0 has written the final checkpoint.
    With `seeds=[...]` or `ensemble=N`, the seeds train as one batched model (`cleandiff_rl.ensemble`) and
    the N checkpoints' paths come back.
    """
    if cfg.get("seeds") is not None or cfg.get("ensemble", 1) != 1:
        from cleandiff_rl.ensemble import ensemble_seeds, train_ensemble  # it imports this module
        return train_ensemble(cfg, ensemble_seeds(cfg))
    with process_group(resolve_device(cfg.device)) as device:
        with exclusive_run_dir(cfg.run_dir) if rank() == 0 else contextlib.nullcontext():  # one run per folder
            return _train(cfg, device)


def _train(cfg: DictConfig, device: torch.device) -> Path:
    """`train` on `device`, as rank `rank()` of `world_size()` processes."""
    world, lead = world_size(), rank() == 0  # lead: the one process that writes and evaluates
    if int(cfg.batch_size) % world:
        raise ValueError(f"batch_size={cfg.batch_size} (the global batch) must be divisible by the {world} processes")
    limit = wall_budget(cfg.max_minutes)
    if limit is not None and world > 1:
        raise ValueError(f"max_minutes={cfg.max_minutes}: a wall-clock budget is for one process "
                         "(under torchrun the ranks would have to agree when to stop)")
    keep = cfg.keep_checkpoints
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep_checkpoints={keep}: 1 keeps checkpoint.pt alone, N > 1 the N latest besides")
    graphs = device.type == "cuda" and bool(cfg.cuda_graph)
    if cfg.compile and graphs:
        raise ValueError("compile=true and cuda_graph=true do not go together (compiled networks inside a captured "
                         "CUDA graph are untested): pass cuda_graph=false to compile, or leave compile off")
    run_dir = Path(cfg.run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    algo_cls = get_algorithm(cfg.algo.name)
    minari_dataset = load_dataset(cfg.dataset)
    env_id = cfg.env_id or dataset_env_id(minari_dataset)

    resumed = load_checkpoint(ckpt_path) if cfg.resume and ckpt_path.exists() else None
    if resumed is not None and not {"algo", "dataset_id", "step", "rng", "run_config"} <= resumed.keys():
        raise ValueError(f"{ckpt_path} is not a training checkpoint; choose another run_dir or pass resume=false")
    if resumed is not None and (resumed["algo"], resumed["dataset_id"]) != (algo_cls.name, cfg.dataset):
        raise ValueError(f"{ckpt_path} holds {resumed['algo']} on {resumed['dataset_id']}, not {algo_cls.name} on "
                         f"{cfg.dataset}; choose another run_dir or pass resume=false")
    config = OmegaConf.to_container(cfg, resolve=True)
    changed = [] if resumed is None else changed_settings(resumed["run_config"], config)
    if changed:
        raise ValueError(f"{ckpt_path} was trained with other settings ({', '.join(changed)}); choose another run_dir "
                         "or pass resume=false")
    seed_everything(cfg.seed)  # the same on every rank: the same initial weights and batches
    params = OmegaConf.to_container(cfg.algo.params, resolve=True)
    data = algo_cls.training_data(minari_dataset, make_config(algo_cls.Config, params), device=device,
                                  normalizer_state=None if resumed is None else {"obs": resumed["obs_normalizer"]})
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if resumed is None:
        agent = new_agent(algo_cls, params, minari_dataset, data, env_id=env_id, device=device)
        start = 0
    else:
        if resumed["step"] >= int(cfg.steps):  # nothing to train: no new TensorBoard event file either
            if lead:
                print(f"{ckpt_path} already holds {resumed['step']} updates (steps={cfg.steps}): nothing to train")
            return ckpt_path
        if limit is not None and resumed.get("wall_seconds", 0.0) >= limit:
            print(f"{ckpt_path} has trained {resumed['wall_seconds'] / 60:.1f} minutes (max_minutes={cfg.max_minutes}):"
                  " nothing to train")
            return ckpt_path
        acting = {key: params[key] for key in act_only_settings(algo_cls.Config) if key in params and key in resumed["config"]}
        agent = algo_cls.from_checkpoint({**resumed, "config": {**resumed["config"], **acting}}, device)
        start = resumed["step"]
        _set_rng_state(resumed["rng"], generator)
    if not lead:  # its own diffusion noise; rank 0 keeps the stream its checkpoints record
        seed_everything(int(np.random.SeedSequence([cfg.seed, rank(), start]).generate_state(1)[0]))
    clock = time.perf_counter() - (0.0 if resumed is None else resumed.get("wall_seconds", 0.0))
    eval_seconds = 0.0 if resumed is None else resumed.get("eval_seconds", 0.0)

    data.map_actions(agent.normalize_action)  # the networks see actions in [-1, 1]
    total = int(cfg.steps)
    writer = None
    if lead:  # resumed: hide what an interrupted run logged after the checkpoint's step (that step's points stay)
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start + 1 if start else 0)
        if start == 0:
            writer.add_text("config", f"```\n{OmegaConf.to_yaml(cfg, resolve=True)}\n```")
    if cfg.compile:  # the networks of the update; acting (evaluations) stays eager
        agent.compile_networks()
    step_fn = agent.train_step
    if graphs:
        step_fn = CudaGraphStep(agent.train_step, agent.optimizers().values())
    sums: dict[str, Tensor] = {}
    summed = 0  # updates in `sums` since the last log
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"{algo_cls.name} {cfg.dataset}",
               dynamic_ncols=True, mininterval=1.0, disable=not lead)

    def checkpoint() -> None:
        """Rank 0 writes the state after update `done`, and flushes TensorBoard."""
        if lead:
            agent.save(ckpt_path, step=done, rng=_rng_state(generator), run_config=config,
                       wall_seconds=time.perf_counter() - clock, eval_seconds=eval_seconds)
            if keep > 1:  # earlier states too, for evaluating the last few (the suite's `checkpoints`)
                keep_latest(ckpt_path, run_dir / "checkpoints", done, keep)
            writer.flush()

    done = start
    # A cluster's stop signal saves and requeues (one process only: under torchrun the ranks would have to agree)
    with Preemption(checkpoint if world == 1 else None) as preemption:
        for step in bar:
            preemption.safe = False  # until the update ends, the state is no checkpoint's
            batch = data.sample(int(cfg.batch_size) * agent.batches_per_step, generator)  # the global batch
            metrics = step_fn(agent.check_batch(rank_share(batch, agent.batches_per_step)))
            agent.after_step()
            done = step + 1
            out_of_time = limit is not None and time.perf_counter() - clock >= limit
            last = done == total or out_of_time  # the run ends after this update
            preemption.safe = True
            if preemption.requested:
                preemption.save_and_forward()
            for key, value in metrics.items():  # summed on the device: no sync until the next log
                sums[key] = sums[key] + value if key in sums else value.clone()
            summed += 1
            if done % cfg.log_every == 0 or last:
                global_means = mean_over_ranks(torch.stack([value / summed for value in sums.values()]))  # all ranks'
                means = finite_floats(dict(zip(sums, global_means)), f"in the {summed} updates before update {done}")
                if lead:
                    for key, value in means.items():
                        writer.add_scalar(f"train/{key}", value, done)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in list(means.items())[:3]})
                sums.clear()
                summed = 0
            if lead and cfg.eval_every and (done % cfg.eval_every == 0 or last):
                eval_start = time.perf_counter()
                result = evaluate(agent, env_id, episodes=cfg.eval_episodes, seed=cfg.seed + 100, progress=True)
                summary = log_evaluation(writer, result, done)
                if isinstance(agent, Planner):
                    writer.add_figure("eval/plan", plan_figure(agent, env_id, seed=cfg.seed + 100), done)
                bar.write(f"step {done}: {summary}")
                eval_seconds += time.perf_counter() - eval_start
            if done % cfg.checkpoint_every == 0 or last:
                checkpoint()
            if out_of_time:
                bar.write(f"max_minutes={cfg.max_minutes} reached after {done} updates")
                break
    bar.close()
    if lead:
        writer.close()
    barrier()  # the others wait for rank 0's final evaluation and checkpoint
    return ckpt_path
