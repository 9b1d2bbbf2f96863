"""One supervisor per run directory: ``<rundir>/xmp.pid``, locked (flock)
for the supervisor's life and holding its pid.

A second ``xmp run`` on the directory is refused before it makes or changes
anything, naming the first's pid.  The lock goes with the process (and with
the zygote, which inherits the descriptor and follows the supervisor), so a
supervisor killed with SIGKILL leaves a stale file that the next one takes.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from xmp.errors import XmpError

PIDFILE = "xmp.pid"


class RunLock:
    def __init__(self, rundir: Path):
        self.path = Path(rundir) / PIDFILE
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise XmpError(f"a supervisor (pid {holder}) already runs in {rundir}: stop it with "
                               f"`xmp destroy Domain-0 --rundir {rundir}`, or use another --rundir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # we locked a file its last holder had just removed: take the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before the unlock, so a waiter never takes a removed file
            os.close(self.fd)
            self.fd = None
