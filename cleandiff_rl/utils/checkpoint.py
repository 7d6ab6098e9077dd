"""Atomic file writes: a crash mid-write never leaves a truncated checkpoint, table or result file behind;
weights-only checkpoint loading (a checkpoint file runs no code); and one process at a time per run folder."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import os
import pickle
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], *, binary: bool = False) -> Path:
    """Call `write(file)` on a new temporary file beside `path` (text, or bytes with `binary`), flush it
    to disk, then rename it over `path`; on any error the temporary file is removed and `path` untouched.

    The temporary name is unique, so concurrent writers (threads, processes) never share one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb" if binary else "x", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write `rows` as a CSV table through `atomic_write`: a header and one line per row. `columns` picks
    the columns (other keys are left out); by default the first row's keys, and every row must fit them."""
    def write(f: IO) -> None:
        table = csv.DictWriter(f, fieldnames=list(columns or rows[0]), extrasaction="ignore" if columns else "raise")
        table.writeheader()
        table.writerows(rows)

    return atomic_write(path, write)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` through `atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def keep_latest(checkpoint: str | os.PathLike, folder: str | os.PathLike, step: int, count: int) -> list[Path]:
    """Keep `checkpoint` (the state after `step` updates) as folder/<step>.pt, a hard link (`atomic_save`
    replaces the checkpoint's file rather than rewriting it, so the link keeps this state; a copy where the
    file system has no hard links), and delete all but the `count` latest there; return those, oldest first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder / f"{step:09d}.pt"  # zero-padded: names sort as update counts
    kept.unlink(missing_ok=True)
    try:
        os.link(checkpoint, kept)
    except OSError:
        atomic_write(kept, lambda f: f.write(Path(checkpoint).read_bytes()), binary=True)
    files = sorted(folder.glob("*.pt"))
    for old in files[:-count]:
        old.unlink()
    return files[-count:]


# Numpy arrays and scalars of plain dtypes: data only (an object array's items go through the same
# restricted unpickler). Checkpoints written before saves became tensors and plain types hold them (RNG states).
NUMPY_DATA = (
    (np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),  # written by numpy 1
    (np._core.multiarray.scalar, "numpy._core.multiarray.scalar"),
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    np.ndarray, np.dtype, *sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSU"}, key=str),
)


# How torch's weights-only unpickler words refusing a global (a function to call, a class to build)
REFUSED = ("GLOBAL", "unrecognized function", "Can only create new object", "Can only build")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `atomic_save`, weights only: tensors, plain Python values (dict, list,
    tuple, str, int, float, bool, None) and numpy arrays of plain dtypes, so loading a file runs no code
    from it. Checkpoints written before loading became weights-only load unchanged (their one non-plain
    part, numpy's RNG state, is such an array). A missing, unreadable or non-weights file is one short
    ValueError (FileNotFoundError) naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    unreadable = f"{path} is not a readable checkpoint (truncated or not written by cleandiff_rl)"
    try:
        with torch.serialization.safe_globals(list(NUMPY_DATA)):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if any(why in str(error) for why in REFUSED):  # a call or an object the weights-only load refused to make
            raise ValueError(f"{path} is not a readable checkpoint: it holds objects other than tensors and plain "
                             "values (refused; nothing in it was run)") from None
        raise ValueError(unreadable) from None
    except Exception:  # whatever else a file's bytes make torch.load raise: truncated zip, not a torch file, ...
        raise ValueError(unreadable) from None
    if not isinstance(state, dict):
        raise ValueError(unreadable)
    return state


@contextlib.contextmanager
def made_dirs(path: str | os.PathLike) -> Iterator[bool]:
    """Make `path` (and missing parents) for the block, yielding whether it is new; afterwards remove the
    folders this made that the block left empty, so refused input leaves no folder behind."""
    path = Path(path)
    made = [folder for folder in (path, *path.parents) if not folder.exists()]  # deepest first
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield bool(made)
    finally:
        for folder in made:
            if any(folder.iterdir()):
                break
            folder.rmdir()


@contextlib.contextmanager
def exclusive_run_dir(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold `run_dir` (made if missing) for this process while the block runs: a second process that tries
    to train or build into it gets one clear error instead of overwriting the first one's checkpoints.

    The lock is an advisory `flock` on `run_dir/.lock`, released by the OS if the process dies, and the
    file is removed when the block ends. Folders this call made are removed again if the block left them
    empty (`made_dirs`: e.g. refused input).
    """
    run_dir = Path(run_dir)
    lock_path = run_dir / ".lock"
    with made_dirs(run_dir), _locked(lock_path):
        try:
            yield run_dir
        finally:
            lock_path.unlink(missing_ok=True)  # ours: the lock goes with the file's closing


def _locked(lock_path: Path) -> IO:
    """`lock_path` opened and flock'ed by this process, or FileExistsError if another holds it. The lock
    must be on the file that is at `lock_path` once held: a holder that ends between our open and our
    flock has removed the file we opened, so lock the new one instead."""
    while True:
        lock = open(lock_path, "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise FileExistsError(f"another process is writing to {lock_path.parent}; wait for it to end or "
                                  "choose another run_dir") from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino:
                return lock
        except FileNotFoundError:
            pass
        lock.close()
