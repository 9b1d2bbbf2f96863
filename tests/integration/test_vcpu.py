"""vCPUs as threads: events, IPIs and timers per vCPU, hot-plug, vcpu-list
and vcpu-pin through the threads' real affinity."""

from __future__ import annotations

import json
import os
import re

import pytest
from xmphost import HOST

pytestmark = pytest.mark.timeout(90)


def vguest(name: str, kernel: str, vcpus: int, maxvcpus: int) -> str:
    return (f'[[domain]]\nname = "{name}"\nkernel = "vcpukernels:{kernel}"\nmemory = 32\n'
            f"vcpus = {vcpus}\nmaxvcpus = {maxvcpus}\n")


def threads(pid: int) -> dict[int, str]:
    """tid -> thread name of every thread of the process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
        except FileNotFoundError:
            pass
    return out


def test_events_ipis_timers_per_vcpu_and_hotplug(hosts):
    h = hosts(HOST + vguest("smp", "smp", 3, 4)).start(("smp",))
    h.wait(lambda: "smp: done" in h.console_log("smp"), 30, "the smp guest's report")
    log = h.console_log("smp")
    pid = h.domain_pid("smp")
    assert "smp: online [0, 1, 2]" in log
    # the guest's thread ids (in its own pid namespace when jailed) are the
    # threads the supervisor lists as those vCPUs
    tids = {int(n): (int(t), int(w)) for n, t, w in re.findall(r"smp: vcpu (\d) tid (\d+) says (\d)", log)}
    assert sorted(tids) == [0, 1, 2]
    assert all(w == n for n, (_t, w) in tids.items())       # smp_processor_id on each
    listed = {r["vcpu"]: r for r in json.loads(h.xmp("vcpu-list", "--json", "smp").stdout)}
    host_tids = {n: listed[n]["tid"] for n in (0, 1, 2)}
    assert host_tids[0] == pid                              # vCPU 0 is the main thread
    live = threads(pid)
    assert live[host_tids[1]] == "vcpu1" and live[host_tids[2]] == "vcpu2"
    assert [listed[n]["online"] for n in range(4)] == [True, True, True, False]
    m = re.search(r"smp: event on port (\d+) ran on tid (\d+) \(status vcpu (\d)\)", log)
    assert m and int(m.group(2)) == tids[2][0] and m.group(3) == "2"
    assert "smp: vcpu 1 asked vcpu 2: ('ipi', 2)" in log
    assert "smp: naps 1:True 2:True" in log
    assert "smp: vcpu(4) -> EINVAL" in log and "has no vCPU 4 (maxvcpus = 4: vCPUs 0..3)" in log
    assert "smp: bind_virq on vcpu 9 -> ENOENT" in log
    assert "smp: offline vcpu 3 -> ENXIO" in log

    # hot-plug: down to 2 (vCPU 2's thread ends), up to 4
    h.xmp("vcpu-set", "smp", "2")
    h.wait(lambda: "smp: now online [0, 1]" in h.console_log("smp"), 15, "vCPU 2 offline")
    h.wait(lambda: host_tids[2] not in threads(pid), 5, "vCPU 2's thread to end")
    assert h.info("smp")["vcpus"] == 2
    h.xmp("vcpu-set", "smp", "4")
    h.wait(lambda: "smp: now online [0, 1, 2, 3]" in h.console_log("smp"), 15, "vCPUs 2 and 3 online")
    assert sorted(threads(pid).values()).count("vcpu3") == 1
    assert h.info("smp")["vcpus"] == 4
    bad = h.xmp("vcpu-set", "smp", "5", check=False)
    assert bad.returncode == 1 and "smp may have 1 to 4 vCPUs (maxvcpus), not 5" in bad.stderr
    assert h.stop() == 0
    h.assert_clean()


def cpus_allowed(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("Cpus_allowed_list:"))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs")
def test_vcpu_list_columns_and_pinning_reach_the_threads(hosts):
    h = hosts(HOST + vguest("pin", "spinners", 2, 3)).start(("pin",))
    h.wait(lambda: "spinners: spinning on [0, 1]" in h.console_log("pin"), 20, "two spinning vCPUs")
    pid = h.domain_pid("pin")
    cpus = sorted(os.sched_getaffinity(0))
    h.xmp("vcpu-pin", "pin", "1", f"{cpus[1]}")
    h.xmp("vcpu-pin", "pin", "0", f"all,^{cpus[1]}", f"{cpus[0]}")
    rows = {r["vcpu"]: r for r in json.loads(h.xmp("vcpu-list", "--json", "pin").stdout)}
    assert cpus_allowed(pid, rows[1]["tid"]) == str(cpus[1])
    assert cpus_allowed(pid, pid) == ",".join(str(c) for c in cpus if c != cpus[1])
    # the spinning threads show their CPU time and run where they are pinned
    h.wait(lambda: json.loads(h.xmp("vcpu-list", "--json", "pin").stdout)[1]["cpu_time"] >= 0.3, 20,
           "vCPU 1 to burn CPU")
    out = h.xmp("vcpu-list", "pin").stdout.splitlines()
    # xl_vcpu.c: "%-32s %5s %5s %5s %5s %9s %s" header; rows "%-32s %5u %5u" +
    # "%5u %3c%c- " (offline "%5c %3c%cp ") + "%9.1f  " + hard " / " soft
    assert out[0] == "%-32s %5s %5s %5s %5s %9s %s" % (  # noqa: UP031  (xl's printf)
        "Name", "ID", "VCPU", "CPU", "State", "Time(s)", "Affinity (Hard / Soft)")
    rows = {r["vcpu"]: r for r in json.loads(h.xmp("vcpu-list", "--json", "pin").stdout)}
    v1 = next(ln for ln in out if re.match(r"pin\s+\d+\s+1", ln))
    assert re.fullmatch(rf"pin {{29}}\s+1     1{cpus[1]:5d}   [r-][b-]- +[0-9.]+  {cpus[1]} / all", v1), v1
    assert rows[1]["cpu"] == cpus[1] and rows[1]["cpu_time"] > 0
    v2 = next(ln for ln in out if re.match(r"pin\s+\d+\s+2", ln))
    assert v2 == "%-32s %5d %5d%5s %3s-p %9.1f  all / all" % ("pin", 1, 2, "-", "-", 0.0)  # noqa: UP031
    v0 = next(ln for ln in out if re.match(r"pin\s+\d+\s+0", ln))
    assert v0.endswith(f"  {','.join(str(c) for c in cpus if c != cpus[1])} / {cpus[0]}")
    bad = h.xmp("vcpu-pin", "pin", "7", "0", check=False)
    assert bad.returncode == 1 and "has no vCPU 7" in bad.stderr
    bad = h.xmp("vcpu-pin", "pin", "1", "0-99", check=False)
    assert bad.returncode == 1 and "outside this host's cpus" in bad.stderr
    assert cpus_allowed(pid, rows[1]["tid"]) == str(cpus[1])   # nothing changed
    assert h.stop() == 0
    h.assert_clean()
