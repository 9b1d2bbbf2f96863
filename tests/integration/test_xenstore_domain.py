"""xenstored in the xenstore domain, a process of its own (Xen's xenstore
stub domain): a busy dom0 does not delay anyone's xenstore, and its end is
the host's, with nothing left behind."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from xmphost import HOST, guest

from xmp.domid import DOMID_XENSTORE

pytestmark = pytest.mark.timeout(120)

SPIN = 60  # seconds dom0's kernel keeps dom0's loop from running


def test_a_busy_dom0_does_not_delay_a_guests_xenstore(hosts):
    topo = ("[host]\nmemory = 1024\n[dom0]\nmemory = 64\nkernel = \"kernels:dom0spin\"\n"
            f"args = {{ seconds = {SPIN} }}\n"
            "[[domain]]\nname = \"g\"\nkernel = \"kernels:xsreads\"\nmemory = 32\nargs = { n = 100 }\n")
    started = time.monotonic()
    h = hosts(topo).start(("g",))
    dom0 = psutil.Process(h.domain_pid("Domain-0"))
    cpu = sum(dom0.cpu_times()[:2])
    h.wait(lambda: sum(dom0.cpu_times()[:2]) > cpu + 1.0, 30, "dom0 to spin")
    g = h.info("g")["domid"]
    h.xmp("xenstore", "write", f"/local/domain/{g}/data/go", "1")
    # 100 reads over the ring; served by dom0's loop they would wait for the spin's end.
    result = f"/local/domain/{g}/data/xs-elapsed"
    h.wait(lambda: h.xmp("xenstore", "read", result, check=False).returncode == 0, 20,
           "the guest's 100 reads")
    elapsed = float(h.xmp("xenstore", "read", result).stdout)
    assert time.monotonic() - started < SPIN - 5  # dom0 was spinning all along
    assert elapsed < 5.0, f"100 xenstore reads took {elapsed} s while dom0 was busy"
    assert dom0.status() in (psutil.STATUS_RUNNING, psutil.STATUS_SLEEPING)  # it still runs (spinning)
    assert h.stop() == 0
    h.assert_clean()


def test_the_xenstore_domain_is_listed_and_serves_every_domain(hosts):
    h = hosts(HOST + guest("g", "idle")).start(("g",))
    xs = h.info("Xenstore")
    assert xs is not None and xs["domid"] == DOMID_XENSTORE and xs["mem_kb"] == 1024
    assert h.info("g")["domid"] == 1  # guests keep their ids
    # dom0's backends and the guest's control driver reach it over their rings
    h.wait(lambda: h.xmp("xenstore", "read", "/local/domain/1/control/feature-poweroff",
                         check=False).stdout.strip() == "1", 10, "the guest's control driver")
    assert h.info("Xenstore")["xenstore_domain"] and not h.info("g")["xenstore_domain"]
    for cmd in (("rename", "Xenstore", "other"), ("sysrq", "Xenstore", "s")):
        assert h.xmp(*cmd, check=False).returncode != 0  # it keeps its name and runs no control driver
    refused = h.xmp("shutdown", "Xenstore", check=False)
    assert refused.returncode != 0 and "Xenstore is stopped with `xmp destroy Xenstore`" in refused.stderr
    attach = h.xmp("vping-attach", "Xenstore", "devid=0", check=False)  # it serves and takes no devices
    assert attach.returncode != 0 and "Xenstore is the xenstore domain: no devices" in attach.stderr
    attach = h.xmp("vping-attach", "g", "devid=0, backend=Xenstore", check=False)
    assert attach.returncode != 0 and "Xenstore is the xenstore domain, which serves no devices" in \
        attach.stderr
    assert (h.rundir / "logs" / "Xenstore.log").read_text().count("xenstored: serving") == 1
    h.xmp("shutdown", "-a", "-w", "--timeout", "20", timeout=40)  # every guest: the xenstore domain is none
    assert h.wait_exit(20) == 0  # the last guest gone, the host stops (the xenstore domain is not one)
    h.assert_clean()


@pytest.mark.parametrize("how", ["kill9", "destroy"])
def test_when_xenstored_ends_the_host_says_so_and_stops_clean(hosts, how):
    h = hosts(HOST + guest("g", "idle") + guest("c", "counter", args={"count": 0})).start(("g", "c"))
    pids = [p.pid for p in h.descendants()]
    if how == "kill9":
        os.kill(h.domain_pid("Xenstore"), signal.SIGKILL)
    else:
        h.xmp("destroy", "Xenstore")
    assert h.wait_exit(15) == (1 if how == "kill9" else 0)
    why = "crashed" if how == "kill9" else "destroyed"
    log = (h.rundir / "logs" / "hypervisor.log").read_text()
    assert f"stopping: xenstored (dom{DOMID_XENSTORE}) {why}" in log
    assert "the host cannot go on without xenstore" in log
    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes of the host outlived it: {left}"
    h.assert_clean()
