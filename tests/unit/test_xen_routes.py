"""Xen.notify's learned routes against a peer being forgotten by another
thread (dom0: xenstored's socket thread releases a guest while xenconsoled
notifies it).  Run in a child process: the old bug was a segfault.  And:
what a route hands over is a doorbell and a read-only wake page, never the
peer's event object."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from xmp.domain_proc.xen import Xen
from xmp.sharedmem.evtchn import EVTCHN_OBJECT_SIZE, EventChannels
from xmp.sharedmem.shm import PAGE_SIZE, ShmNamespace, ShmObject

CHILD = textwrap.dedent("""
    import os, sys, threading, time
    from xmp.domain_proc.xen import Xen
    from xmp.sharedmem.evtchn import DOORBELL_SIZE, EVTCHN_OBJECT_SIZE, EVTCHN_WAKE_SIZE, EventChannels
    from xmp.sharedmem.shm import ShmNamespace, ShmObject

    class GoneChannel:  # the slow path: the hypervisor says the peer is gone
        def call_with_fds(self, *args, **kwargs):
            return None, []

    ns = ShmNamespace()
    own = ShmObject.create(ns, "own", EVTCHN_OBJECT_SIZE)
    doorbell = ShmObject.create(ns, "db", DOORBELL_SIZE)
    wake = ShmObject.create(ns, "wake", EVTCHN_WAKE_SIZE)
    EventChannels(own.map(), init_vcpus=1)
    xen = Xen(GoneChannel(), 0, EventChannels(own.map()))
    info = {"remote_dom": 5, "port": 3, "remote_port": 7, "remote_vcpu": 0}
    sys.setswitchinterval(1e-6)
    stop = time.monotonic() + 3

    def notifier():
        while time.monotonic() < stop:
            xen.notify(3)

    t = threading.Thread(target=notifier)
    t.start()
    learned = 0
    while time.monotonic() < stop:
        xen._learn(info, [os.dup(doorbell.fd), os.dup(wake.fd)])  # a send hypercall taught us the route
        xen.forget_domain(5)                 # the peer went: its doorbell is unmapped
        learned += 1
    t.join()
    print("ok", learned)
""")


def test_forgetting_a_peer_while_another_thread_notifies_it():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"child ended with {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.startswith("ok ")
    assert int(out.stdout.split()[1]) > 100  # the race was really run, many times


class ForgettingChannel:
    """The hypervisor's end of map_grant_ref for dom5 (RAM ``ram``): while
    the first call that says it holds dom5's RAM is in flight, another
    thread of ours forgets dom5 (xenstored releasing it as xenconsoled
    takes its last words)."""

    def __init__(self, ram):
        self.ram, self.calls, self.xen, self.raced = ram, [], None, False

    def call_with_fds(self, op, cmd, **args):
        self.calls.append((cmd, args["have_ram"]))
        if args["have_ram"] and not self.raced:
            self.raced = True
            self.xen.forget_domain(args["dom"])
        return {"handle": len(self.calls), "frames": [1]}, [] if args["have_ram"] else [os.dup(self.ram.fd)]

    def call(self, op, cmd, **args):
        self.calls.append((cmd, args["handle"]))


def test_a_granter_forgotten_while_its_page_is_being_mapped_is_asked_for_again():
    ns = ShmNamespace()
    own = ShmObject.create(ns, "own", EVTCHN_OBJECT_SIZE)
    ram = ShmObject.create(ns, "ram", 2 * PAGE_SIZE)
    try:
        ram.map(1, 1)[:5] = b"words"
        EventChannels(own.map(), init_vcpus=1).release()
        ch = ForgettingChannel(ram)
        evt = EventChannels(own.map())
        xen = ch.xen = Xen(ch, 0, evt)
        xen.unmap_grant_ref(xen.map_grant_ref(5, [2]))  # its RAM's descriptor is kept: dom5 lives
        mapping = xen.map_grant_ref(5, [2])  # KeyError here, before
        assert bytes(mapping.pages[0][:5]) == b"words"
        assert ch.calls == [("map_grant_ref", False), ("unmap_grant_ref", 1),
                            ("map_grant_ref", True), ("unmap_grant_ref", 3), ("map_grant_ref", False)]
        xen.unmap_grant_ref(mapping)
        xen.forget_domain(5)
        evt.release()
    finally:
        ram.close()
        own.close()
