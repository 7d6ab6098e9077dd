"""Small shared helpers: devices, seeding, atomic file writes and checkpoints, logging."""

from cleandiff_rl.utils.checkpoint import atomic_save, atomic_write, load_checkpoint
from cleandiff_rl.utils.misc import mean_call_seconds, resolve_device, seed_everything
from cleandiff_rl.utils.cuda_graph import CudaGraphStep
from cleandiff_rl.utils.fast import fast_paths
from cleandiff_rl.utils.optim import finite_floats, optimizer_step

__all__ = ["CudaGraphStep", "atomic_save", "atomic_write", "fast_paths", "finite_floats", "load_checkpoint", "mean_call_seconds", "optimizer_step",
           "resolve_device", "seed_everything"]
