"""Stopping a run cleanly when asked: SIGTERM (schedulers' and spot machines' notice) and SIGINT (Ctrl-C).

The handlers only note the request; the loop stops at the next step's end, on every process at the same
step, saves a checkpoint and exits with EXIT_INTERRUPTED. Further signals while it saves are logged and
ignored, and the checkpoint is written aside and renamed, so even a kill then leaves earlier ones intact.
"""

import ctypes
import logging
import signal
import sys

logger = logging.getLogger(__name__)

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped on request, resumable; schedulers may requeue on it
SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1


class StopRequests:
    """Notes SIGTERM and SIGINT instead of dying on them; `requested` names the first one received."""

    def __init__(self):
        self.requested: str | None = None

    def install(self) -> None:
        """Handle both signals in this process, and make the launcher's death one of them (Linux).

        `accelerate launch` on one process does not pass a SIGTERM it receives on to the training
        process; with PR_SET_PDEATHSIG the kernel sends it SIGTERM when the launcher dies of it.
        """
        for number in SIGNALS:
            signal.signal(number, self._handle)
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.requested is None:
            self.requested = name
            logger.warning(f"{name} received: stopping after this step, with a checkpoint")
        else:
            logger.warning(f"{name} received while stopping: still saving the checkpoint, then exiting")


def ignore_stop_signals(*_) -> None:
    """Ignore SIGTERM and SIGINT from now on (data-loading workers, and a run that has saved and is exiting)."""
    for number in SIGNALS:
        signal.signal(number, signal.SIG_IGN)
