"""libxenvchan (tools/include/libxenvchan.h): a bidirectional byte stream
between two domains over granted rings and one event channel.

    srv = vchan.server_init(kernel, client_domid, "data/vchan/echo")  # relative: under our domain
    cli = vchan.client_init(kernel, server_domid, "/local/domain/<srv>/data/vchan/echo")
    cli.write(b"hello"); srv.read(5) == b"hello"

The shared page is libxenvchan's ``struct vchan_interface``::

    0   ring_shared left  {u32 cons, prod}   client -> server
    8   ring_shared right {u32 cons, prod}   server -> client
    16  u16 left_order, right_order          log2 of each ring's bytes
    20  u8  cli_live, srv_live               2: not yet connected, 1: live, 0: closed
    22  u8  cli_notify, srv_notify           VCHAN_NOTIFY_* bits each side wants to hear of
    24  u32 grants[]                         the rings' pages: left's, then right's

A ring of order 10 lives in the shared page at 1024, one of order 11 at
2048; larger ones (up to 2^20 bytes) are pages of their own, granted.  The
server shares the page and the rings (gntshr), binds an unbound port for
the client and writes ``<path>/ring-ref`` and ``<path>/event-channel``
(readable by the client alone); the client reads them, binds the port and
maps the pages.  Indices move in C with acquire/release ordering
(:func:`lib.xmp_bytering_read`), the notify bytes with atomic or/and.

Only dom0 maps grants in xmp, so a client in any other domain reaches the
server's pages by grant copy instead: same layout, same protocol, a
hypercall per step.  It cannot clear the server's notify bits atomically
through a copy, so it never does: it notifies after every step (spurious
events are allowed by protocol).

The other end closing -- or dying: its port is closed under us -- is seen
as ``is_open()`` false; data it wrote before is still read, then ``read``
returns b"" and ``write`` raises :class:`VchanClosed`.
"""

from __future__ import annotations

import errno
import time

from xmp.domid import DOMID_SELF
from xmp.errors import HypercallError, LocalError, RemoteProtocolError, XenStoreError, XmpError
from xmp.libs import evtchn as _evtchn
from xmp.libs import gnttab as _gnttab
from xmp.sharedmem._ffi import ffi, lib
from xmp.sharedmem.shm import PAGE_SIZE

VCHAN_NOTIFY_WRITE, VCHAN_NOTIFY_READ = 1, 2
LEFT, RIGHT = 0, 8                  # ring_shared {cons, prod}
LEFT_ORDER, RIGHT_ORDER = 16, 18
CLI_LIVE, SRV_LIVE, CLI_NOTIFY, SRV_NOTIFY = 20, 21, 22, 23
GRANTS = 24
SMALL_RING_SHIFT, LARGE_RING_SHIFT, MAX_RING_SHIFT = 10, 11, 20
SMALL_RING_OFFSET, LARGE_RING_OFFSET = 1024, 2048
PAGE_SHIFT = 12
CLOSED_CHECK = 0.5   # seconds a blocked call waits before it looks whether the peer is gone


class VchanClosed(XmpError):
    """The other end has closed the vchan (or is gone)."""


def _min_order(size: int) -> int:
    order = PAGE_SHIFT
    while size > 1 << order:
        order += 1
    return order


def _orders(left_min: int, right_min: int) -> tuple[int, int]:
    """libxenvchan_server_init's choice: in-page rings when they fit."""
    if left_min > 1 << MAX_RING_SHIFT or right_min > 1 << MAX_RING_SHIFT:
        raise LocalError(f"a vchan ring holds at most {1 << MAX_RING_SHIFT} bytes")
    left, right = _min_order(left_min), _min_order(right_min)
    if left_min <= 1 << SMALL_RING_SHIFT and right_min <= 1 << LARGE_RING_SHIFT:
        return SMALL_RING_SHIFT, LARGE_RING_SHIFT
    if left_min <= 1 << LARGE_RING_SHIFT and right_min <= 1 << SMALL_RING_SHIFT:
        return LARGE_RING_SHIFT, SMALL_RING_SHIFT
    if left_min <= 1 << LARGE_RING_SHIFT:
        return LARGE_RING_SHIFT, right
    if right_min <= 1 << LARGE_RING_SHIFT:
        return left, LARGE_RING_SHIFT
    return left, right


