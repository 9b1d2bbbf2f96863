"""Nothing of the host left behind a supervisor killed with SIGKILL.

A TAP goes with its descriptor, a network namespace with its last process,
a shared-memory object with its last holder; what outlives every process is
what the toolstack made in the host itself: a bridge in the host's network
namespace (the host end of a driver domain's veth goes with its peer's
namespace) and the cgroups of ``sched-credit``.  These are handed to a
reaper that outlives its supervisor: a small process in a session of its
own (no terminal signal reaches it, and PR_SET_PDEATHSIG does not pass
through fork) that watches the supervisor through a pidfd and, the moment
it is gone -- SIGKILL included -- removes what it was told of: each link
that still has the index and name it had when made (never a namesake made
later by someone else), then each cgroup once its processes (the domains,
which end by PDEATHSIG) have left it.

Protocol on the reaper's stdin, one line each: ``+<ifindex> <name>`` (a
link made: remove it when the supervisor goes), ``-<ifindex> <name>``
(removed by the supervisor itself: forget it), ``+cg <path>`` / ``-cg
<path>`` the same for a cgroup directory.  End of input while the
supervisor lives is a clean stop: whatever is still listed is removed all
the same.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_PATIENCE = 20.0   # seconds for the domains to leave a group (they end by PDEATHSIG)


class Reaper:
    """The supervisor's handle on its reaper (started with the first thing
    it is told of; one a supervisor: :data:`REAPER`)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _tell(self, line: str) -> None:
        with self._lock:
            if self._proc is None:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "xmp.reaper", str(os.getpid())],
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

    def made_cgroup(self, path: str) -> None:
        self._tell(f"+cg {path}")

    def removed_cgroup(self, path: str) -> None:
        if self._proc is not None:
            self._tell(f"-cg {path}")

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


def parse(line: str, links: dict[int, str], cgroups: set[str] | None = None) -> None:
    """Apply one protocol line to ``links`` (ifindex -> name) or ``cgroups``
    (absolute paths under /sys/fs/cgroup); bad lines are ignored."""
    text = line.strip()
    if len(text) < 2 or text[0] not in "+-":
        return
    if text[1:].startswith("cg "):
        path = text[4:]
        if cgroups is None or not path.startswith(CGROUP_ROOT + "/") or "/../" in path + "/":
            return
        if text[0] == "+":
            cgroups.add(path)
        else:
            cgroups.discard(path)
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


def remove_cgroups(cgroups: set[str], patience: float = CGROUP_PATIENCE) -> list[str]:
    """rmdir each group (children first) once its processes have gone;
    a group still busy after ``patience`` seconds is left (and said so)."""
    gone: list[str] = []
    deadline = time.monotonic() + patience
    for path in sorted(cgroups, key=len, reverse=True):
        while True:
            if _rmtree(Path(path)):
                gone.append(path)
                break
            if time.monotonic() >= deadline:
                print(f"xmp reaper: {path} is still busy; left", file=sys.stderr)
                break
            time.sleep(0.05)
    return gone


def _rmtree(sub: Path) -> bool:
    """rmdir a cgroup and its children (cgroup files cannot be unlinked;
    empty groups can be removed).  True when nothing of it is left."""
    if not sub.exists():
        return True
    ok = True
    try:
        children = [p for p in sub.iterdir() if p.is_dir()]
    except OSError:
        children = []
    for child in sorted(children, reverse=True):
        ok = _rmtree(child) and ok
    try:
        sub.rmdir()
    except FileNotFoundError:
        return ok
    except OSError:
        return False
    return ok


def main(argv: list[str]) -> int:
    supervisor = int(argv[0])
    links: dict[int, str] = {}
    cgroups: set[str] = set()
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
                parse(line.decode(errors="replace"), links, cgroups)
    # what it had written before dying is still in the pipe
    os.set_blocking(0, False)
    try:
        while chunk := os.read(0, 65536):
            buf += chunk
    except (BlockingIOError, OSError):
        pass
    for line in buf.split(b"\n"):
        parse(line.decode(errors="replace"), links, cgroups)
    if links:
        remove(links)
    remove_cgroups(cgroups)
    return 0


REAPER = Reaper()   # this supervisor's; closed by the toolstack when the host stops


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
