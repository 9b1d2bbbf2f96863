"""Guest kernels for tests/integration/test_libs.py: dom0's libraries
(xmp.libs) used by real domains.  Results go to the console as
``<name>: {json}`` lines."""

from __future__ import annotations

import errno
import hashlib
import json

from xmp.errors import GrantError, HypercallError, XmpError
from xmp.libs import evtchn, foreignmemory, gnttab, vchan

MiB = 1 << 20


def _say(kernel, name: str, **fields) -> None:
    line = f"{name}: " + json.dumps(fields)
    if kernel.domid == 0:
        kernel.xen.console_io(line)  # dom0's console is the hypervisor's
    else:
        kernel.print(line)


def _errno(call) -> str:
    try:
        call()
        return "allowed"
    except HypercallError as exc:
        return errno.errorcode[exc.errno]
    except GrantError as exc:
        return str(exc.status)


def libguest(kernel) -> None:
    """Share pages with dom0, offer it a port, answer each event with one;
    try what only dom0 may."""
    xce = evtchn.open(kernel)
    xgs = gnttab.open_gntshr(kernel)
    port = xce.bind_unbound_port(0)
    xce.unmask(port)
    rw = xgs.share_pages(0, 2)
    ro = xgs.share_pages(0, 1, writable=False)
    rw.buf[:16] = b"shared-rw-page!!"
    rw.buf[4096:4112] = b"second-rw-page!!"
    ro.buf[:16] = b"shared-ro-page!!"
    xgt = gnttab.open(kernel)
    xfm = foreignmemory.open(kernel)
    refused = {
        "gnttab_map": _errno(lambda: xgt.map_grant_ref(0, 8)),
        "foreign_map": _errno(lambda: xfm.map(0, [0])),
        "notify_not_ours": _errno(lambda: xce.notify(port + 100)),
    }
    xs = kernel.xenstore
    xs.write("data/libs", json.dumps({"port": port, "rw": rw.refs, "ro": ro.refs, "rw_pfn": rw.pfn}))
    _say(kernel, "libguest", refused=refused)
    got = 0
    while got < 3:
        p = xce.wait(10)
        if p is None:
            continue
        assert p == port
        got += 1
        xce.unmask(p)
        xce.notify(p)
    while bytes(rw.buf[16:32]) != b"dom0-wrote-this!":  # dom0 maps it and holds it till we say
        kernel.sleep(0.02)
    reply = bytes(rw.buf[16:32]).decode(errors="replace")
    ended = xgs.unshare(rw)
    xs.write("data/libs-unshared", "1")
    _say(kernel, "libguest", events=got, reply=reply, unshared_at_once=ended)
    while xgs.pending_unshares():
        kernel.sleep(0.05)
    _say(kernel, "libguest", done=True, ro_unshared=xgs.unshare(ro))
    xce.close()
    kernel.idle()


def libdom0(kernel) -> None:
    """dom0's side of libguest: bind, notify and wait (on the fd, from a
    thread), map rw and ro, write, foreign-map its pfns."""
    import selectors
    import threading

    xs = kernel.xenstore
    domid = int(kernel.args.get("guest", 1))
    for _ in range(500):
        raw = xs.read_or(f"/local/domain/{domid}/data/libs")
        if raw:
            break
        kernel.sleep(0.02)
    info = json.loads(raw)
    xce = evtchn.open(kernel)
    port = xce.bind_interdomain(domid, info["port"])
    xce.unmask(port)
    while xce.pending() is not None:  # a freshly bound port fires once
        xce.unmask(port)
    report: dict = {}
    seen: list = []

    def selector_thread() -> None:
        sel = selectors.DefaultSelector()
        sel.register(xce.fd(), selectors.EVENT_READ)
        while len(seen) < 3:
            if sel.select(10):
                p = xce.pending()
                if p is not None:
                    seen.append(p)
                    xce.unmask(p)
                    if len(seen) < 3:
                        xce.notify(p)
        sel.close()

    t = threading.Thread(target=selector_thread)
    t.start()
    xce.notify(port)
    while t.is_alive():  # the loop delivers the events the thread selects on
        kernel.sleep(0.01)
    report["events_via_fd"] = seen
    report["port"] = port
    xgt = gnttab.open(kernel)
    m = xgt.map_grant_refs(domid, info["rw"])
    report["rw_read"] = [bytes(m.buf[:16]).decode(), bytes(m.buf[4096:4112]).decode()]
    m.buf[16:32] = b"dom0-wrote-this!"
    r = xgt.map_grant_refs(domid, info["ro"], writable=False)
    report["ro_read"] = bytes(r.buf[:16]).decode()
    try:
        r.buf[16:20] = b"nope"
        report["ro_write"] = "written"
    except TypeError:
        report["ro_write"] = "TypeError"
    report["ro_as_writable"] = _errno(lambda: xgt.map_grant_refs(domid, info["ro"], writable=True))
    xfm = foreignmemory.open(kernel)
    f = xfm.map(domid, [info["rw_pfn"], info["rw_pfn"] + 1], writable=False)
    report["foreign_read"] = bytes(f.buf[:32]).decode()
    report["foreign_errs"] = f.errs
    xfm.unmap(f)
    report["foreign_beyond"] = _errno(lambda: xfm.map(domid, [1 << 30]))
    for _ in range(500):
        if xs.read_or(f"/local/domain/{domid}/data/libs-unshared"):
            break
        kernel.sleep(0.02)
    xgt.unmap(m)
    xgt.unmap(r)
    xce.close()
    _say(kernel, "libdom0", **report)


