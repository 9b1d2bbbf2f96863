"""The toolstack (libxl's job): domains built from their configs, devices of
every class, on_* actions, core dumps, the control socket the ``xmp``
commands talk to.  :func:`host` puts a hypervisor and its toolstack
together, as ``xmp run`` does."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from xmp.errors import XmpError
from xmp.hypervisor import Supervisor
from xmp.migration.channel import MigrationListener, load_key
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
    key = load_key(topology.host.migrate_key) if topology.host.migrate_key else None  # before anything starts
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
            ts.migrate_key = key
            control = ControlServer(rundir / "control.sock", ts)
        except BaseException:
            sup.teardown()
            lock.release()
            raise
        listener = _listen(topology, key, ts, rundir)
        if started is not None:
            started(sup)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if early:
        sup.stop(f"signal {signal.Signals(early[0]).name}")

    def shutdown() -> None:
        ts.migrations.close()   # first: a session waiting on the loop is answered at once
        if listener is not None:
            listener.close()
        ts.shutdown()
        control.close()

    try:
        return sup.run(ts.boot, shutdown, ready)
    finally:
        ts.close()
        lock.release()


def _listen(topology: Topology, key: bytes | None, ts: Toolstack, rundir: Path) -> MigrationListener | None:
    """Listen for migrations (``[host] migrate``, xl migrate-receive's
    side) once the supervisor -- and its zygote, which must not inherit the
    socket -- exists; the address (the port, when it was 0) goes to
    RUNDIR/migrate.address.  A host that cannot listen stops, failed."""
    sup = ts.sup
    if key is None or topology.host.migrate is None:
        return None
    try:
        listener = MigrationListener(topology.host.migrate, key, ts.migrations.receive, sup.log)
    except (OSError, XmpError) as exc:
        sup.exit_code = 1
        sup.stop(f"cannot listen for migrations on {topology.host.migrate}: {exc}")
        return None
    (rundir / "migrate.address").write_text(listener.address_text + "\n")
    sup.log(f"listening for migrations on {listener.address_text}")
    return listener


__all__ = ["ControlServer", "Supervisor", "Toolstack", "run_host"]
