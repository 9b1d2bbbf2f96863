"""Ordinary limits are named errors, never a dead supervisor: many domains,
descriptors running out, a supervisor asked for more while it stops."""

from __future__ import annotations

import pytest
from xmphost import guest

pytestmark = pytest.mark.timeout(120)


def _long(i: int) -> str:
    return f"g{i:03d}".ljust(64, "x")  # names at xl's 64 characters: the widest info records


@pytest.mark.xdist_group("heavy")  # never beside another heavy test
def test_more_domains_than_one_info_message_holds(hosts):
    """dom0 asks for every domain's info each time one comes or goes; 220
    records of 64-character names are 70 KiB, more than one hypercall
    message.  The supervisor crashed on the reply ("hypercall message of
    72,000-odd bytes exceeds 65536") and took every domain with it; now dom0
    pages through sysctl getdomaininfolist and attaches every console."""
    n = 220
    h = hosts("[host]\nmemory = 2048\n[dom0]\nmemory = 64\n"
              + "".join(guest(_long(i), "idle", memory=1) for i in range(n))).start()
    last = h.rundir / "console" / f"{n}.sock"  # xenconsoled's socket for the last guest
    h.wait(last.exists, 60, "xenconsoled to attach the last guest's console")
    assert len([d for d in h.list() if d["name"].startswith("g")]) == n
    assert h.proc.poll() is None
    assert h.stop() == 0
    h.assert_clean(timeout=20)
