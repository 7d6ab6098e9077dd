"""Data-parallel training over the processes `torchrun` starts: the process group, batch shares, averages.

`torchrun --nproc_per_node=N pipelines/train.py ...` runs N copies of the training. Each trains on its
share of every global batch (`rank_share`), and `optimizer_step` averages their gradients before
clipping and stepping (`all_reduce_gradients`): the math of DistributedDataParallel, done at the one
step every agent shares instead of wrapping each agent's many modules. Outside torchrun, or with one
process, every helper here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

# Rank 0 alone evaluates while the other ranks wait at their next collective: allow long evaluations.
TIMEOUT = timedelta(hours=2)


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group for the duration (gloo on the CPU, NCCL on CUDA) and yield the device
    this process trains on: cuda:LOCAL_RANK on CUDA, else `device`. Without torchrun (WORLD_SIZE unset or 1),
    or inside a group the caller already started, yield `device` and change nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)  # CUDA-graph capture and its side streams use the current device
    # Imported after the group starts (by the first optimizer step), torch._dynamo's distributed modules keep
    # references to it, so destroy_process_group leaves its worker threads running into interpreter exit,
    # where one can abort the process (SIGABRT) while freeing its last collective's tensors.
    import torch._dynamo  # noqa: F401
    if device.type == "cuda":  # device_id (torch >= 2.3) binds NCCL to this rank's GPU at once
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank in the process group; 0 without one."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes training together; 1 without a process group."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """Wait until every process gets here (no-op without a process group)."""
    if world_size() > 1:
        dist.barrier()


def mean_over_ranks(tensor: Tensor) -> Tensor:
    """Replace `tensor` in place by its mean over the processes and return it (no host sync)."""
    if world_size() > 1:
        dist.all_reduce(tensor)  # a sum: gloo has no average
        tensor.div_(world_size())
    return tensor


def all_reduce_gradients(parameters: Iterable[Tensor]) -> None:
    """Average the gradients of `parameters` over the processes, as DistributedDataParallel does, in one
    all-reduce of their concatenation. Every rank runs the same code, so the same parameters hold gradients.
    No host sync: it can be captured in a CUDA graph (on NCCL)."""
    if world_size() == 1:
        return
    grads = [param.grad for param in parameters if param.grad is not None]
    if not grads:
        return
    flat = mean_over_ranks(torch.cat([grad.reshape(-1) for grad in grads]))
    for grad, mean in zip(grads, flat.split([grad.numel() for grad in grads])):
        grad.copy_(mean.view_as(grad))


def rank_share(batch: dict[str, Tensor], parts: int = 1) -> dict[str, Tensor]:
    """This process's share of a global batch that stacks `parts` equal batches along dim 0 (IDQL's critic
    batches, `Agent.batches_per_step`): its contiguous 1/world slice of each part, stacked the same way.
    Every rank draws the same global batch, so together they train on exactly the single-process batch."""
    world = world_size()
    if world == 1:
        return batch
    return {key: value.unflatten(0, (parts, world, -1))[:, rank()].flatten(0, 1) for key, value in batch.items()}
