"""The toolstack (libxl's job): domains built from their configs, devices of
every class, on_* actions, core dumps, the control socket the ``xmp``
commands talk to.  :func:`host` puts a hypervisor and its toolstack
together, as ``xmp run`` does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from xmp.hypervisor import Supervisor
from xmp.toolstack.control import ControlServer
from xmp.toolstack.domains import Toolstack, preload_modules
from xmp.topology import Topology


def run_host(topology: Topology, rundir: Path, *, echo: bool = True, stop_when_guests_gone: bool = True,
             ready: Callable[[], None] | None = None,
             started: Callable[[Supervisor], None] | None = None) -> int:
    """A supervisor and its toolstack for ``topology``, served until
    stopped; returns the exit status.  The control socket is made first, so
    a second host on the same run directory is refused before anything
    starts."""
    sup = Supervisor(rundir, topology.host.memory_mib, echo=echo, preload=preload_modules(topology),
                     guest_uids=topology.host.guest_uids)
    try:
        ts = Toolstack(sup, topology, stop_when_guests_gone=stop_when_guests_gone)
        control = ControlServer(rundir / "control.sock", ts)
    except BaseException:
        sup.teardown()
        raise
    if started is not None:
        started(sup)

    def shutdown() -> None:
        ts.shutdown()
        control.close()

    try:
        return sup.run(ts.boot, shutdown, ready)
    finally:
        ts.close()


__all__ = ["ControlServer", "Supervisor", "Toolstack", "run_host"]
