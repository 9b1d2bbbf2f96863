"""A dead guest leaves nothing behind: guests with a disk are created and
powered off, or created and killed with SIGKILL, again and again, against
dom0's blkback and against a driver domain's; after every cycle the backend
domain's descriptors, its RSS, the supervisor's shared memory, the xenstore
node count and the backend domain's quota usage are back where they were
after the first cycle (CI: 15 + 15 cycles; XMP_STRESS_FULL=1: 200 + 200)."""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass

import pytest
from xmphost import HOST, Host, fd_count

from xmp.toolstack.domains import RESTART_LIMIT
from xmp.xenstore.wire import XsType

FULL = os.environ.get("XMP_STRESS_FULL") == "1"
CYCLES = 200 if FULL else 15
DIRTY_MIB = 4          # each guest dirties this much of its RAM (a leaked one shows at once)
RSS_DRIFT = 6 << 20    # the backend's RSS may wander this much (allocator, caches)
SETTLE = 10.0          # seconds teardown may take to finish after the domain has gone

STOR = '[[domain]]\nname = "stor"\ndriver_domain = true\nmemory = 64\n'
# keeps `xmp run` up while the cycling guest is away (it stops once every guest has gone)
KEEPER = '[[domain]]\nname = "keeper"\nkernel = "xmp.guests.idle:main"\nmemory = 16\n'


@dataclass(frozen=True)
class Usage:
    fds: int                           # the backend domain's descriptors
    dom0_fds: int                      # dom0's (xenconsoled, xenstored; its blkback too, or not)
    rss: int
    shm: tuple[tuple[str, int], ...]   # (object, allocated bytes) the host's processes hold
    nodes: int                         # xenstore nodes, all of them
    quota: int                         # nodes the backend domain owns (its quota usage)

    def differs(self, base: Usage) -> list[str]:
        out = [f"{what}: {getattr(self, what)} (baseline {getattr(base, what)})"
               for what in ("fds", "dom0_fds", "nodes", "quota") if getattr(self, what) > getattr(base, what)]
        if self.rss > base.rss + RSS_DRIFT:
            out.append(f"rss: {self.rss >> 20} MiB (baseline {base.rss >> 20} MiB)")
        mine, theirs = dict(self.shm), dict(base.shm)
        if set(mine) - set(theirs) or sum(mine.values()) > sum(theirs.values()):
            out.append(f"shared memory: {sorted(set(mine) - set(theirs))} held beyond the baseline, "
                       f"{sum(mine.values())} bytes (baseline {sum(theirs.values())})")
        return out


def _count_nodes(xs, path: str = "/") -> int:
    return 1 + sum(_count_nodes(xs, f"{path.rstrip('/')}/{c}") for c in xs.directory(path))


def _usage(h: Host, xs, back_pid: int, back_domid: int, dom0_pid: int) -> Usage:
    import psutil

    text = xs.request(XsType.CONTROL, f"quota\0{back_domid}\0".encode()).decode()
    quota = int(re.search(r"nodes\s*:\s*(\d+)", text).group(1))
    # object names differ in their random tail only by the domain they belong to
    shm = tuple(sorted((name.split(".", 3)[3].rsplit(".", 2)[0], size)
                       for name, size, _ in h.shm_held().values()))
    return Usage(fd_count(back_pid), fd_count(dom0_pid), psutil.Process(back_pid).memory_info().rss, shm,
                 _count_nodes(xs), quota)


def _guest(h: Host, i: int, image, backend: str | None, poweroff: bool) -> str:
    name = f"g{i}"
    where = f"backend={backend}, " if backend else ""
    cfg = h.dir / f"{name}.toml"
    cfg.write_text(f'[[domain]]\nname = "{name}"\nkernel = "kernels:blkdirty"\nmemory = 40\n'
                   f'disk = ["vdev=xvda, access=rw, {where}size=4M, target={image}"]\n'
                   f'args = {{ mib = {DIRTY_MIB}, poweroff = {str(poweroff).lower()} }}\n')
    h.xmp("create", str(cfg))
    h.wait(lambda: "blkdirty: " in h.console_log(name), 30, f"{name} to use its disk")
    assert "blkdirty: ready" in h.console_log(name), h.console_log(name)
    return name


def _cycle(h: Host, i: int, image, backend: str | None, how: str) -> None:
    """One guest's life, until it has gone from ``xmp list``."""
    name = _guest(h, i, image, backend, poweroff=how == "poweroff")
    if how == "kill":
        os.kill(h.domain_pid(name), signal.SIGKILL)
    h.wait(lambda: h.info(name) is None, 20, f"{name} to go")


