"""One window of the papers' seed protocol on one GPU, resumable across windows (configs/gpu_protocol.yaml).

    python pipelines/gpu_protocol.py                  # 8 seeds each of FQL and Diffusion-QL on hopper-medium
    python pipelines/gpu_protocol.py protocol=smoke   # the same path on the CPU in seconds

Per algorithm, its seeds train in one process as one seed ensemble (train.py `seeds=[...]`), for at most
`window_minutes` from where they resumed, each seed into an ordinary run folder `out/<algo>/<task>-seed<N>`
(evaluate, sweep, aggregate and load_policy read them). Then `out/curves.json` (every seed's evaluations, one
every `eval_every` updates) and `out/results.md` (updates so far, seed-updates/s in this window, the last
evaluation's score over the seeds) are rewritten, and every file over `part_mib` MiB is stored as parts
(`<file>.part000`, ... with `<file>.parts.json`: size and sha256), so each file can be brought back from a
machine with a per-file limit. The next run of the same command joins the parts (checking them) and resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cleandiff_rl.launching import override
from cleandiff_rl.training import compose_config, params_overrides, train
from cleandiff_rl.utils import atomic_write, load_checkpoint
from cleandiff_rl.utils.cli import pipeline

PART = ".part"


def pack(folder: Path, limit: int) -> list[Path]:
    """Store every file under `folder` larger than `limit` bytes as parts of at most `limit` bytes plus a
    `<name>.parts.json` record (bytes, sha256, parts), removing the file; return the files packed."""
    packed = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_size > limit):
        data, digest = path.read_bytes(), hashlib.sha256()
        digest.update(data)
        count = math.ceil(len(data) / limit)
        for i in range(count):
            atomic_write(path.with_name(f"{path.name}{PART}{i:03d}"), lambda f, i=i: f.write(data[i * limit:(i + 1) * limit]),
                         binary=True)
        record = {"bytes": len(data), "sha256": digest.hexdigest(), "parts": count}
        atomic_write(path.with_name(f"{path.name}.parts.json"), lambda f: json.dump(record, f))
        path.unlink()
        packed.append(path)
    return packed


def unpack(folder: Path) -> list[Path]:
    """Join what `pack` split under `folder` back into its files, checking size and sha256 (one clear error
    where a part is missing or differs: an incomplete copy); return the files joined."""
    joined = []
    for record_path in sorted(folder.rglob("*.parts.json")):
        record = json.loads(record_path.read_text())
        target = record_path.with_name(record_path.name[:-len(".parts.json")])
        parts = [target.with_name(f"{target.name}{PART}{i:03d}") for i in range(record["parts"])]
        missing = [str(p) for p in parts if not p.exists()]
        if missing:
            raise ValueError(f"{missing[0]} is missing: copy all {record['parts']} parts of {target} back")
        data = b"".join(p.read_bytes() for p in parts)
        if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise ValueError(f"the parts of {target} do not join into the file they were cut from (size or sha256 "
                             "differ): copy them again")
        atomic_write(target, lambda f: f.write(data), binary=True)
        for p in [*parts, record_path]:
            p.unlink()
        joined.append(target)
    return joined


def eval_curve(run_dir: Path) -> list[dict]:
    """A run's evaluations from its TensorBoard: [{step, score, return}] (score None without reference scores)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    values = {key: {e.step: e.value for e in events.Scalars(f"eval/{key}")} if f"eval/{key}" in tags else {}
              for key in ("score", "return")}
    return [{"step": step, "score": values["score"].get(step), "return": value}
            for step, value in sorted(values["return"].items())]


def progress(paths: list[Path]) -> tuple[int, float]:
    """(updates, seconds spent updating, evaluations excluded) of the first seed's checkpoint; (0, 0) if none."""
    if not paths[0].exists():
        return 0, 0.0
    state = load_checkpoint(paths[0])
    return int(state["step"]), state["wall_seconds"] - state.get("eval_seconds", 0.0)


