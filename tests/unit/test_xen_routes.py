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


def test_a_peer_the_hypervisor_has_destroyed_is_forgotten_at_the_next_doorbell_refresh():
    """The hypervisor drops a domain's doorbells only when it destroys it and
    tells the receivers (their generation word): a receiver's refresh then
    lets go of everything of that peer -- the doorbell it rang us through,
    our doorbell into it and its wake page, its routes, its RAM -- and of
    nothing of a peer that lives."""
    import os

    from xmp.domain_proc.xen import Xen
    from xmp.sharedmem.evtchn import DOORBELL_SIZE, EVTCHN_OBJECT_SIZE, EVTCHN_WAKE_SIZE, EventChannels
    from xmp.sharedmem.shm import ShmNamespace, ShmObject

    class Hypervisor:
        senders = [5, 6]
        gone: list[int] = []

        def call_with_fds(self, op, cmd, **args):
            assert (op, cmd) == ("event_channel_op", "doorbells")
            assert args["have"] == xen.evt.doorbell_senders() and args["peers"] == sorted(xen._peers)
            return {"senders": list(self.senders), "new": [], "gone": [p for p in args["peers"]
                                                                      if p in self.gone]}, []

    def fds() -> set[str]:
        return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")}  # (the listing's own has gone)

    ns = ShmNamespace()
    own = ShmObject.create(ns, "own", EVTCHN_OBJECT_SIZE)
    EventChannels(own.map(), init_vcpus=1)
    hv = Hypervisor()
    xen = Xen(hv, 0, EventChannels(own.map()))  # type: ignore[arg-type]
    objs = []
    for peer in (5, 6):
        db, wake, into, ram = (ShmObject.create(ns, f"{what}{peer}", size) for what, size in
                               (("db", DOORBELL_SIZE), ("wake", EVTCHN_WAKE_SIZE), ("into", DOORBELL_SIZE),
                                ("ram", 4096)))
        xen._learn({"remote_dom": peer, "port": peer, "remote_port": 7, "remote_vcpu": 0},
                   [os.dup(into.fd), os.dup(wake.fd)])
        xen.evt.attach_doorbell(peer, db.map(), closer=db.close)
        xen._foreign[(peer, True)] = ShmObject.from_fd(os.dup(ram.fd))  # mapped once, now unmapped
        xen._live_granters.add(peer)
        objs += [wake, into, ram]
    for obj in objs:
        obj.close()  # the hypervisor's copies
    xen.refresh_doorbells()
    assert sorted(xen._peers) == [5, 6] and xen.evt.doorbell_senders() == [5, 6]
    hv.senders = [6]  # dom5 destroyed
    held = fds()
    xen.refresh_doorbells()
    xen.evt.sync()
    xen.evt.sync()  # a detached doorbell is closed by a later sync
    assert sorted(xen._peers) == [6] and sorted(xen._route) == [6]
    assert xen.evt.doorbell_senders() == [6]
    assert list(xen._foreign) == [(6, True)] and xen._live_granters == {6}
    gone = {path for path in held - fds()}
    assert sorted(p.split(".")[3] for p in gone) == ["db5", "into5", "ram5", "wake5"], gone
    # a peer that never rang us (no doorbell of it here) and was destroyed: the reply says gone
    hv.gone = [6]
    xen.refresh_doorbells()
    assert xen._peers == {} and xen._route == {} and xen._foreign == {}


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