@pytest.mark.stress
@pytest.mark.xdist_group("heavy")
@pytest.mark.timeout(600 if FULL else 240)
@pytest.mark.parametrize("where", ["dom0", "driver-domain"])
def test_guest_lifecycles_leave_nothing_behind(hosts, tmp_path, where):
    """dom0 maps the guest's grants; a driver domain copies them."""
    backend = None if where == "dom0" else "stor"
    h = hosts(HOST + (STOR if backend else "") + KEEPER)
    h.start(("keeper", *(["stor"] if backend else [])))
    back_pid = h.domain_pid(backend or "Domain-0")
    back_domid = h.info(backend or "Domain-0")["domid"]
    dom0_pid = h.domain_pid("Domain-0")
    image = tmp_path / "disk.img"
    xs = h.xs()

    def usage() -> Usage:
        return _usage(h, xs, back_pid, back_domid, dom0_pid)

    try:
        plan = [("poweroff", n) for n in range(CYCLES)] + [("kill", CYCLES + n) for n in range(CYCLES)]
        base = None
        for how, i in plan:
            _cycle(h, i, image, backend, how)
            if base is None:
                # the first cycle warms caches (imports, bounce pages): the baseline is its
                # end, once the backend has settled (two equal readings in a row)
                deadline = time.monotonic() + SETTLE
                base = usage()
                while time.monotonic() < deadline:
                    time.sleep(0.2)
                    again = usage()
                    if not again.differs(base) and not base.differs(again):
                        break
                    base = again
                continue
            deadline = time.monotonic() + SETTLE
            while (diff := usage().differs(base)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not diff, f"after {how} cycle {i} ({where}): " + "; ".join(diff)
    finally:
        xs.close()
    log = (h.rundir / "logs" / "hypervisor.log").read_text()
    assert "still mapped" not in log and ": RM " not in log, log[-3000:]
    assert h.stop() == 1  # the killed guests crashed, and on_crash was not a restart
    h.assert_clean()


@pytest.mark.timeout(60)
def test_the_leak_check_names_what_is_left(hosts):
    """The checks every integration test gets (Host.stop, Host.leaks) see
    a backend directory of a domain that has gone, and say which."""
    h = hosts(HOST + KEEPER).start(("keeper",))
    assert h.stale_backends(timeout=0) == []
    running = h.leaks(timeout=0)
    assert len(running) == 2 and running[0].startswith("processes left: ") and "xmp:1:keeper" in running[0]
    assert running[1].startswith("sockets left: ") and "control.sock" in running[1]
    xs = h.xs()
    try:
        xs.write("/local/domain/0/backend/vbd/4242/51712/state", "4")  # dom4242 never was, or has gone
    finally:
        xs.close()
    with pytest.raises(AssertionError, match=r"backend directories of domains that have gone: "
                                             r"\['/local/domain/0/backend/vbd/4242'\]"):
        h.stop(timeout=20)
    assert h.proc.returncode == 0  # stopped all the same
    assert h.leaks() == []


RESTARTS = 50 if FULL else 5


def _io_goes_on(h: Host, what: str) -> None:
    verified = h.console_log("g").count("verified")
    h.wait(lambda: h.console_log("g").count("verified") > verified, 30, what)


def _held_of(h: Host, domids: list[int]) -> dict[str, list[str]]:
    """The objects of these domains that this host's processes still hold, and
    by whom: their RAM, their event objects, doorbells into or out of them
    (``db<receiver>-<sender>``).  Wake pages are memfds: the fd counts see those."""
    out = {}
    for name, _, holders in h.shm_held().values():
        m = re.search(r"\.(?:ram|evt)(\d+)\.|\.db(\d+)-(\d+)\.", name)
        if m and {int(g) for g in m.groups() if g is not None} & set(domids):
            out[name] = holders
    return out


@pytest.mark.stress
@pytest.mark.xdist_group("heavy")
@pytest.mark.timeout(600 if FULL else 180)
def test_a_restarted_driver_domain_leaves_nothing_of_its_old_self(hosts, tmp_path):
    """A driver domain killed with SIGKILL and restarted (its on_crash), again
    and again, under a guest's I/O: after each restart no process holds any
    object of a dead incarnation (its RAM, its event page) -- not the guest
    whose backend it was, not dom0's xenstored or xenconsoled -- and the
    guest's and dom0's descriptor counts are back to the baseline taken
    after the first restart (CI: 5 restarts; XMP_STRESS_FULL=1: 50)."""
    stor = STOR + 'on_crash = "restart"\n'
    h = hosts(HOST + stor + '[[domain]]\nname = "g"\nkernel = "kernels:blkloop"\nmemory = 48\n'
              f'disk = ["vdev=xvda, access=rw, backend=stor, size=4M, target={tmp_path / "g.img"}"]\n'
              'args = { interval = 0.02 }\n')
    h.start(("stor", "g"))
    pids = {"g": h.domain_pid("g"), "Domain-0": h.domain_pid("Domain-0")}
    dead: list[int] = []
    base: dict[str, int] = {}
    # kills paced under the toolstack's restart limit: this test is about what
    # a restart leaves, not about a crash loop (which the limit stops)
    pace = RESTART_LIMIT[1] / RESTART_LIMIT[0] * 1.2
    last_kill = 0.0
    for n in range(RESTARTS):
        _io_goes_on(h, "the guest's I/O")
        old = h.info("stor")["domid"]
        time.sleep(max(0.0, last_kill + pace - time.monotonic()))
        last_kill = time.monotonic()
        os.kill(h.domain_pid("stor"), signal.SIGKILL)
        dead.append(old)
        h.wait(lambda: (h.info("stor") or {"domid": old})["domid"] != old, 20, "stor to come back")  # noqa: B023
        _io_goes_on(h, "the guest's I/O after the restart")
        deadline = time.monotonic() + SETTLE
        while True:
            held = _held_of(h, dead)
            fds = {name: fd_count(pid) for name, pid in pids.items()}
            more = {name: (fds[name], base[name]) for name in fds if base and fds[name] > base[name]}
            if not (held or more) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not held, f"after restart {n}: objects of dead stor incarnations {dead} held: {held}"
        assert not more, f"after restart {n}: descriptors (now, baseline): {more}"
        base = base or fds
    # and once it is gone for good (destroyed, no restart), the guest lets go of it too
    last = h.info("stor")["domid"]
    h.xmp("destroy", "stor")
    deadline = time.monotonic() + SETTLE
    while (held := _held_of(h, [*dead, last])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not held, f"objects of the destroyed stor (dom{last}) held: {held}"
    assert h.stop() == 0
    h.assert_clean()
