"""Small shared helpers: devices, seeding, atomic file writes and checkpoints, logging, torchrun processes,
cluster preemption."""

from cleandiff_rl.utils.checkpoint import (atomic_save, atomic_write, exclusive_run_dir, keep_latest, load_checkpoint,
                                           made_dirs, write_csv)
from cleandiff_rl.utils.misc import mean_call_seconds, resolve_device, seed_everything
from cleandiff_rl.utils.cuda_graph import CudaGraphStep
from cleandiff_rl.utils.distributed import (all_reduce_gradients, barrier, mean_over_ranks, process_group, rank,
                                            rank_share, world_size)
from cleandiff_rl.utils.fast import fast_paths
from cleandiff_rl.utils.optim import finite_floats, optimizer_step, soft_update
from cleandiff_rl.utils.preemption import Preemption
from cleandiff_rl.utils.tables import format_table

__all__ = ["CudaGraphStep", "Preemption", "all_reduce_gradients", "atomic_save", "atomic_write", "barrier", "exclusive_run_dir", "fast_paths", "finite_floats",
           "format_table", "keep_latest", "load_checkpoint", "made_dirs", "mean_call_seconds", "mean_over_ranks", "optimizer_step", "process_group", "rank",
           "rank_share", "resolve_device", "seed_everything", "soft_update", "world_size", "write_csv"]
