"""Live migration between two supervisors: ``xmp migrate`` (xl migrate)
and its receiver (xl migrate-receive), over the authenticated channel of
:mod:`xmp.migration.channel`.

The wire: every frame of the channel is ``J`` + a JSON control message or
``S`` + bytes of the save stream (the save image of :mod:`xmp.migration.image`,
live: several rounds of PAGE_DATA before the context).

    sender                                     receiver
                                   <-  J {op: hello, host}
    J {op: migrate, name, uuid, token, decision}  ->
                                   <-  J {op: accepted} | J {error}
    S head, S PAGE_DATA... (round 0, the guest running; rounds 1..n)
      guest suspended; S last dirty pages, context, END  ->
                      receiver builds the domain, paused (its devices made here)
                                   <-  J {op: ready} | J {error}
      COMMIT: decision file created "go"
    J {op: go}                                  ->
                      receiver unpauses it (its frontends reconnect here)
                                   <-  J {op: done}
      source destroys its copy

The handover: never lost, never twice.  The commit point is one file on the
storage both hosts see (Xen's migration needs shared storage for the disks
anyway): ``<decision dir>/.xmp-migrate-<uuid>-<token>``, made with O_EXCL so
exactly one of two racing writers makes it.  The sender makes it saying
``go`` once it holds READY; the receiver, if the connection fails after it
sent READY and before GO came, makes it saying ``abort``.  Whoever finds the
file already made obeys what it says.  So:

* before the sender holds READY (connection cut, receiver killed, a bad
  stream, a refusal, the receiver's build failing): the sender resumes its
  guest (it never ran elsewhere: the receiver's copy is paused and is
  destroyed; if the receiver had sent READY it makes the file ``abort``);
* READY held, the file made ``go``: the guest belongs to the receiver from
  here; the sender never resumes it and destroys its copy whatever follows
  (GO lost: the receiver finds ``go`` in the file and unpauses);
* READY held, the file already ``abort``: the receiver gave up first and
  destroyed its copy; the sender resumes.
* A supervisor SIGKILLed loses the domains it runs, as a crashed Xen host
  does.  The source killed before the commit: the guest is gone (the
  receiver aborts its paused copy); after it: the receiver runs it.  The
  receiver killed before the commit: the source resumes; after it (the file
  says ``go``): the guest is gone with the receiver.

At no instant do two copies run: the receiver's copy is unpaused only after
the file says ``go``, and the source's is never resumed once it does.
Without a decision directory (a guest with no disk, and no ``--shared``)
there is no file: after sending GO the sender cannot know, so without DONE
it keeps its copy suspended and says so, as xl leaves ``NAME--migratedaway``.

Downtime: from the instant the source sees its guest suspended to the
instant it hears the receiver has unpaused it -- the gap the guest itself
sees on its clock, plus at most half a round trip.

Threads: the sender and every receiver session run in threads of their own
(blocking sockets), and hand what touches domains to the supervisor's loop
through :class:`LoopBridge`; nothing here blocks the loop.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import errno
import json
import mmap
import os
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xmp.errors import HypercallError, XmpError
from xmp.hv.domain import Domain, DomState
from xmp.migration.channel import Session, connect
from xmp.migration.dirty import DirtyLog
from xmp.migration.image import PAGE_SIZE, ImageDecoder, ImageEncoder
from xmp.migration.precopy import Policy, PreCopy
from xmp.migration.rounds import run_precopy
from xmp.migration.stream import StreamError
from xmp.toolstack.domains import Toolstack
from xmp.toolstack.pending import Pending
from xmp.toolstack.save import DRAIN_TIMEOUT, SUSPEND_TIMEOUT, fill

REPLY_TIMEOUT = 60.0    # seconds either side waits for the other's next message
POLL = 0.002            # seconds between looks at a suspending guest


class LoopBridge:
    """Threads hand work to the supervisor's loop: :meth:`call` runs a
    function there and returns its result; :meth:`post` only queues it."""

    def __init__(self, sup: Any):
        self.sup = sup
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        sup.watch(self._r, selectors.EVENT_READ, self._drain)

    def post(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                fut.set_exception(HypercallError(errno.ESHUTDOWN, "migrate", "the supervisor is stopping"))
                return fut
            self._queue.append((fn, fut))
        try:
            self._w.send(b"x")
        except BlockingIOError:
            pass   # a wake-up is pending already
        return fut

    def call(self, fn: Callable[[], Any], timeout: float = REPLY_TIMEOUT) -> Any:
        return self.post(fn).result(timeout)

    def _drain(self, _mask: int) -> None:
        try:
            self._r.recv(4096)
        except BlockingIOError:
            pass
        while True:
            with self._lock:
                if not self._queue:
                    return
                fn, fut = self._queue.popleft()
            try:
                fut.set_result(fn())
            except BaseException as exc:   # the thread that asked gets it
                fut.set_exception(exc)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._queue = list(self._queue), collections.deque()
        for _fn, fut in pending:
            fut.set_exception(HypercallError(errno.ESHUTDOWN, "migrate", "the supervisor is stopping"))
        if self.sup.watching(self._r):
            self.sup.unwatch(self._r)
        self._r.close()
        self._w.close()


# -- the wire --------------------------------------------------------------------


def send_json(s: Session, **msg: Any) -> None:
    s.send(b"J" + json.dumps(msg).encode())


def recv_frame(s: Session, op: str) -> tuple[str, Any]:
    """("J", dict) or ("S", bytes); the connection's end is ECONNRESET."""
    frame = s.recv()
    if frame is None:
        raise HypercallError(errno.ECONNRESET, op, f"{s.peer} closed the connection")
    kind, body = frame[:1], frame[1:]
    if kind == b"S":
        return "S", body
    if kind == b"J":
        try:
            msg = json.loads(body)
        except ValueError:
            msg = None
        if isinstance(msg, dict):
            return "J", msg
    raise HypercallError(errno.EPROTO, op, f"{s.peer} sent a frame that is not a migration message")