def _pattern(i: int, n: int) -> bytes:
    seed = hashlib.sha256(i.to_bytes(8, "little")).digest()
    return (seed * (n // 32 + 1))[:n]


def vchan_sender(kernel, v, total: int, chunk: int = 64 * 1024) -> str:
    h = hashlib.sha256()
    sent, i = 0, 0
    while sent < total:
        data = _pattern(i, min(chunk, total - sent))
        v.write(data)
        h.update(data)
        sent += len(data)
        i += 1
    return h.hexdigest()


def vchan_receiver(kernel, v, total: int) -> tuple[str, int]:
    h = hashlib.sha256()
    got = 0
    buf = bytearray(256 * 1024)
    while got < total:
        n = v.readinto(buf)
        if n == 0:
            break
        h.update(memoryview(buf)[:n])
        got += n
    return h.hexdigest(), got


def vchanpeer(kernel) -> None:
    """One end of a vchan: ``args.role`` server or client, ``args.peer``
    the other domain, ``args.send`` bytes this end sends then reads back
    as many (``args.die_after``: exit hard after that many bytes)."""
    import os

    role, peer = kernel.args["role"], int(kernel.args["peer"])
    total = int(kernel.args.get("bytes", 8 * MiB))
    path = kernel.args.get("path", "data/vchan/test")
    if role == "server":
        v = vchan.server_init(kernel, peer, path, MiB, MiB, blocking=True)
        _say(kernel, "vchanpeer", listening=True)
        while v.io.peer_live() == 2:
            v.wait(1)
    else:
        server = int(kernel.args["server"])
        v = vchan.client_init(kernel, server, f"/local/domain/{server}/{path}", blocking=True, timeout=20)
    _say(kernel, "vchanpeer", connected=True, mapped=isinstance(v.io, vchan._Mapped))
    die = kernel.args.get("die_after")
    if kernel.args.get("direction", "send") == "send":
        if die is not None:
            vchan_sender(kernel, v, int(die))
            _say(kernel, "vchanpeer", dying=True)
            os._exit(9)
        digest = vchan_sender(kernel, v, total)
        _say(kernel, "vchanpeer", sent=total, sha=digest)
        back, got = vchan_receiver(kernel, v, 16)
        _say(kernel, "vchanpeer", ack=got)
    else:
        digest, got = vchan_receiver(kernel, v, total)
        _say(kernel, "vchanpeer", received=got, sha=digest, open=v.is_open())
        if got == total:
            v.write(b"0123456789abcdef")
        else:
            try:
                v.write(b"x")
                _say(kernel, "vchanpeer", write_after_close="written")
            except XmpError as exc:
                _say(kernel, "vchanpeer", write_after_close=type(exc).__name__)
    kernel.sleep(0.5)
    v.close()
    _say(kernel, "vchanpeer", closed=True)
    if kernel.domid == 0:
        return
    kernel.idle()
