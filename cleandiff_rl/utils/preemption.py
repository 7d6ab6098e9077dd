"""Save before a cluster stops the job: the preemption signal becomes a checkpoint, then the requeue.

SLURM jobs launched through submitit (`hydra/launcher=slurm`) get SIGUSR2 shortly before their time
limit or on preemption; submitit's handler then requeues the job and exits, losing every update since
the last checkpoint. `Preemption` holds the signal back while training: the loop finishes its update,
saves, and then hands the signal to the handler that was there before (submitit's requeue, or the
default action). The requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any


def preemption_signal() -> signal.Signals:
    """The signal submitit sends before a time limit or on preemption (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    return signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}"]


class Preemption:
    """`with Preemption() as preemption:` ... `if preemption.requested: save(); preemption.forward()`.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.signum = preemption_signal()
        self.requested = False
        self._previous: Any = None
        self._active = threading.current_thread() is threading.main_thread()

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __enter__(self) -> Preemption:
        if self._active:
            self._previous = signal.signal(self.signum, self._hold)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._active:
            signal.signal(self.signum, self._previous)

    def forward(self) -> None:
        """Give the held signal to the previous handler (submitit: requeue, then exit) or its default action."""
        self.__exit__()
        self._active = False
        if callable(self._previous):
            self._previous(self.signum, None)
        else:
            signal.raise_signal(self.signum)