def _pages(order: int) -> int:
    return 1 << (order - PAGE_SHIFT) if order >= PAGE_SHIFT else 0


class _Mapped:
    """The shared page and rings as memory of ours (the server's own pages,
    or dom0's mapping of them): the ring moves in C."""

    def __init__(self, ctrl: memoryview, read_buf, read_order: int, read_idx: int,
                 write_buf, write_order: int, write_idx: int, is_server: bool):
        self._keep = (ctrl, read_buf, write_buf)
        self.c = ffi.from_buffer("uint8_t[]", ctrl, require_writable=True)
        self.rd = ffi.from_buffer("uint8_t[]", read_buf)
        self.wr = ffi.from_buffer("uint8_t[]", write_buf, require_writable=True)
        self.rsize, self.wsize = 1 << read_order, 1 << write_order
        self.r_cons = ffi.cast("uint32_t *", self.c + read_idx)
        self.r_prod = ffi.cast("uint32_t *", self.c + read_idx + 4)
        self.w_cons = ffi.cast("uint32_t *", self.c + write_idx)
        self.w_prod = ffi.cast("uint32_t *", self.c + write_idx + 4)
        self.mine = self.c + (SRV_NOTIFY if is_server else CLI_NOTIFY)
        self.theirs = self.c + (CLI_NOTIFY if is_server else SRV_NOTIFY)
        self.their_live = self.c + (CLI_LIVE if is_server else SRV_LIVE)
        self.my_live = self.c + (SRV_LIVE if is_server else CLI_LIVE)

    def _in_flight(self, cons_p, prod_p, size: int) -> int:
        n = (lib.xmp_load32(prod_p) - lib.xmp_load32(cons_p)) & 0xFFFFFFFF
        if n > size:
            raise RemoteProtocolError(f"vchan indices claim {n} bytes in a ring of {size}")
        return n

    def data_ready(self) -> int:
        return self._in_flight(self.r_cons, self.r_prod, self.rsize)

    def buffer_space(self) -> int:
        return self.wsize - self._in_flight(self.w_cons, self.w_prod, self.wsize)

    def read_into(self, dst, n: int) -> int:
        got = lib.xmp_bytering_read(self.rd, self.rsize, self.r_cons, self.r_prod,
                                    ffi.from_buffer("uint8_t[]", dst, require_writable=True), n)
        if got < 0:
            raise RemoteProtocolError("vchan read ring indices out of range")
        return got

    def write_from(self, src, n: int) -> int:
        put = lib.xmp_bytering_write(self.wr, self.wsize, self.w_cons, self.w_prod,
                                     ffi.from_buffer("uint8_t[]", src), n)
        if put < 0:
            raise RemoteProtocolError("vchan write ring indices out of range")
        return put

    def request_notify(self, bit: int) -> None:
        lib.xmp_vchan_fetch_or8(self.mine, bit)

    def wants(self, bit: int) -> bool:
        """Take ``bit`` from the peer's wishes: True if it asked for it."""
        return bool(lib.xmp_vchan_fetch_and8(self.theirs, 0xFF ^ bit) & bit)

    def peer_live(self) -> int:
        return lib.xmp_vchan_load8(self.their_live)

    def set_live(self, value: int) -> None:
        lib.xmp_vchan_store8(self.my_live, value)

    def release(self) -> None:
        for cdata in (self.c, self.rd, self.wr):
            ffi.release(cdata)