def recv_json(s: Session, op: str, want: str) -> dict[str, Any]:
    kind, msg = recv_frame(s, op)
    if kind != "J":
        raise HypercallError(errno.EPROTO, op, f"{s.peer} sent stream data where {want!r} was due")
    if "error" in msg:
        code = getattr(errno, str(msg.get("error")), errno.EIO)
        raise HypercallError(code, op, f"{s.peer}: {msg.get('detail', msg['error'])}")
    if msg.get("op") != want:
        raise HypercallError(errno.EPROTO, op, f"{s.peer} sent {msg.get('op')!r} where {want!r} was due")
    return msg


def send_error(s: Session, exc: BaseException) -> None:
    code = exc.errno if isinstance(exc, HypercallError) else errno.EINVAL
    detail = exc.detail if isinstance(exc, HypercallError) and exc.detail else str(exc)
    try:
        send_json(s, error=errno.errorcode.get(code, "EIO"), detail=detail)
    except OSError:
        pass


# -- the decision file -----------------------------------------------------------


class Decision:
    """The handover's commit point on shared storage (see the module's
    docstring): made once, with O_EXCL; ``claim(word)`` answers the word
    that stands -- ours if we made it, the other side's if it was first."""

    def __init__(self, directory: str | None, uuid: str, token: str):
        self.path = Path(directory) / f".xmp-migrate-{uuid}-{token}" if directory else None
        self.token = token

    def claim(self, word: str) -> str:
        if self.path is None:
            return word
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self.read()
        try:
            os.write(fd, f"{word} {self.token}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return word

    def read(self) -> str:
        assert self.path is not None
        for _ in range(100):   # the other side is between its O_EXCL and its write
            text = self.path.read_text().split()
            if len(text) == 2 and text[1] == self.token and text[0] in ("go", "abort"):
                return text[0]
            time.sleep(0.01)
        return "abort"   # not a word either side writes: nobody committed to anything

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def decision_dir(rec: dict[str, Any]) -> str | None:
    """Shared storage the domain's disks are on: the first disk image's directory."""
    for dev in rec.get("devices", []):
        params = dev.get("back_keys", {}).get("params", "")
        if isinstance(params, str) and params.startswith("/"):
            return str(Path(params).parent)
    return None


class Migrations:
    """The toolstack's migrations: the receiver (the listener's handler)
    and the sender (``cmd: migrate``)."""

    def __init__(self, ts: Toolstack):
        self.ts, self.sup = ts, ts.sup
        self.bridge = LoopBridge(ts.sup)
        self.outgoing: set[int] = set()      # domids being sent
        self.status: dict[str, dict[str, Any]] = {}   # by domain name: what `xmp migrate` shows
        self.incoming: set[str] = set()      # uuids being received
        self._lock = threading.Lock()
        self.threads: set[threading.Thread] = set()

    def close(self) -> None:
        self.bridge.close()
        for t in list(self.threads):
            t.join(5)

    # -- sending ---------------------------------------------------------------------

    def migrate(self, dom: Domain, address: str, key: bytes, *, live: bool, paused: bool = False,
                shared: str | None = None, policy: Policy | None = None) -> Pending:
        if dom.domid == 0 or dom.cfg.driver_domain:
            raise HypercallError(errno.EINVAL, "migrate", f"{dom.name} serves other domains: it cannot move")
        if dom.domid in self.outgoing or dom.domid in self.ts.saves.saving:
            raise HypercallError(errno.EBUSY, "migrate", f"{dom.name} is being migrated or saved already")
        if dom.state != DomState.RUNNING:
            raise HypercallError(errno.EINVAL, "migrate", f"{dom.name} is {dom.state.value}, not running")
        if shared is not None and not Path(shared).is_dir():
            raise HypercallError(errno.ENOENT, "migrate", f"{shared} is not a directory")
        record = {**self.ts.record(dom).save(lambda domid: self.sup.domains[domid].name), "uuid": dom.uuid}
        self.outgoing.add(dom.domid)
        done = Pending()
        send = _Send(self, dom, record, address, key, live, paused, shared or decision_dir(record),
                     policy or Policy(), done)
        self.status[dom.name] = send.status
        def forget(_result: dict[str, Any] | None, _exc: HypercallError | None, name: str = dom.name) -> None:
            self.status.pop(name, None)
        done.then(forget)
        t = threading.Thread(target=send.run, name=f"xmp-migrate-dom{dom.domid}", daemon=True)
        self.threads.add(t)
        t.start()
        return done

    # -- receiving -------------------------------------------------------------------

    def receive(self, s: Session) -> None:
        """One sender's session (in the listener's thread for it)."""
        _Receive(self, s).run()


class _Send:
    def __init__(self, m: Migrations, dom: Domain, record: dict[str, Any], address: str, key: bytes,
                 live: bool, paused: bool, shared: str | None, policy: Policy, done: Pending):
        self.m, self.sup, self.bridge = m, m.sup, m.bridge
        self.dom, self.record, self.address, self.key = dom, record, address, key
        self.live, self.paused, self.policy, self.done = live, paused, policy, done
        self.token = secrets.token_hex(8)
        self.decision = Decision(shared, dom.uuid, self.token)
        self.suspended_at: float | None = None
        self.committed = False
        self.kept = False        # unconfirmed without a decision file: kept suspended, neither way
        self.rounds: list[dict[str, Any]] = []
        self.status: dict[str, Any] = {"phase": "connecting", "rounds": self.rounds,
                                       "tot_pages": dom.tot_pages}
        self.sent = 0
        self.log = lambda msg: self.bridge.post(lambda: self.sup.log(msg))

    def run(self) -> None:
        started = time.monotonic()
        try:
            result = self._run(started)
        except BaseException as exc:
            err = exc if isinstance(exc, HypercallError) else self._error(exc)
            self._failed(err)
            if not isinstance(exc, (HypercallError, XmpError, OSError, concurrent.futures.TimeoutError)):
                raise
        else:
            self.bridge.post(lambda: self._settle(result, None))
        finally:
            self.m.threads.discard(threading.current_thread())

    def _error(self, exc: BaseException) -> HypercallError:
        """One clear line for a failure that is not ours to name (the link)."""
        if isinstance(exc, OSError):
            where = (f"after the commit: {self.dom.name} is the receiver's now" if self.committed else
                     f"before the handover: {self.dom.name} goes on here")
            return HypercallError(errno.EIO, "migrate", f"the connection to {self.address} was lost "
                                  f"({exc.strerror or type(exc).__name__}) {where}")
        return HypercallError(errno.EIO, "migrate", f"{type(exc).__name__}: {exc}")

    def _settle(self, result: dict[str, Any] | None, exc: HypercallError | None) -> None:
        self.m.outgoing.discard(self.dom.domid)
        if exc is not None:
            self.done.fail(exc)
        else:
            assert result is not None
            self.done.resolve(result)

    def _failed(self, exc: HypercallError) -> None:
        """Before the commit the guest goes on here; after it, it is the
        receiver's (and ours is destroyed)."""
        def on_loop() -> None:
            dom = self.dom
            if dom.logdirty is not None:
                self.sup.logdirty_disable(dom)
            here = dom.domid in self.sup.domains and dom.state != DomState.DYING
            if self.kept:
                self.sup.log(f"migration of {dom.name!r} to {self.address}: {exc}")
            elif self.committed:
                if here:
                    self.sup.destroy_domain(dom, f"migrated to {self.address} (its end unconfirmed)")
                self.sup.log(f"migration of {dom.name!r} to {self.address}: {exc}; committed, so the "
                             "receiver runs it")
            else:
                if here and dom.state == DomState.SHUTDOWN and dom.shutdown_reason == "suspend" \
                        and dom.sock is not None:
                    self.sup.resume_domain(dom)
                elif here and dom.state == DomState.RUNNING:
                    self.m.ts.xs.write(f"/local/domain/{dom.domid}/control/shutdown", "",
                                       "withdrawing a suspend")
                self.sup.log(f"migration of {dom.name!r} to {self.address} failed: {exc}; it goes on here")
            self._settle(None, exc)
        try:
            self.bridge.call(on_loop)
        except (HypercallError, concurrent.futures.TimeoutError):
            pass   # the supervisor is stopping: the domain goes with it

    def _run(self, started: float) -> dict[str, Any]:
        dom = self.dom
        s = connect(self.address, self.key)
        with s:
            s.sock.settimeout(REPLY_TIMEOUT)
            recv_json(s, "migrate", "hello")
            send_json(s, op="migrate", name=dom.name, uuid=dom.uuid, token=self.token, live=self.live,
                      decision=str(self.decision.path.parent) if self.decision.path else None)
            recv_json(s, "migrate", "accepted")
            self.status["phase"] = "pre-copy" if self.live else "suspending"
            fd = os.dup(dom.ram.fd)   # our own: a destroy half-way cannot pull it away
            ram_map = mmap.mmap(fd, dom.max_pages * PAGE_SIZE, prot=mmap.PROT_READ)
            os.close(fd)
            ram = memoryview(ram_map)
            try:
                return self._stream(s, ram, started)
            finally:
                ram.release()
                ram_map.close()

    def _stream(self, s: Session, ram: memoryview, started: float) -> dict[str, Any]:
        dom, bridge = self.dom, self.bridge
        enc = ImageEncoder(self.record, dom.max_pages - 1)
        s.send(b"S" + enc.head())
        sent: set[int] = set()

        def populated() -> bytes:
            return bytes(dom.populated)

        def send_pages(pfns) -> None:
            pop = bridge.call(populated)
            todo = [p for p in pfns if pop[p]]
            for chunk in enc.pages(ram, todo):
                s.send(b"S" + chunk)
            sent.update(todo)
            self.sent += len(todo)

        if self.live:
            log = bridge.call(lambda: DirtyLog(self.sup, dom))
            pop = bridge.call(populated)
            nr = dom.max_pages

            def progress(pc: PreCopy) -> None:
                r = pc.rounds[-1]
                self.rounds.append({"round": r.round, "pages": r.pages_sent, "seconds": round(r.seconds, 4),
                                    "dirty": r.dirty, "mb_s": round(r.bandwidth / 1e6, 1),
                                    "dirty_pages_s": round(r.dirty_rate)})
                self.log(f"migration of {dom.name!r}: round {r.round}: {r.pages_sent} pages in "
                         f"{r.seconds:.3f} s ({r.bandwidth / 1e6:.1f} MB/s), {r.dirty} dirtied")

            decision, _pc = run_precopy([p for p in range(nr) if pop[p]], nr,
                                        lambda: bridge.call(lambda: log.clean().pfns), send_pages,
                                        self.policy, progress=progress)
            self.status["phase"] = "suspending"
            self._suspend()
            last = bridge.call(lambda: log.clean().pfns)
            bridge.call(log.close)
            final = sorted(set(decision.pfns) | set(last))
        else:
            self._suspend()
            pop = bridge.call(populated)
            final = [p for p in range(dom.max_pages) if pop[p]]
        self.status["phase"] = "last round"
        t0 = time.monotonic()
        send_pages(final)
        pop = bridge.call(populated)
        gone = sorted(p for p in sent if not pop[p])
        context = bridge.call(lambda: dom.suspend_context)
        s.send(b"S" + enc.tail(context, dom.cfg.vcpus, gone))
        self.rounds.append({"round": len(self.rounds), "pages": len(final), "suspended": True,
                            "seconds": round(time.monotonic() - t0, 4)})
        self.status["phase"] = "handover"
        recv_json(s, "migrate", "ready")
        if self.decision.claim("go") != "go":
            self.decision.remove()
            raise HypercallError(errno.ETIMEDOUT, "migrate", f"{self.address} gave up waiting for us")
        self.committed = True
        try:
            send_json(s, op="go", paused=self.paused)
            done = recv_json(s, "migrate", "done")
        except (OSError, HypercallError) as exc:
            if self.decision.path is None:
                return self._unconfirmed(exc)
            raise
        resumed = time.monotonic()
        assert self.suspended_at is not None
        downtime = resumed - self.suspended_at

        def finish() -> None:
            if dom.domid in self.sup.domains:
                self.sup.destroy_domain(dom, f"migrated to {self.address}")
        bridge.call(finish)
        self.decision.remove()
        total = time.monotonic() - started
        self.log(f"dom{dom.domid} {dom.name!r} migrated to {self.address} as dom{done.get('domid')}: "
                 f"{len(self.rounds)} rounds, {self.sent} pages in {total:.3f} s, "
                 f"downtime {downtime * 1000:.1f} ms")
        return {"name": dom.name, "domid": dom.domid, "remote_domid": done.get("domid"), "live": self.live,
                "rounds": self.rounds, "pages_sent": self.sent, "tot_pages": len(sent),
                "bytes_per_page": PAGE_SIZE, "seconds": round(total, 3),
                "downtime_ms": round(downtime * 1000, 1), "address": self.address}

    def _unconfirmed(self, exc: BaseException) -> dict[str, Any]:
        """No decision file and no DONE: the guest may run there; it must not run here too."""
        def keep() -> None:
            dom = self.dom
            if dom.domid in self.sup.domains and dom.state != DomState.DYING:
                self.sup.rename(dom, f"{dom.name}--migratedaway")  # xl's suffix, which names may not use
        self.bridge.call(keep)
        self.kept = True
        raise HypercallError(errno.EIO, "migrate", f"{self.address} did not confirm ({exc}); the guest is "
                                                   f"kept suspended here as {self.dom.name}--migratedaway")

    def _suspend(self) -> None:
        """Ask the guest to suspend (as save does) and wait until it has,
        and until xenconsoled has read its console ring."""
        dom, bridge = self.dom, self.bridge
        bridge.call(lambda: self.m.ts.request_shutdown(dom, "suspend"))
        deadline = time.monotonic() + SUSPEND_TIMEOUT

        def look() -> str:
            if dom.domid not in self.sup.domains or dom.state == DomState.DYING or dom.pid is None:
                return "gone"
            if dom.state == DomState.SHUTDOWN:
                if dom.shutdown_reason != "suspend":
                    return "gone"
                return "undrained" if dom.console_undrained() else "suspended"
            return "running"

        while True:
            state = bridge.call(look)
            now = time.monotonic()
            if state == "gone":
                raise HypercallError(errno.ESRCH, "migrate", f"{dom.name} ended during the migration")
            if state != "running" and self.suspended_at is None:
                self.suspended_at = now
            if state == "suspended" or (state == "undrained" and self.suspended_at is not None
                                        and now - self.suspended_at > DRAIN_TIMEOUT):
                return
            if state == "running" and now > deadline:
                raise HypercallError(errno.ETIMEDOUT, "migrate",
                                     f"{dom.name} did not suspend within {SUSPEND_TIMEOUT:g} s")
            time.sleep(POLL)


class _Receive:
    def __init__(self, m: Migrations, s: Session):
        self.m, self.s, self.sup, self.bridge = m, s, m.sup, m.bridge
        self.dom: Domain | None = None
        self.uuid: str | None = None
        self.ready_sent = False
        self.decision: Decision | None = None

    def log(self, msg: str) -> None:
        self.bridge.post(lambda: self.sup.log(msg))

    def run(self) -> None:
        s = self.s
        s.sock.settimeout(REPLY_TIMEOUT)
        try:
            self._run()
        except (HypercallError, XmpError, OSError, concurrent.futures.TimeoutError) as exc:
            self._failed(exc)
        except BaseException as exc:
            self._failed(exc)
            raise
        finally:
            if self.uuid is not None:
                with self.m._lock:
                    self.m.incoming.discard(self.uuid)

    def _failed(self, exc: BaseException) -> None:
        if self.ready_sent and self.decision is not None:
            if self.decision.claim("abort") == "go":
                self.log(f"migration from {self.s.peer}: {exc}; the sender committed: running the guest")
                try:
                    self._go(False)
                finally:
                    self.decision.remove()
                return
        send_error(self.s, exc)
        self.log(f"migration from {self.s.peer} failed: {exc}")
        dom = self.dom
        if dom is not None:
            try:
                self.bridge.call(lambda: self.sup.destroy_domain(dom, "its migration failed"))
            except (HypercallError, concurrent.futures.TimeoutError):
                pass   # the supervisor is stopping: the domain goes with it

    def _run(self) -> None:
        s = self.s
        send_json(s, op="hello", host=self.m.ts.topology.host.name)   # who answered
        hello = recv_json(s, "migrate-receive", "migrate")
        name, uuid, token = hello.get("name"), hello.get("uuid"), hello.get("token")
        if not (isinstance(name, str) and isinstance(uuid, str) and isinstance(token, str)
                and name and uuid and token.isalnum()):
            raise HypercallError(errno.EPROTO, "migrate-receive",
                                 "a migration names its domain, uuid and token")
        where = hello.get("decision")
        if where is not None and (not isinstance(where, str) or not Path(where).is_dir()):
            raise HypercallError(errno.ENOENT, "migrate-receive",
                                 f"the decision directory {where} is not on storage this host sees")
        with self.m._lock:
            if uuid in self.m.incoming:
                raise HypercallError(errno.EBUSY, "migrate-receive", f"{name} is being received already")
            self.m.incoming.add(uuid)
            self.uuid = uuid

        def check() -> None:
            if any(d.name == name and d.state != DomState.DYING for d in self.sup.domains.values()):
                raise HypercallError(errno.EEXIST, "migrate-receive",
                                     f"a domain named {name!r} already exists")
        self.bridge.call(check)
        self.decision = Decision(where, uuid, token)
        send_json(s, op="accepted")
        self.log(f"migration: receiving {name!r} from {s.peer}")
        decoder = ImageDecoder()
        started = time.monotonic()
        while not decoder.reader.done:
            kind, body = recv_frame(s, "migrate-receive")
            if kind != "S":
                raise HypercallError(errno.EPROTO, "migrate-receive",
                                     f"{s.peer} sent {body!r} inside the stream")
            try:
                decoder.feed(body)
            except StreamError as exc:
                raise HypercallError(errno.EINVAL, "migrate-receive", f"not a valid stream: {exc}") from None
        try:
            image = decoder.close()
        except StreamError as exc:
            raise HypercallError(errno.EINVAL, "migrate-receive", f"not a valid stream: {exc}") from None
        if image.config.name != name:
            raise HypercallError(errno.EPROTO, "migrate-receive", "the stream is of another domain")

        def build() -> Domain:
            saves = self.m.ts.saves
            planned = saves._plan(image)
            context = base64.b64encode(image.context).decode()
            target = image.record.get("target_kb")
            if not isinstance(target, int) or isinstance(target, bool) or target <= 0:
                target = None
            return self.m.ts.create(image.config, planned=planned, restore={"restore": context},
                                    prepare=lambda d: fill(d, image), paused=True, target_kb=target)
        self.dom = self.bridge.call(build)
        self.log(f"migration: dom{self.dom.domid} {name!r} built paused from {s.peer}'s stream "
                 f"({image.tot_pages} pages, {time.monotonic() - started:.3f} s)")
        self.ready_sent = True
        send_json(s, op="ready", domid=self.dom.domid)
        go = recv_json(s, "migrate-receive", "go")
        self.ready_sent = False   # GO came: the sender committed; nothing to decide any more
        domid = self.dom.domid
        self._go(bool(go.get("paused")))
        self.decision.remove()
        try:
            send_json(s, op="done", domid=domid)
        except OSError:
            pass   # it runs here; the sender, committed, destroys its copy either way

    def _go(self, paused: bool) -> None:
        dom = self.dom
        assert dom is not None

        def unpause() -> None:
            if dom.domid not in self.sup.domains or dom.state == DomState.DYING:
                raise HypercallError(errno.ESRCH, "migrate-receive", f"{dom.name} ended before it could run")
            if not paused:
                self.sup.unpause_domain(dom)
            self.sup.log(f"migration: dom{dom.domid} {dom.name!r} runs here now")
        self.bridge.call(unpause)
        self.dom = None   # ours for good: no failure after this destroys it

