"""Replay one captured training step: small networks on a GPU are bound by kernel launches, not math."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

StepFn = Callable[[dict[str, Tensor]], dict[str, Tensor]]


class CudaGraphStep:
    """Call `step_fn(batch)` eagerly for `warmup` calls, then capture it once in a CUDA graph and replay it.

    A Diffusion-QL update launches about a thousand small kernels; issuing them one by one from Python
    costs far more than running them. Replaying a graph issues them all at once. What `step_fn` must
    respect (`Agent.train_step` does): fixed batch shapes, no host sync (`.item()`, `float(t)`, printing),
    no Python branch on a tensor value or on a step counter (it would be frozen at capture), and random
    numbers from the default CUDA generator. Bookkeeping such as EMA updates runs outside, after each call.

    Every call trains on its `batch`: the warm-up calls run eagerly (lazy state such as Adam's moments is
    created there, outside the graph), the capturing call captures and then replays on its own batch.
    The returned metrics are the graph's static outputs: read or copy them before the next call.
    """

    def __init__(self, step_fn: StepFn, optimizers: Iterable[torch.optim.Optimizer], warmup: int = 3):
        self.step_fn, self.warmup, self.calls = step_fn, warmup, 0
        self.optimizers = list(optimizers)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        for optimizer in self.optimizers:  # optimizer state on the GPU, updated in place by the graph
            for group in optimizer.param_groups:
                group["capturable"] = True
            for param, state in optimizer.state.items():
                if "step" in state:  # restored from a checkpoint, the step count sits on the CPU
                    state["step"] = state["step"].to(param.device, torch.float32)

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        self.calls += 1
        if self.calls <= self.warmup:
            return self._on_side_stream(lambda: self.step_fn(batch))
        if self.graph is None:
            self.inputs = {key: value.clone() for key, value in batch.items()}
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.step_fn(self.inputs)
        else:
            for key, value in batch.items():
                self.inputs[key].copy_(value)
        self.graph.replay()
        return self.outputs

    @staticmethod
    def _on_side_stream(fn: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        """Eager warm-up on a side stream, as CUDA-graph capture requires (PyTorch's CUDA graph notes)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out
