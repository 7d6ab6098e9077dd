"""Small shared helpers: devices, seeding, atomic checkpoints, logging."""

from cleandiff_rl.utils.checkpoint import atomic_save, load_checkpoint
from cleandiff_rl.utils.misc import resolve_device, seed_everything
from cleandiff_rl.utils.optim import optimizer_step

__all__ = ["atomic_save", "load_checkpoint", "optimizer_step", "resolve_device", "seed_everything"]
