"""A domain process from boot to exit.

The zygote forks us with the hypercall channel; the supervisor's boot
message brings our RAM, event object and wake page by descriptor.  We map
them, seal the wake page (from then on it can be handed to peers read-only),
find our special pages (start_info, or the PVH / HVM way:
xmp.domain_proc.discover), and run the kernel named in the config.  Returning powers off,
an exception crashes (traceback on the console and in our log).  A domain
whose supervisor is gone exits at once: the channel's EOF, or the
PR_SET_PDEATHSIG chain, ends it.
"""

from __future__ import annotations

import base64
import importlib
import mmap
import os
import socket
import sys
import traceback

from xmp.domain_proc.discover import discover
from xmp.domain_proc.kernel import Kernel, ShutdownDone
from xmp.domain_proc.loop import EventLoop
from xmp.domain_proc.xen import Xen
from xmp.errors import DomainGone, XmpError
from xmp.hypercall import Channel
from xmp.sharedmem.evtchn import EVTCHN_WAKE_SIZE, EventChannels
from xmp.sharedmem.shm import ShmObject
from xmp.sharedmem.wakepage import seal_wake_page


def load_entry(spec: str):
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def domain_main(sock: socket.socket) -> int:
    ch = Channel(sock)
    boot, fds = ch.recv_boot()
    ram_obj, evt_obj = ShmObject.from_fd(fds[0]), ShmObject.from_fd(fds[1])
    wake = mmap.mmap(fds[2], EVTCHN_WAKE_SIZE)
    seal_wake_page(fds[2])
    os.close(fds[2])  # the mapping is all we need of it
    extra_fds = fds[3:]
    ram = ram_obj.map()
    evt = EventChannels(evt_obj.map(), wake)
    xen = Xen(ch, boot["domid"], evt)
    start_info, pvh = discover(xen, ram, boot)
    loop = EventLoop(evt)
    restore = boot.get("restore")  # a restored domain: its kernel's suspend context
    try:
        kernel = Kernel(xen, loop, {**boot, "fds": extra_fds}, ram, start_info,
                        None if restore is None else base64.b64decode(restore))
        kernel.hvm_start_info = pvh
    except XmpError as exc:  # a context that does not fit: this domain crashes, reported
        sys.stderr.write(f"restoring: {exc}\n")
        xen.shutdown("crash")
        return 1
    print(f"dom{kernel.domid} {kernel.name}: {'restored' if restore is not None else 'running'} "
          f"{boot['kernel']}", flush=True)
    try:
        # dom0 runs its services (xmp.dom0:main), which start its own kernel beside them
        entry = load_entry(boot.get("dom0_kernel") or boot["kernel"])
        if not start_info.privileged:
            kernel.start_control()
            kernel.start_balloon()
            kernel.start_vcpus()
        entry(kernel)
        kernel.poweroff()
    except ShutdownDone:
        return 0
    except DomainGone:
        return 0
    except BaseException:
        text = traceback.format_exc()
        sys.stderr.write(text)
        sys.stderr.flush()
        try:
            kernel.console.write(text)
            kernel.xen.shutdown("crash")
        except Exception:  # the supervisor still sees a crash: we exit without a clean shutdown
            pass
        return 1
    return 0
