"""SIGTERM, the signal a scheduler sends a job it preempts, turned into a request the training loops honour:
finish the step, save a checkpoint, exit with status 143 so the job can be resumed with --resume.

    with StopRequest() as stop:
        while step < steps and not stop.requested: ...
"""
from __future__ import annotations

import signal
import threading


class StopRequest:
    """SIGTERM (a preempted job) asks a training loop to stop after the step it is in: the loop checks
    `requested`, saves a checkpoint and its command exits with status 143 (128 + SIGTERM), ready for --resume.

        with StopRequest() as stop:
            while step < steps and not stop.requested: ...
    """
    EXIT_STATUS = 143

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():        # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
