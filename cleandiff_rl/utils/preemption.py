"""Save before a cluster stops the job: the preemption signal becomes a checkpoint, then the requeue.

SLURM jobs launched through submitit (`hydra/launcher=slurm`) get SIGUSR2 shortly before their time
limit or on preemption; submitit's handler then requeues the job and exits, losing every update since
the last checkpoint. `Preemption` saves first: between updates (`safe`, e.g. during an evaluation) at
once, during an update as soon as it ends. Then it hands the signal to the handler that was there before
(submitit's requeue, or the default action). The requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any


def preemption_signal() -> signal.Signals | None:
    """The signal submitit sends before a time limit or on preemption (SUBMITIT_PREEMPT_SIGNAL, default
    USR2); None where the platform has no such signal."""
    return getattr(signal, f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}", None)


class Preemption:
    """`with Preemption(checkpoint) as preemption:` around a training loop that sets `preemption.safe`
    False while an update runs and True once its state is whole, and calls `save_and_forward()` when
    `requested` after an update. `checkpoint=None` (or no main thread, where Python cannot install
    handlers, or an earlier handler installed from C) leaves the signal alone."""

    def __init__(self, checkpoint: Callable[[], None] | None) -> None:
        self.checkpoint = checkpoint
        self.signum = preemption_signal()
        self.safe = False
        self.requested = False
        self._previous: Any = None
        self._active = (checkpoint is not None and self.signum is not None
                        and threading.current_thread() is threading.main_thread())

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.safe:
            self.save_and_forward()

    def __enter__(self) -> Preemption:
        if self._active:
            self._previous = signal.getsignal(self.signum)
            self._active = self._previous is not None
        if self._active:
            signal.signal(self.signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._active:
            signal.signal(self.signum, self._previous)
            self._active = False

    def save_and_forward(self) -> None:
        """Write the checkpoint, then give the signal to the previous handler (submitit: requeue, then
        exit) or its default action; a handler that returns lets training go on, without this one."""
        self.requested = False
        self.checkpoint()
        previous = self._previous
        self.__exit__()
        if callable(previous):
            previous(self.signum, None)
        else:
            signal.raise_signal(self.signum)
