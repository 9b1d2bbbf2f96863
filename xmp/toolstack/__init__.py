"""The toolstack (libxl's job): domains built from their configs, devices of
every class, on_* actions, core dumps, the control socket the ``xmp``
commands talk to.  :func:`host` puts a hypervisor and its toolstack
together, as ``xmp run`` does."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from xmp.hypervisor import Supervisor
from xmp.toolstack.control import ControlServer
from xmp.toolstack.domains import Toolstack, preload_modules
from xmp.toolstack.runlock import RunLock
from xmp.topology import Topology


def run_host(topology: Topology, rundir: Path, *, echo: bool = True, stop_when_guests_gone: bool = True,
             ready: Callable[[], None] | None = None,
             started: Callable[[Supervisor], None] | None = None) -> int:
    """A supervisor and its toolstack for ``topology``, served until
    stopped; returns the exit status.  The run directory's lock is taken
    first, so a second host on it is refused before anything starts.  A
    SIGINT or SIGTERM that comes while the host is being made stops it as
    one that comes later does: cleanly, with the usual exit status."""
    lock = RunLock(rundir)
    early: list[int] = []
    old = {s: signal.signal(s, lambda signum, _frame: early.append(signum))
           for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            sup = Supervisor(rundir, topology.host.memory_mib, echo=echo, preload=preload_modules(topology),
                             guest_uids=topology.host.guest_uids)
        except BaseException:
            lock.release()
            raise
        try:
            ts = Toolstack(sup, topology, stop_when_guests_gone=stop_when_guests_gone)
            control = ControlServer(rundir / "control.sock", ts)
        except BaseException:
            sup.teardown()
            lock.release()
            raise
        if started is not None:
            started(sup)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if early:
        sup.stop(f"signal {signal.Signals(early[0]).name}")

    def shutdown() -> None:
        ts.shutdown()
        control.close()

    try:
        return sup.run(ts.boot, shutdown, ready)
    finally:
        ts.close()
        lock.release()


__all__ = ["ControlServer", "Supervisor", "Toolstack", "run_host"]
