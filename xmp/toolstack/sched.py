"""The credit scheduler's knobs (``xl sched-credit -d DOM -w WEIGHT -c CAP``),
enforced by the host's CPU controller.

Xen's credit1 gives each domain CPU in proportion to its weight (1..65535,
default 256) among the domains that want it, and a cap (percent of one
pCPU, 0 = none) it never goes past.  Here each domain whose knobs are set
gets a cgroup of its own under one per-supervisor subtree,
``xmp-<supervisor pid>``, holding its whole process (every vCPU thread):

    cgroup v2  cpu.weight = weight * 100 / 256 (v2's default 100 is Xen's 256),
               cpu.max = "<cap * period / 100> <period>" or "max <period>"
    cgroup v1  cpu.shares = weight * 1024 / 256, cpu.cfs_quota_us / cfs_period_us

(v2 where the unified hierarchy has the cpu controller, else a v1 ``cpu``
hierarchy; a host with neither writable -- not root, a read-only
/sys/fs/cgroup -- gets one clear error and the values are not recorded).
The subtree is removed when the supervisor stops; one left by a supervisor
that was killed (its domains died with it) is removed by the next
supervisor's start and by ``xmp cleanup``.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from xmp.errors import HypercallError
from xmp.reaper import REAPER, _rmtree

DEFAULT_WEIGHT = 256
WEIGHT_MAX = 65535
PERIOD_US = 100_000
ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
V1_CPU = Path("/sys/fs/cgroup/cpu")
_SUBTREE = re.compile(r"xmp-(\d+)$")


@dataclass
class Params:
    weight: int = DEFAULT_WEIGHT
    cap: int = 0


def _v2_root() -> Path | None:
    for root in ROOTS:
        try:
            if "cpu" in (root / "cgroup.controllers").read_text().split():
                return root
        except OSError:
            continue
    return None


def cpu_root() -> tuple[Path, int] | None:
    """(the hierarchy's root, 2 or 1) of the host's CPU controller."""
    v2 = _v2_root()
    if v2 is not None:
        return v2, 2
    if (V1_CPU / "cpu.shares").exists():
        return V1_CPU, 1
    return None


def remove_stale() -> list[str]:
    """Remove the subtrees of supervisors that are gone (their domains went
    with them, so the groups are empty)."""
    found = cpu_root()
    if found is None:
        return []
    removed = []
    for sub in found[0].glob("xmp-*"):
        m = _SUBTREE.match(sub.name)
        if m is None or _alive(int(m.group(1))):
            continue
        if _rmtree(sub):
            removed.append(str(sub))
    return removed


class CreditScheduler:
    """One supervisor's domains' weights and caps."""

    def __init__(self, pid: int | None = None):
        self.pid = os.getpid() if pid is None else pid
        self.params: dict[int, Params] = {}
        self._found = cpu_root()
        self.subtree: Path | None = None

    def get(self, domid: int) -> Params:
        return self.params.get(domid, Params())

    def set(self, domid: int, pid: int | None, weight: int | None, cap: int | None) -> Params:
        if weight is not None and not 1 <= weight <= WEIGHT_MAX:
            raise HypercallError(errno.EINVAL, "sched-credit", f"weight {weight} is outside 1..{WEIGHT_MAX}")
        if cap is not None and not 0 <= cap <= 100 * len(os.sched_getaffinity(0)):
            raise HypercallError(errno.EINVAL, "sched-credit",
                                 f"cap {cap} is outside 0..{100 * len(os.sched_getaffinity(0))} "
                                 "(percent of one CPU, 0 = none)")
        new = Params(self.get(domid).weight if weight is None else weight,
                     self.get(domid).cap if cap is None else cap)
        if pid is not None:
            self._apply(domid, pid, new)
        self.params[domid] = new
        return new

    def _apply(self, domid: int, pid: int, p: Params) -> None:
        if self._found is None:
            raise HypercallError(errno.EOPNOTSUPP, "sched-credit",
                                 "this host has no cgroup CPU controller xmp can use (cgroup v2 'cpu' "
                                 "or v1 'cpu' under /sys/fs/cgroup): weight and cap cannot be enforced")
        root, version = self._found
        try:
            if self.subtree is None:
                sub = root / f"xmp-{self.pid}"
                sub.mkdir(exist_ok=True)
                if version == 2:
                    (sub / "cgroup.subtree_control").write_text("+cpu")
                self.subtree = sub
                REAPER.made_cgroup(str(sub))   # removed even if this supervisor is killed
            group = self.subtree / f"dom{domid}"
            group.mkdir(exist_ok=True)
            if version == 2:
                (group / "cpu.weight").write_text(str(max(1, min(10000, p.weight * 100 // DEFAULT_WEIGHT))))
                quota = "max" if p.cap == 0 else str(p.cap * PERIOD_US // 100)
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                (group / "cpu.shares").write_text(str(max(2, p.weight * 1024 // DEFAULT_WEIGHT)))
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text("-1" if p.cap == 0 else str(p.cap * PERIOD_US // 100))
            (group / "cgroup.procs").write_text(str(pid))   # the whole process: every vCPU thread
        except OSError as exc:
            raise HypercallError(exc.errno or errno.EACCES, "sched-credit",
                                 f"cannot set dom{domid}'s cgroup under {root}: {exc.strerror} "
                                 "(xmp needs to create cgroups there: run as root)") from None

    def forget(self, domid: int) -> None:
        """The domain is gone: its (empty) group goes too."""
        self.params.pop(domid, None)
        if self.subtree is not None:
            try:
                (self.subtree / f"dom{domid}").rmdir()
            except OSError:
                pass

    def close(self) -> None:
        if self.subtree is not None:
            if _rmtree(self.subtree):
                REAPER.removed_cgroup(str(self.subtree))
            self.subtree = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