class _Copied:
    """A client that may not map: the server's page and rings reached by
    grant copy through a bounce area of our own pages."""

    def __init__(self, kernel, gt: _gnttab.XenGnttab, domid: int, ring_ref: int,
                 read_refs: list[int], read_order: int, write_refs: list[int], write_order: int):
        self.k, self.gt, self.dom, self.ring_ref = kernel, gt, domid, ring_ref
        self.rsize, self.wsize = 1 << read_order, 1 << write_order
        self.rrefs, self.wrefs = read_refs, write_refs
        self.r_base = LARGE_RING_OFFSET if read_order == LARGE_RING_SHIFT else SMALL_RING_OFFSET
        self.w_base = LARGE_RING_OFFSET if write_order == LARGE_RING_SHIFT else SMALL_RING_OFFSET
        self.npages = max(self.rsize, self.wsize, PAGE_SIZE) // PAGE_SIZE + 1
        self.pfn = kernel.alloc_pages(self.npages)
        self.bounce = memoryview(kernel.memory)[self.pfn * PAGE_SIZE:(self.pfn + self.npages) * PAGE_SIZE]
        self.wanted = 0   # what we have asked the server to tell us of

    def _copy(self, segs: list[dict]) -> None:
        for i in range(0, len(segs), 512):
            status = self.gt.grant_copy(segs[i:i + 512])
            if any(status):
                raise VchanClosed(f"the vchan server dom{self.dom} is gone (grant copy: {status[0]})")

    def _theirs(self, ref: int, offset: int) -> dict:
        return {"domid": self.dom, "ref": ref, "offset": offset}

    def _mine(self, offset: int) -> dict:
        return {"domid": DOMID_SELF, "frame": self.pfn + offset // PAGE_SIZE, "offset": offset % PAGE_SIZE}

    def _ctrl(self) -> bytes:
        self._copy([{"source": self._theirs(self.ring_ref, 0), "dest": self._mine(0), "len": 24}])
        return bytes(self.bounce[:24])

    def _idx(self, ctrl: bytes, off: int) -> tuple[int, int]:
        return int.from_bytes(ctrl[off:off + 4], "little"), int.from_bytes(ctrl[off + 4:off + 8], "little")

    def _in_flight(self, cons: int, prod: int, size: int) -> int:
        n = (prod - cons) & 0xFFFFFFFF
        if n > size:
            raise RemoteProtocolError(f"vchan indices claim {n} bytes in a ring of {size}")
        return n

    def data_ready(self) -> int:
        return self._in_flight(*self._idx(self._ctrl(), RIGHT), self.rsize)

    def buffer_space(self) -> int:
        return self.wsize - self._in_flight(*self._idx(self._ctrl(), LEFT), self.wsize)

    def _segments(self, refs: list[int], base: int, size: int, pos: int, n: int, to_ring: bool) -> list[dict]:
        """Copy segments between ring bytes [pos, pos+n) and the bounce
        area from offset ``pos % PAGE_SIZE`` on, none crossing a page."""
        segs = []
        done = 0
        while done < n:
            off = (pos + done) & (size - 1)
            if refs:
                ref, in_page = refs[off // PAGE_SIZE], off % PAGE_SIZE
            else:
                ref, in_page = self.ring_ref, base + off
            b = (pos % PAGE_SIZE) + done
            chunk = min(n - done, PAGE_SIZE - in_page, PAGE_SIZE - b % PAGE_SIZE, size - off)
            ring, mine = self._theirs(ref, in_page), self._mine(PAGE_SIZE + b)
            segs.append({"source": mine, "dest": ring, "len": chunk} if to_ring
                        else {"source": ring, "dest": mine, "len": chunk})
            done += chunk
        return segs

    def read_into(self, dst, n: int) -> int:
        cons, prod = self._idx(self._ctrl(), RIGHT)
        n = min(n, self._in_flight(cons, prod, self.rsize))
        if n:
            self._copy(self._segments(self.rrefs, self.r_base, self.rsize, cons, n, False))
            b = PAGE_SIZE + cons % PAGE_SIZE
            memoryview(dst)[:n] = self.bounce[b:b + n]
            self._put32(RIGHT, cons + n)
        return n

    def write_from(self, src, n: int) -> int:
        cons, prod = self._idx(self._ctrl(), LEFT)
        n = min(n, self.wsize - self._in_flight(cons, prod, self.wsize))
        if n:
            b = PAGE_SIZE + prod % PAGE_SIZE
            self.bounce[b:b + n] = memoryview(src)[:n]
            # data first, then the index: one batch, copied in order
            segs = self._segments(self.wrefs, self.w_base, self.wsize, prod, n, True)
            self.bounce[4:8] = ((prod + n) & 0xFFFFFFFF).to_bytes(4, "little")
            segs.append({"source": self._mine(4), "dest": self._theirs(self.ring_ref, LEFT + 4), "len": 4})
            self._copy(segs)
        return n

    def _put32(self, off: int, value: int) -> None:
        self.bounce[0:4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
        self._copy([{"source": self._mine(0), "dest": self._theirs(self.ring_ref, off), "len": 4}])

    def _put8(self, off: int, value: int) -> None:
        self.bounce[0] = value
        self._copy([{"source": self._mine(0), "dest": self._theirs(self.ring_ref, off), "len": 1}])

    def request_notify(self, bit: int) -> None:
        self.wanted |= bit
        self._put8(CLI_NOTIFY, self.wanted)

    def wants(self, bit: int) -> bool:
        return True  # see the module's docstring: always tell

    def peer_live(self) -> int:
        return self._ctrl()[SRV_LIVE]

    def set_live(self, value: int) -> None:
        self._put8(CLI_LIVE, value)

    def release(self) -> None:
        self.bounce.release()
        self.k.free_pages(self.pfn, self.npages)


class Vchan:
    """One end of a vchan (struct libxenvchan).  ``blocking`` as
    libxenvchan's field: blocking calls wait for data or room, the others
    return what they could do at once."""

    def __init__(self, kernel, xce: _evtchn.XenEvtchn, port: int, io: _Mapped | _Copied, is_server: bool,
                 blocking: bool):
        self.k, self.xce, self.port, self.io = kernel, xce, port, io
        self.is_server = is_server
        self.blocking = blocking
        self._closed = False
        self._peer_gone = False
        self._cleanup: list = []

    # -- state -----------------------------------------------------------------

    def is_open(self) -> bool:
        """libxenvchan_is_open: the other end has not closed (a server
        waiting for its client counts as open)."""
        if self._closed or self._peer_gone:
            return False
        try:
            return self.io.peer_live() != 0
        except VchanClosed:
            self._peer_gone = True
            return False

    def data_ready(self) -> int:
        """libxenvchan_data_ready: bytes that can be read now."""
        self._check_local()
        try:
            return self.io.data_ready()
        except VchanClosed:
            self._peer_gone = True
            return 0

    def buffer_space(self) -> int:
        """libxenvchan_buffer_space: bytes that can be written now."""
        self._check_local()
        try:
            return self.io.buffer_space()
        except VchanClosed:
            self._peer_gone = True
            return 0

    def fd(self) -> int:
        """libxenvchan_fd_for_select: readable when the other end moved;
        then call :meth:`wait` (which takes the event) before reading."""
        return self.xce.fd()

    def wait(self, timeout: float | None = None) -> bool:
        """libxenvchan_wait: block until the other end does something (or
        ``timeout``); True if it did.  Finds out, while waiting, whether the
        other end is gone."""
        self._check_local()
        port = self.xce.pending()
        if port is None:
            port = self.xce.wait(CLOSED_CHECK if timeout is None else min(timeout, CLOSED_CHECK))
        if port is not None:
            self.xce.unmask(port)
            return True
        self._check_peer()
        return False

    def _check_peer(self) -> None:
        """The port's other end closed (the peer's domain died, say): gone."""
        if self._peer_gone:
            return
        try:
            state = self.k.xen.status(self.port)["state"]
        except XmpError:
            state = "closed"
        if state != "interdomain" and not (self.is_server and self.io.peer_live() == 2):
            self._peer_gone = True

    def _notify(self, bit: int) -> None:
        if self.io.wants(bit):
            try:
                self.xce.notify(self.port)
            except XmpError:
                self._peer_gone = True

    # -- reading ---------------------------------------------------------------

    def readinto(self, buf) -> int:
        """libxenvchan_read into ``buf``: what is there, up to its size (0
        at end of stream; blocking: waits for at least one byte)."""
        view = memoryview(buf).cast("B")
        while True:
            n = self._read_some(view, len(view))
            if n or not self.blocking or \
                    not self._wait_for(VCHAN_NOTIFY_WRITE, lambda: self.io.data_ready() > 0):
                return n

    def read(self, size: int) -> bytes:
        """libxenvchan_read: up to ``size`` bytes; b"" once the other end
        has closed and all it wrote is read (or, non-blocking, when
        nothing is there)."""
        buf = bytearray(size)
        n = self.readinto(buf)
        return bytes(buf[:n])

    def recv(self, size: int) -> bytes:
        """libxenvchan_recv: exactly ``size`` bytes, or (non-blocking, or
        the other end closed first) b"" and nothing taken."""
        if size > self.io.rsize:
            raise LocalError(f"recv of {size} bytes from a ring of {self.io.rsize}")
        while True:
            if self._ready() >= size:
                buf = bytearray(size)
                self._read_some(memoryview(buf), size)
                return bytes(buf)
            if not self.blocking or \
                    not self._wait_for(VCHAN_NOTIFY_WRITE, lambda: self.io.data_ready() >= size):
                return b""

    def _ready(self) -> int:
        try:
            return self.io.data_ready()
        except VchanClosed:
            self._peer_gone = True
            return 0

    def _read_some(self, view: memoryview, n: int) -> int:
        self._check_local()
        try:
            got = self.io.read_into(view, n)
        except VchanClosed:
            self._peer_gone = True
            return 0
        if got:
            self._notify(VCHAN_NOTIFY_READ)
        return got

    # -- writing ---------------------------------------------------------------

    def write(self, data) -> int:
        """libxenvchan_write: blocking, all of ``data``; non-blocking, what
        fits now.  VchanClosed once the other end has closed."""
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            if not self.is_open():
                raise VchanClosed("the other end of the vchan has closed")
            n = self._write_some(view[pos:], len(view) - pos)
            pos += n
            if n == 0:
                if not self.blocking:
                    break
                self._wait_for(VCHAN_NOTIFY_READ, lambda: self.io.buffer_space() > 0)
        return pos

    def send(self, data) -> int:
        """libxenvchan_send: all of ``data`` or (non-blocking) nothing."""
        view = memoryview(data).cast("B")
        if len(view) > self.io.wsize:
            raise LocalError(f"send of {len(view)} bytes into a ring of {self.io.wsize}")
        while True:
            if not self.is_open():
                raise VchanClosed("the other end of the vchan has closed")
            if self.io.buffer_space() >= len(view):
                return self._write_some(view, len(view))
            if not self.blocking:
                return 0
            self._wait_for(VCHAN_NOTIFY_READ, lambda: self.io.buffer_space() >= len(view))

    def _write_some(self, view: memoryview, n: int) -> int:
        self._check_local()
        try:
            put = self.io.write_from(view, n)
        except VchanClosed:
            self._peer_gone = True
            raise
        if put:
            self._notify(VCHAN_NOTIFY_WRITE)
        return put

    def _wait_for(self, bit: int, ready) -> bool:
        """Ask to be told of ``bit``, re-check (the request is ordered
        before it: no lost wake-up), then wait.  False if the other end is
        gone and nothing more will come."""
        try:
            self.io.request_notify(bit)
            if ready():
                return True
        except VchanClosed:
            self._peer_gone = True
        if not self.is_open():
            return bit == VCHAN_NOTIFY_WRITE and self._ready() > 0
        moved = self.wait()
        return moved or self.is_open()

    def _check_local(self) -> None:
        if self._closed:
            raise LocalError("the vchan is closed")

    # -- closing ---------------------------------------------------------------

    def close(self) -> None:
        """libxenvchan_close: tell the other end, let go of the pages, the
        port and (server) the xenstore entries."""
        if self._closed:
            return
        try:
            if not self._peer_gone:
                self.io.set_live(0)
                self.xce.notify(self.port)
        except XmpError:
            pass
        self._closed = True
        self.io.release()
        for undo in reversed(self._cleanup):
            try:
                undo()
            except XmpError:
                pass
        self.xce.close()

    def __enter__(self) -> Vchan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _abs(kernel, path: str) -> str:
    return path if path.startswith("/") else f"/local/domain/{kernel.domid}/{path}"


def server_init(kernel, domid: int, xs_path: str, left_min: int = 0, right_min: int = 0,
                blocking: bool = False) -> Vchan:
    """libxenvchan_server_init: a vchan ``domid`` can connect to, announced
    at ``xs_path``; rings of at least ``left_min`` (client to server) and
    ``right_min`` (server to client) bytes."""
    read_order, write_order = _orders(left_min, right_min)
    xce = _evtchn.open(kernel)
    gs = _gnttab.open_gntshr(kernel)
    path = _abs(kernel, xs_path)
    try:
        port = xce.bind_unbound_port(domid)
        xce.unmask(port)
        ctrl = gs.share_pages(domid, 1)
        refs: list[int] = []
        bufs = []
        for order in (read_order, write_order):
            if order in (SMALL_RING_SHIFT, LARGE_RING_SHIFT):
                off = SMALL_RING_OFFSET if order == SMALL_RING_SHIFT else LARGE_RING_OFFSET
                bufs.append(ctrl.buf[off:off + (1 << order)])
            else:
                share = gs.share_pages(domid, _pages(order))
                refs += share.refs
                bufs.append(share.buf)
        c = ctrl.buf
        c[LEFT_ORDER:LEFT_ORDER + 2] = read_order.to_bytes(2, "little")
        c[RIGHT_ORDER:RIGHT_ORDER + 2] = write_order.to_bytes(2, "little")
        for i, ref in enumerate(refs):
            c[GRANTS + 4 * i:GRANTS + 4 * i + 4] = ref.to_bytes(4, "little")
        c[CLI_LIVE], c[SRV_LIVE], c[CLI_NOTIFY] = 2, 1, VCHAN_NOTIFY_WRITE
        io = _Mapped(c, bufs[0], read_order, LEFT, bufs[1], write_order, RIGHT, True)
        xs = kernel.xenstore
        perms = [f"n{kernel.domid}", f"r{domid}"]   # owner us, nobody else but the client, read-only
        for attempt in xs.transactions():
            with attempt as tx:
                xs.write(f"{path}/ring-ref", str(ctrl.refs[0]), tx)
                xs.set_perms(f"{path}/ring-ref", perms, tx)
                xs.write(f"{path}/event-channel", str(port), tx)
                xs.set_perms(f"{path}/event-channel", perms, tx)
    except BaseException:
        gs.close()
        xce.close()
        raise
    v = Vchan(kernel, xce, port, io, True, blocking)
    v._cleanup = [gs.close, lambda: _rm(kernel, path)]
    return v


def _rm(kernel, path: str) -> None:
    try:
        kernel.xenstore.rm(path)
    except XenStoreError:
        pass


def client_init(kernel, domid: int, xs_path: str, blocking: bool = False, timeout: float = 0.0) -> Vchan:
    """libxenvchan_client_init: connect to the vchan ``domid`` announced at
    ``xs_path`` (waiting up to ``timeout`` for the announcement)."""
    xs = kernel.xenstore
    path = _abs(kernel, xs_path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            ref = xs.read_or(f"{path}/ring-ref")
            evt = xs.read_or(f"{path}/event-channel")
            refused = None
        except XenStoreError as exc:
            # Not there yet under a tree we may not read: xenstored answers EACCES,
            # not ENOENT, so as not to say what exists there.
            if exc.errno != "EACCES":
                raise
            ref = evt = None
            refused = exc
        if ref is not None and evt is not None:
            break
        if time.monotonic() >= deadline:
            if refused is not None:
                raise refused
            raise XenStoreError("ENOENT", f"{path}/ring-ref", "vchan client_init")
        kernel.sleep(0.02)
    try:
        ring_ref, remote_port = int(ref), int(evt)
    except ValueError:
        raise RemoteProtocolError(f"vchan entries at {path} are not numbers") from None
    xce = _evtchn.open(kernel)
    gt = _gnttab.open(kernel)
    try:
        port = xce.bind_interdomain(domid, remote_port)
        xce.unmask(port)
        io = _client_io(kernel, gt, domid, ring_ref)
        io.set_live(1)
        io.request_notify(VCHAN_NOTIFY_WRITE)
    except BaseException:
        gt.close()
        xce.close()
        raise
    v = Vchan(kernel, xce, port, io, False, blocking)
    v._cleanup = [gt.close]
    xce.notify(port)  # wake the server
    return v


def _client_io(kernel, gt: _gnttab.XenGnttab, domid: int, ring_ref: int) -> _Mapped | _Copied:
    try:
        ctrl = gt.map_grant_ref(domid, ring_ref)
    except HypercallError as exc:
        if exc.errno != errno.EPERM:
            raise
        ctrl = None   # we may not map: grant copy
    if ctrl is not None:
        page = ctrl.buf if ctrl.buf is not None else ctrl.pages[0]
        header = bytes(page[:GRANTS + 4 * 512])
    else:
        probe = _Copied(kernel, gt, domid, ring_ref, [], SMALL_RING_SHIFT, [], SMALL_RING_SHIFT)
        probe._copy([{"source": probe._theirs(ring_ref, 0), "dest": probe._mine(PAGE_SIZE),
                      "len": PAGE_SIZE}])
        header = bytes(probe.bounce[PAGE_SIZE:2 * PAGE_SIZE])
        probe.release()
    write_order = int.from_bytes(header[LEFT_ORDER:LEFT_ORDER + 2], "little")
    read_order = int.from_bytes(header[RIGHT_ORDER:RIGHT_ORDER + 2], "little")
    for order in (read_order, write_order):
        if not SMALL_RING_SHIFT <= order <= MAX_RING_SHIFT:
            raise RemoteProtocolError(f"vchan ring order {order} outside "
                                      f"{SMALL_RING_SHIFT}..{MAX_RING_SHIFT}")
    if read_order == write_order and read_order < PAGE_SHIFT:
        raise RemoteProtocolError("both vchan rings in the shared page at one offset")
    nl, nr = _pages(write_order), _pages(read_order)
    grants = [int.from_bytes(header[GRANTS + 4 * i:GRANTS + 4 * i + 4], "little") for i in range(nl + nr)]
    wrefs, rrefs = grants[:nl], grants[nl:]
    if ctrl is None:
        return _Copied(kernel, gt, domid, ring_ref, rrefs, read_order, wrefs, write_order)
    page = ctrl.buf if ctrl.buf is not None else ctrl.pages[0]

    def ring(order: int, refs: list[int], writable: bool):
        if not refs:
            off = SMALL_RING_OFFSET if order == SMALL_RING_SHIFT else LARGE_RING_OFFSET
            return page[off:off + (1 << order)]
        m = gt.map_grant_refs(domid, refs, writable)
        if m.buf is None:
            raise RemoteProtocolError("the vchan server's ring pages are not one run")
        return m.buf

    return _Mapped(page, ring(read_order, rrefs, False), read_order, RIGHT,
                   ring(write_order, wrefs, True), write_order, LEFT, False)
