"""libxl_get_physinfo and libxl_get_version_info, for ``xmp info``: xl
info's keys, in its order and its ``key : value`` layout
(tools/xl/xl_info.c: output_nodeinfo, output_physinfo, output_xeninfo),
with xmp's own values.

What Xen reads from its physinfo and version hypercalls is read here from
the machine (``uname``, ``/sys``, psutil), from the hypervisor's version
(:data:`~xmp.hv.hypercalls.XEN_VERSION`), from the C fast path's build
(its ELF ``.comment`` names the compiler), and -- when a supervisor runs --
from its memory pool.  Keys without a meaning here are left out rather
than filled with zeros: ``hw_caps`` (CPUID words), ``platform_params``
(a virtual address), ``build_id``.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import psutil

from xmp.hv.hypercalls import XEN_VERSION
from xmp.sharedmem.shm import PAGE_SIZE

KEY_WIDTH = 23  # "host                   : " -- xl's keys are padded to 23


def line(key: str, value: Any) -> str:
    """``%-23s: %s``; virt_caps is xl's one key whose values bring their own
    leading space (``virt_caps              : hvm directio``)."""
    return f"{key:<{KEY_WIDTH}}:{value}" if key == "virt_caps" else f"{key:<{KEY_WIDTH}}: {value}"


def _sockets() -> int:
    cpus = Path("/sys/devices/system/cpu")
    ids = {p.read_text().strip() for p in cpus.glob("cpu[0-9]*/topology/physical_package_id")}
    return max(1, len(ids))


def _nodes() -> int:
    return max(1, len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))))


def _cpu_khz() -> int:
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError):
        freq = None
    if freq and freq.current:
        return int(freq.current * 1000)
    try:
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        m = None
    return int(float(m.group(1)) * 1000) if m else 0


def _fast_path() -> Path | None:
    from xmp.sharedmem import _fast  # type: ignore[attr-defined]

    path = getattr(_fast, "__file__", None)
    return Path(path) if path else None


def _compiler(so: Path | None) -> str:
    """The compiler named in the fast path's ELF .comment section."""
    if so is None:
        return "unknown"
    try:
        m = re.search(rb"GCC: \([^)]*\) [^\0]*|clang version [^\0]*", so.read_bytes())
    except OSError:
        return "unknown"
    # the section says "GCC: (Debian 12.2.0-14) 12.2.0"; gcc --version says "gcc (Debian ...) ..."
    return m.group(0).decode(errors="replace").replace("GCC: ", "gcc ", 1) if m else "unknown"


def host_facts(pool: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    """xl info's keys and xmp's values.  ``pool``: a running supervisor's
    ``info`` answer (``pool_total_mib``, ``pool_free_mib``, ``commandline``);
    without one, the memory is the machine's (what a supervisor would take
    by default)."""
    uts = os.uname()
    logical = psutil.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    sockets = _sockets()
    khz = _cpu_khz()
    mem = psutil.virtual_memory()
    total = pool["pool_total_mib"] if pool else mem.total >> 20
    free = pool["pool_free_mib"] if pool else mem.available >> 20
    so = _fast_path()
    built = time.ctime(so.stat().st_mtime) if so is not None else "unknown"
    v = XEN_VERSION
    return [
        ("host", uts.nodename), ("release", uts.release), ("version", uts.version), ("machine", uts.machine),
        ("nr_cpus", logical), ("max_cpu_id", logical - 1), ("nr_nodes", _nodes()),
        ("cores_per_socket", max(1, physical // sockets)), ("threads_per_core", max(1, logical // physical)),
        ("cpu_mhz", f"{khz // 1000}.{khz % 1000:03d}"), ("virt_caps", ""),
        ("total_memory", total), ("free_memory", free), ("sharing_freed_memory", 0),
        ("sharing_used_memory", 0), ("outstanding_claims", 0), ("free_cpus", logical),
        ("xen_major", v["major"]), ("xen_minor", v["minor"]), ("xen_extra", v["extra"]),
        ("xen_version", f"{v['major']}.{v['minor']}{v['extra']}"), ("xen_caps", v["capabilities"]),
        ("xen_scheduler", "linux"),  # a vCPU is a host process: the host kernel's scheduler runs it
        ("xen_pagesize", PAGE_SIZE), ("xen_changeset", f"xmp {_version()}"),
        ("xen_commandline", pool["commandline"] if pool else ""),
        ("cc_compiler", _compiler(so)), ("cc_compile_by", _owner(so)),
        ("cc_compile_domain", socket.getfqdn()), ("cc_compile_date", built),
        ("xend_config_format", 4),
    ]


def _owner(so: Path | None) -> str:
    if so is None:
        return "unknown"
    try:
        import pwd

        return pwd.getpwuid(so.stat().st_uid).pw_name
    except (KeyError, OSError):
        return getpass.getuser()


def _version() -> str:
    from importlib.metadata import version

    return version("xmp")


def render(facts: list[tuple[str, Any]], only: str | None = None) -> str:
    """Every line, or (as ``xl info KEY``) the values of the keys that start
    with ``only``."""
    if only is None:
        return "".join(line(k, v) + "\n" for k, v in facts)
    return "".join(f"{v}\n" for k, v in facts if k.startswith(only))
