"""What one host can hold: descriptor costs and the capacity they give."""

from __future__ import annotations

import resource
import subprocess
import sys

from xmp.limits import (
    DOM0_FDS_PER_DEVICE,
    DOM0_FDS_PER_DOMAIN,
    FDS_RESERVED,
    MAX_DOMID,
    SUPERVISOR_FDS_PER_DOMAIN,
    capacity,
    describe_capacity,
    domain_cost,
)


def test_capacity_is_what_the_supervisor_and_dom0_can_keep_open():
    assert capacity(256) == (256 - FDS_RESERVED) // SUPERVISOR_FDS_PER_DOMAIN == 16
    assert capacity(FDS_RESERVED) == 0 and capacity(10) == 0
    # with descriptors to spare, dom0's event channels bind: 2 a guest of 4095, 32 kept for itself
    assert capacity(1 << 30) == 1 + (4095 - 32) // 2 == 2032 < MAX_DOMID
    assert describe_capacity(1 << 30).startswith(
        "this host can hold 2032 domains (dom0's 4096 event channels: 2 a guest and up to 4 a device; ")
    assert domain_cost(3) == DOM0_FDS_PER_DOMAIN + 3 * DOM0_FDS_PER_DEVICE
    assert describe_capacity(256).startswith("this host can hold 16 domains (RLIMIT_NOFILE 256, hard limit ")


def test_the_soft_limit_is_raised_to_the_hard_one():
    code = "from xmp.limits import raise_nofile; import resource; " \
           "print(raise_nofile(), *resource.getrlimit(resource.RLIMIT_NOFILE))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, 512)))
    assert out.stdout.split() == ["512", "512", "512"]
