"""The run directory: one process holds it at a time.

``RUN_DIR/.run.lock`` is the exclusive ``flock`` of the process that runs in it (rank 0 of a distributed
run, whose other ranks write nothing there); the file names that process (pid, host, start time). The
lock goes with the process, however it ends.
"""

import contextlib
import datetime
import fcntl
import os
import socket
from pathlib import Path

from registry.errors import DataError

__all__ = ["LOCK", "locked"]

LOCK = ".run.lock"


@contextlib.contextmanager
def locked(directory):
    """Hold ``directory``'s exclusive lock (created with the directory if missing) for the block.

    Raises:
        DataError: another process holds it; the message names that process.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that is starting"
            raise DataError(f"{directory} is in use by {holder}; wait for that run to end (or stop it), or choose "
                            "another --out") from None
        f.truncate(0)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        f.write(f"pid {os.getpid()} on host {socket.gethostname()} since {started}\n")
        f.flush()
        yield  # closing the file releases the lock