def train_algo(cfg: DictConfig, algo: str, out: Path) -> dict:
    """This window's training of `algo`'s seeds (resumed where their checkpoints are); its row of results."""
    seeds = [int(seed) for seed in cfg.seeds]
    folders = [out / algo / f"{cfg.task}-seed{seed}" for seed in seeds]
    paths = [folder / "checkpoint.pt" for folder in folders]
    before, spent = progress(paths)
    wall = load_checkpoint(paths[0])["wall_seconds"] if paths[0].exists() else 0.0
    overrides = [f"algo={algo}", f"task={cfg.task}", override("seeds", seeds), f"steps={cfg.steps}",
                 f"eval_every={cfg.eval_every}", f"eval_episodes={cfg.eval_episodes}",
                 f"checkpoint_every={cfg.checkpoint_every}", f"device={cfg.device}", f"cuda_graph={cfg.cuda_graph}",
                 f"max_minutes={wall / 60 + float(cfg.window_minutes):.4f}",  # the budget counts from the resume
                 override("run_dir", f"{out / algo}/{cfg.task}-seed${{seed}}"), *params_overrides(cfg.params, algo)]
    if cfg.dataset is not None:
        overrides.append(override("dataset", cfg.dataset))
    print(f"{algo}: seeds {seeds}, from update {before}", flush=True)
    train(compose_config(overrides))
    after, spent_after = progress(paths)
    rate = len(seeds) * (after - before) / (spent_after - spent) if after > before else None
    curves = {str(seed): eval_curve(folder) for seed, folder in zip(seeds, folders)}
    finals = [curve[-1] for curve in curves.values() if curve]
    key = "score" if finals and all(point["score"] is not None for point in finals) else "return"
    values = [point[key] for point in finals]
    return {"algo": algo, "seeds": seeds, "updates": after, "updates_this_window": after - before,
            "seed_updates_per_second": rate, "final": key, "final_mean": float(np.mean(values)) if values else None,
            "final_se": float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None,
            "final_at": finals[0]["step"] if finals else None, "curves": curves}


def results_page(rows: list[dict], cfg: DictConfig) -> str:
    lines = [f"# Seed protocol on {cfg.task} ({cfg.device})", "",
             f"Settings: {json.dumps(OmegaConf.to_container(cfg, resolve=True))}", "",
             "| algo | seeds | updates | this window | seed-updates/s | last evaluation, mean ± s.e. over seeds |",
             "|---|--:|--:|--:|--:|---|"]
    for row in rows:
        rate = "" if row["seed_updates_per_second"] is None else f"{row['seed_updates_per_second']:.0f}"
        final = "" if row["final_mean"] is None else (
            f"{row['final']} {row['final_mean']:.1f}" + ("" if row["final_se"] is None else f" ± {row['final_se']:.1f}")
            + f" at {row['final_at']}")
        lines.append(f"| {row['algo']} | {len(row['seeds'])} | {row['updates']} | {row['updates_this_window']} | {rate} "
                     f"| {final} |")
    return "\n".join(lines) + "\n"


@pipeline("gpu_protocol")
def main(cfg: DictConfig) -> None:
    if cfg.datasets_root is not None:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(cfg.datasets_root).resolve())
    out = Path(cfg.out)
    joined = unpack(out) if out.exists() else []
    if joined:
        print(f"joined {len(joined)} file(s) from their parts", flush=True)
    start = time.perf_counter()
    rows = [train_algo(cfg, str(algo), out) for algo in cfg.algos]
    atomic_write(out / "curves.json", lambda f: json.dump(
        {"config": OmegaConf.to_container(cfg, resolve=True), "rows": rows}, f, indent=1))
    page = results_page(rows, cfg)
    atomic_write(out / "results.md", lambda f: f.write(page))
    packed = pack(out, int(float(cfg.part_mib) * 2**20))
    print(f"\n{page}\n{time.perf_counter() - start:.0f} s; {len(packed)} file(s) stored as parts; "
          f"results: {out / 'results.md'}, {out / 'curves.json'}; rerun the same command to continue")


if __name__ == "__main__":
    main()
