"""xmp info's facts in xl info's layout (tools/xl/xl_info.c)."""

from __future__ import annotations

import os

import pytest

from xmp.toolstack import physinfo

pytestmark = pytest.mark.timeout(30)

# xl info's keys, in xl_info.c's order, less the three without a meaning here
XL_KEYS = ["host", "release", "version", "machine", "nr_cpus", "max_cpu_id", "nr_nodes", "cores_per_socket",
           "threads_per_core", "cpu_mhz", "virt_caps", "total_memory", "free_memory", "sharing_freed_memory",
           "sharing_used_memory", "outstanding_claims", "free_cpus", "xen_major", "xen_minor", "xen_extra",
           "xen_version", "xen_caps", "xen_scheduler", "xen_pagesize", "xen_changeset", "xen_commandline",
           "cc_compiler", "cc_compile_by", "cc_compile_domain", "cc_compile_date", "xend_config_format"]


def test_keys_in_xls_order_and_layout():
    facts = physinfo.host_facts({"pool_total_mib": 1024, "pool_free_mib": 960,
                                 "commandline": "xmp run t.toml"})
    assert [k for k, _ in facts] == XL_KEYS
    text = physinfo.render(facts)
    lines = text.splitlines()
    assert lines[0] == "host                   : " + os.uname().nodename  # xl's "%-23s: %s"
    assert "total_memory           : 1024" in lines and "free_memory            : 960" in lines
    assert "xen_version            : 4.19-xmp" in lines and "xen_pagesize           : 4096" in lines
    assert "virt_caps              :" in lines  # xl's ":%s%s%s": no caps, no space
    assert "xen_commandline        : xmp run t.toml" in lines
    assert lines[-1] == "xend_config_format     : 4"
    assert next(v for k, v in facts if k == "cc_compiler").startswith(("gcc (", "clang version"))
    assert int(next(v for k, v in facts if k == "nr_cpus")) == os.cpu_count()


def test_one_key_prints_its_value_alone_as_xl_info_key():
    facts = physinfo.host_facts()
    assert physinfo.render(facts, "xen_pagesize") == "4096\n"
    assert physinfo.render(facts, "xen_m") == "4\n19\n"  # xl matches the start of the line
