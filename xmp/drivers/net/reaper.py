"""Nothing of the network left behind a supervisor killed with SIGKILL.

A TAP goes with its descriptor, and a network namespace with its last
process, so a dead backend or guest takes its interfaces with it.  What
outlives every process is a link the toolstack made in the host's
namespace: a bridge (and the host end of a driver domain's veth, which in
fact goes with its peer's namespace).  As the shared-memory objects are
made so that the kernel frees them with their last holder, these links
are handed to a reaper that outlives its supervisor: a small process in a
session of its own (no terminal signal reaches it, and PR_SET_PDEATHSIG
does not pass through fork) that watches the supervisor through a pidfd
and, the moment it is gone -- SIGKILL included -- deletes each link it was
told of that still has the index and name it had when made (never a
namesake made later by someone else).

Protocol on the reaper's stdin, one line each: ``+<ifindex> <name>`` (made:
remove it when the supervisor goes), ``-<ifindex> <name>`` (removed by the
supervisor itself: forget it).  End of input while the supervisor lives
is a clean stop: whatever is still listed is removed all the same.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading


class Reaper:
    """The supervisor's handle on its reaper (started with the first link)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _tell(self, line: str) -> None:
        with self._lock:
            if self._proc is None:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "xmp.drivers.net.reaper", str(os.getpid())],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
                    close_fds=True)
            assert self._proc.stdin is not None
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()

    def made(self, index: int, name: str) -> None:
        self._tell(f"+{index} {name}")

    def removed(self, index: int, name: str) -> None:
        if self._proc is not None:
            self._tell(f"-{index} {name}")

    def close(self, timeout: float = 10.0) -> None:
        """A clean stop: the reaper removes what is left and exits."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def parse(line: str, links: dict[int, str]) -> None:
    """Apply one protocol line to ``links`` (ifindex -> name); bad lines are ignored."""
    text = line.strip()
    if len(text) < 2 or text[0] not in "+-":
        return
    index, _, name = text[1:].partition(" ")
    if not index.isdigit() or not name:
        return
    if text[0] == "+":
        links[int(index)] = name
    elif links.get(int(index)) == name:
        del links[int(index)]


def remove(links: dict[int, str]) -> list[str]:
    """Delete every link still there under its recorded index and name."""
    from pyroute2 import IPRoute

    gone = []
    with IPRoute() as ipr:
        for index, name in links.items():
            found = ipr.link_lookup(ifname=name)
            if found and found[0] == index:
                try:
                    ipr.link("del", index=index)
                    gone.append(name)
                except Exception:  # gone meanwhile
                    pass
    return gone


def main(argv: list[str]) -> int:
    supervisor = int(argv[0])
    links: dict[int, str] = {}
    try:
        pidfd = os.pidfd_open(supervisor)
    except ProcessLookupError:
        pidfd = -1  # dead already: read what it said, then reap
    poll = select.poll()
    poll.register(0, select.POLLIN)
    if pidfd >= 0:
        poll.register(pidfd, select.POLLIN)
    buf = b""
    done = pidfd < 0
    while not done:
        for fd, _ev in poll.poll():
            if fd == pidfd:
                done = True
                continue
            chunk = os.read(0, 65536)
            if not chunk:
                done = True
                continue
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                parse(line.decode(errors="replace"), links)
    # what it had written before dying is still in the pipe
    os.set_blocking(0, False)
    try:
        while chunk := os.read(0, 65536):
            buf += chunk
    except (BlockingIOError, OSError):
        pass
    for line in buf.split(b"\n"):
        parse(line.decode(errors="replace"), links)
    remove(links)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
