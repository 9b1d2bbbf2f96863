"""The wake page's OS side: a sealable memfd.

A domain's wake page (see xmp.sharedmem.evtchn) is written by the domain
and the supervisor and read by every peer that sends to it.  A read-only
descriptor is not enough to keep a peer from writing: a process of the
same uid can reopen it read-write through /proc/self/fd.  A seal is: once
the domain has mapped the page writable it adds F_SEAL_FUTURE_WRITE (and
no resizing, no unsealing), after which nobody -- whatever descriptor they
hold or reopen -- can map it writable, write or truncate it, while the two
writable mappings made before the seal keep working.
"""

from __future__ import annotations

import fcntl
import os

from xmp.sharedmem.evtchn import EVTCHN_WAKE_SIZE

F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1; not in the fcntl module
WAKE_SEALS = F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def create_wake_page() -> int:
    """A fresh wake page: a sealable memfd (it has no name to open)."""
    fd = os.memfd_create("xmp-wake", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, EVTCHN_WAKE_SIZE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seal_wake_page(fd: int) -> None:
    """The receiver, once it has mapped its wake page writable."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, WAKE_SEALS)


def wake_page_sealed(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & WAKE_SEALS == WAKE_SEALS


def reopen_readonly(fd: int) -> int:
    """A new read-only descriptor of the same page, for a sender."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
