"""One training run per output folder: a lock held for the run's life, and a note saying whose it is.

The lock is filelock's (huggingface_hub's own dependency): an flock(2) on OUTPUT_DIR/.train.lock, which
the kernel releases when its process dies, however it dies. The note beside it (.train.lock.json: host,
PID, start time) names the holder to a second run, and, found beside a free lock, tells of a run that
died: it is taken over with a warning. flock excludes across machines on NFSv4 and on NFSv3 with lockd;
on Lustre only when mounted with `flock`, elsewhere (and on some FUSE file systems) it may hold for one
machine only: there, start one run per folder yourself.
"""

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

LOCK_FILE = ".train.lock"
NOTE_FILE = ".train.lock.json"


class OutputDirBusy(RuntimeError):
    """Another live run holds the output folder."""


class RunLock:
    """Hold OUTPUT_DIR's lock from `acquire` to `release`."""

    def __init__(self, output_dir: str | Path):
        self.folder = Path(output_dir)
        self.lock = FileLock(self.folder / LOCK_FILE, timeout=0)
        self.created_folder = False  # acquire made the folder: release removes it if the run wrote nothing

    def acquire(self) -> None:
        """Take the lock at once, or raise OutputDirBusy naming the run that holds it."""
        self.created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        note_path = self.folder / NOTE_FILE
        try:
            self.lock.acquire()
        except Timeout:
            raise OutputDirBusy(
                f"--output_dir {self.folder} is in use by another training run ({_describe(note_path)}); wait for "
                "it to end, stop it, or choose another --output_dir."
            ) from None
        if note_path.is_file():
            logger.warning(
                f"Taking over {self.folder} from a run that ended without releasing it ({_describe(note_path)})"
            )
        note = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        note_path.write_text(json.dumps(note) + "\n")

    def release(self) -> None:
        """Let go of the lock; a folder it created that the run left empty goes too (a refused run leaves nothing)."""
        if self.lock.is_locked:
            (self.folder / NOTE_FILE).unlink(missing_ok=True)
            left_empty = self.created_folder and {path.name for path in self.folder.iterdir()} <= {LOCK_FILE}
            if left_empty:
                (self.folder / LOCK_FILE).unlink(missing_ok=True)
            self.lock.release()
            if left_empty:
                with contextlib.suppress(OSError):  # something arrived meanwhile: the folder stays
                    self.folder.rmdir()


def _describe(note_path: Path) -> str:
    try:
        note = json.loads(note_path.read_text())
        return f"host {note['host']}, PID {note['pid']}, started {note['started']}"
    except (OSError, ValueError, KeyError):
        return "its host and PID unrecorded"
