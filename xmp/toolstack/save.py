"""Save and restore: ``xmp save`` / ``xmp restore``, libxl's
``libxl_domain_suspend`` and ``libxl_domain_create_restore``.

Saving, from the supervisor's loop, never waiting inline:

1. ask the guest to suspend (``control/shutdown`` = ``suspend``, as xl) and
   poll until it is SHUTDOWN(suspend) -- its kernel has handed over its
   context in the suspend hypercall -- or give up after
   :data:`SUSPEND_TIMEOUT` (the guest keeps running; the save fails);
2. let xenconsoled drain the console ring (a restored guest's xenconsoled
   starts at the ring's indices: output left in it would show twice);
3. write the image (:mod:`xmp.migration.image`), a slice per loop turn
   (every other domain is served meanwhile), into a hidden file beside the
   target, renamed to it only once every byte is written: a save killed
   half-way -- the supervisor included -- leaves no file that claims to be
   an image;
4. without ``-c`` the domain is destroyed, as xl does; with ``-c``
   (checkpoint) it resumes in place, its suspend call returning
   "cancelled", and ``-p`` leaves it paused.  Any failure in 3 resumes it.

Restoring reads (a slice per loop turn) and checks the whole image first (a fault is one error
naming offset and record), then every device's backend domain and image,
the name and the memory, and only then builds the domain: its RAM is
filled before its process starts, start_info is rewritten with the new
domid and ports, and the grant table starts fresh (the guest re-grants
what it needs, as on Xen, where the new host's grant table is empty).
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import mmap
import os
import time
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Any

from xmp.errors import HypercallError, XmpError
from xmp.hv.domain import Domain, DomState
from xmp.migration.image import PAGE_SIZE, DomainImage, ImageDecoder, encode_image
from xmp.migration.stream import StreamError
from xmp.startinfo import GNTTAB_PFN, START_INFO_PFN
from xmp.toolstack.devices import Planned
from xmp.toolstack.domains import DomainRecord, Toolstack
from xmp.toolstack.pending import Pending

SUSPEND_TIMEOUT = 60.0   # seconds a guest gets to suspend (libxl's)
DRAIN_TIMEOUT = 2.0      # seconds xenconsoled gets to drain the console ring
POLL = 0.005
TURN = 0.02              # seconds of image writing per loop turn
READ_CHUNK = 1 << 20


class SaveRestore:
    def __init__(self, ts: Toolstack):
        self.ts = ts
        self.sup = ts.sup
        self.saving: set[int] = set()

    # -- save --------------------------------------------------------------------

    def save(self, dom: Domain, path: Path, checkpoint: bool = False, paused: bool = False,
             timeout: float = SUSPEND_TIMEOUT) -> Pending:
        if dom.domid == 0 or dom.cfg.driver_domain:
            raise HypercallError(errno.EINVAL, "save", f"{dom.name} serves other domains: it cannot be saved")
        if dom.domid in self.saving:
            raise HypercallError(errno.EBUSY, "save", f"{dom.name} is being saved already")
        if dom.state != DomState.RUNNING:
            raise HypercallError(errno.EINVAL, "save", f"{dom.name} is {dom.state.value}, not running")
        if not path.parent.is_dir():
            raise HypercallError(errno.ENOENT, "save", f"{path.parent} is not a directory")
        for dev in self.ts.record(dom).devices:  # a class whose devices cannot move says so (pci)
            check = getattr(dev.cls.part("toolstack"), "check_save", None)
            if check is not None:
                try:
                    check(dev.spec)
                except XmpError as exc:
                    raise HypercallError(errno.EINVAL, "save", f"{dom.name}: {exc}") from None
        done = Pending()
        self.ts.request_shutdown(dom, "suspend")
        self.saving.add(dom.domid)
        self.sup.call_later(POLL, _Save(self, dom, path, checkpoint, paused, done, timeout).step)
        return done

    # -- restore -----------------------------------------------------------------

    def restore(self, path: Path, paused: bool = False) -> Pending:
        """Read the image a slice per loop turn (the loop serves everyone
        meanwhile), then check and build; answered once the domain runs."""
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise HypercallError(exc.errno or errno.EIO, "restore", f"{path}: {exc.strerror}") from None
        done = Pending()
        decoder = ImageDecoder()
        started = time.monotonic()

        def step() -> None:
            try:
                until = time.monotonic() + TURN
                while time.monotonic() < until:
                    chunk = f.read(READ_CHUNK)
                    if not chunk:
                        break
                    decoder.feed(chunk)
                else:
                    self.sup.call_later(0.0, step)
                    return
                f.close()
                done.resolve(self._build(decoder.close(), path, paused, started))
            except OSError as exc:
                done.fail(HypercallError(exc.errno or errno.EIO, "restore", f"{path}: {exc.strerror}"))
            except StreamError as exc:
                done.fail(HypercallError(errno.EINVAL, "restore", f"{path}: not a valid image: {exc}"))
            except HypercallError as exc:
                done.fail(exc)
            except XmpError as exc:
                done.fail(HypercallError(errno.EINVAL, "restore", str(exc)))
            except Exception:   # a bug: answered, and logged by the loop
                done.fail(HypercallError(errno.EINVAL, "restore", "internal error (see xmp dmesg)"))
                raise
            finally:
                if done.done:
                    f.close()

        self.sup.call_later(0.0, step)
        return done

    def _build(self, image: DomainImage, path: Path, paused: bool, started: float) -> dict[str, Any]:
        cfg = image.config
        if any(d.name == cfg.name and d.state != DomState.DYING for d in self.sup.domains.values()):
            raise HypercallError(errno.EEXIST, "restore", f"a domain named {cfg.name!r} already exists")
        planned = self._plan(image)
        pool = self.sup.pool_pages
        if image.tot_pages > pool:
            raise HypercallError(errno.ENOMEM, "restore", f"{cfg.name} needs {image.tot_pages} pages, "
                                 f"the host pool has {pool}")
        context = base64.b64encode(image.context).decode()
        target = image.record.get("target_kb")
        if not isinstance(target, int) or isinstance(target, bool) or target <= 0:
            target = None   # an image from before balloon targets were recorded: the config's
        dom = self.ts.create(cfg, planned=planned, restore={"restore": context},
                             prepare=lambda d: fill(d, image), paused=paused, target_kb=target)
        dt = time.monotonic() - started
        self.sup.log(f"dom{dom.domid} {dom.name!r} restored from {path}: {image.tot_pages} pages "
                     f"in {dt:.3f} s")
        return {"domid": dom.domid, "name": dom.name, "pages": image.tot_pages, "bytes": image.size,
                "seconds": round(dt, 3)}

    def _plan(self, image: DomainImage) -> list[Planned]:
        """The saved devices (checked as DomainRecord.restore checks them),
        each with its backend domain here, by name, and what its class
        checks (a block device's image must still exist)."""
        def backend(name: str) -> int:
            dom = next((d for d in self.sup.domains.values()
                        if d.name == name and d.state != DomState.DYING), None)
            if dom is None:
                raise HypercallError(errno.ESRCH, "restore", f"backend domain {name!r} does not exist here")
            return dom.domid

        out = []
        try:
            rec = DomainRecord.restore(image.record, 0, backend)
            for dev in rec.devices:
                check = getattr(dev.cls.part("toolstack"), "check_restored", None)
                if check is not None:
                    check(dev.spec)
                out.append(Planned(dev.cls, dev.spec, self.sup.domains[dev.back_domid]))
        except HypercallError as exc:
            raise HypercallError(exc.errno, "restore", f"{image.config.name}: {exc.detail}") from None
        except XmpError as exc:
            raise HypercallError(errno.EINVAL, "restore", str(exc)) from None
        return out


class _Save:
    """One save in progress, stepped from the supervisor's loop: waiting
    for the suspend, for the console to drain, then writing the image a
    slice (:data:`TURN`) per loop turn, so every other domain is served
    meanwhile.  The RAM is read through a mapping of its own, which a
    destroy of the domain half-way cannot pull away."""

    def __init__(self, sr: SaveRestore, dom: Domain, path: Path, checkpoint: bool, paused: bool,
                 done: Pending, timeout: float):
        self.sr, self.sup, self.dom, self.path = sr, sr.sup, dom, path
        self.checkpoint, self.paused, self.done = checkpoint, paused, done
        self.started = time.monotonic()
        self.timeout = timeout
        self.suspended_at: float | None = None
        self.file: _NewFile | None = None
        self.chunks: Generator[bytes, None, None] | None = None
        self.map: mmap.mmap | None = None
        self.ram: memoryview | None = None
        self.size = self.pages = 0
        self.write_started = 0.0

    def step(self) -> None:
        try:
            delay = self._step()
        except (OSError, XmpError) as exc:
            self._fail(errno.EIO, f"writing {self.path}: {exc}")
            return
        except Exception:   # a bug: the guest resumes, the client is answered, the loop logs it
            self._fail(errno.EINVAL, "internal error (see xmp dmesg)")
            raise
        if delay is not None:
            self.sup.call_later(delay, self.step)

    def _step(self) -> float | None:
        dom, now = self.dom, time.monotonic()
        alive = dom.domid in self.sup.domains and dom.state != DomState.DYING and dom.pid is not None
        if not alive or (dom.state == DomState.SHUTDOWN and dom.shutdown_reason != "suspend") \
                or (self.suspended_at is not None and dom.state != DomState.SHUTDOWN):
            self._fail(errno.ESRCH, f"{dom.name} ended or went on during the save "
                                    f"({dom.shutdown_reason or dom.state.value})")
            return None
        if dom.state != DomState.SHUTDOWN:
            if now - self.started > self.timeout:
                self.sr.ts.xs.write(f"/local/domain/{dom.domid}/control/shutdown", "",
                                    "withdrawing a suspend")
                self._fail(errno.ETIMEDOUT, f"{dom.name} did not suspend within {self.timeout:g} s; "
                                            "it goes on running")
                return None
            return POLL
        if self.suspended_at is None:
            self.suspended_at = now
        if self.chunks is None:
            if dom.console_undrained() and now - self.suspended_at < DRAIN_TIMEOUT:
                return POLL
            self._open()
        assert self.chunks is not None and self.file is not None
        until = time.monotonic() + TURN
        for chunk in self.chunks:
            self.file.write(chunk)
            self.size += len(chunk)
            if time.monotonic() > until:
                return 0.0
        self.file.commit()
        self._close()
        self._finish()
        return None

    def _open(self) -> None:
        dom = self.dom
        record = {**self.sr.ts.record(dom).save(lambda domid: self.sup.domains[domid].name),
                  "uuid": dom.uuid}   # as libxl's config keeps c_info.uuid: the domain keeps it
        pfns = [pfn for pfn, present in enumerate(dom.populated) if present]
        data = data_pages(dom.ram.fd, dom.max_pages)
        self.map = mmap.mmap(dom.ram.fd, dom.max_pages * PAGE_SIZE, prot=mmap.PROT_READ)
        self.ram = memoryview(self.map)
        self.pages = len(pfns)
        self.write_started = time.monotonic()
        self.file = _NewFile(self.path)
        self.chunks = encode_image(record, self.ram, pfns, dom.suspend_context, dom.cfg.vcpus,
                                   zero=lambda pfn: not data[pfn])

    def _close(self) -> None:
        if self.chunks is not None:
            self.chunks.close()   # the generator lets go of its views of the RAM
        if self.file is not None:
            self.file.close()     # removes it unless committed
        if self.ram is not None:
            self.ram.release()
        if self.map is not None:
            self.map.close()
        self.chunks = self.file = self.ram = self.map = None

    def _fail(self, code: int, msg: str) -> None:
        self._close()
        dom = self.dom
        suspended = dom.state == DomState.SHUTDOWN and dom.shutdown_reason == "suspend"
        if self.suspended_at is not None and dom.domid in self.sup.domains and suspended \
                and dom.sock is not None:
            self.sup.resume_domain(dom)   # after the suspend, a failed save resumes the guest
        self.sr.saving.discard(dom.domid)
        self.sup.log(f"save of dom{dom.domid} {dom.name!r} failed: {msg}")
        self.done.fail(HypercallError(code, "save", msg))

    def _finish(self) -> None:
        dom, sup = self.dom, self.sup
        dt = time.monotonic() - self.write_started
        sup.log(f"dom{dom.domid} {dom.name!r} saved to {self.path}: {self.pages} pages, {self.size} bytes "
                f"in {dt:.3f} s")
        self.sr.saving.discard(dom.domid)
        stats = {"domid": dom.domid, "name": dom.name, "path": str(self.path), "pages": self.pages,
                 "bytes": self.size, "write_seconds": round(dt, 3),
                 "seconds": round(time.monotonic() - self.started, 3)}
        if self.checkpoint:
            sup.resume_domain(dom)
            if self.paused:
                sup.pause_domain(dom)
        else:
            sup.destroy_domain(dom, f"saved to {self.path}")
        self.done.resolve(stats)


def fill(dom: Domain, image: DomainImage) -> None:
    """The saved RAM into a freshly built ``dom`` (before its process runs):
    every page but start_info and the grant table, which the builder laid
    out anew; start_info is the saved one with this domain's id and ports;
    the domain keeps its UUID."""
    assert image.start_info is not None
    skip = {START_INFO_PFN, *range(GNTTAB_PFN, GNTTAB_PFN + dom.cfg.max_grant_frames)}
    ram = dom.ram_map
    for pfn, page in image.pages.items():
        if page is not None and pfn not in skip:
            ram[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE] = page
    fresh = type(image.start_info).unpack_from(ram, START_INFO_PFN * PAGE_SIZE)
    dataclasses.replace(image.start_info, domid=dom.domid, flags=fresh.flags, store_evtchn=dom.store_port,
                        console_evtchn=dom.console_port).pack_into(ram, START_INFO_PFN * PAGE_SIZE)
    populated = bytearray(dom.max_pages)
    populated[:dom.reserved_pfns] = b"\1" * dom.reserved_pfns
    for pfn in image.pages:
        populated[pfn] = 1
    dom.populated, dom.tot_pages = populated, sum(populated)
    saved_uuid = image.record.get("uuid")
    if isinstance(saved_uuid, str):
        try:
            dom.uuid = str(uuid.UUID(saved_uuid))
        except ValueError:
            pass   # not one: the domain gets a new one


def data_pages(fd: int, pages: int) -> bytearray:
    """1 for each page of the RAM object that may hold data, 0 for its holes
    (never written, or ballooned out): SEEK_DATA/SEEK_HOLE, so a hole is
    known to be zero without reading it."""
    out = bytearray(pages)
    end, off = pages * PAGE_SIZE, 0
    while off < end:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            return bytearray(b"\1" * pages)   # a file system without SEEK_DATA: read everything
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        first, last = start // PAGE_SIZE, -(-stop // PAGE_SIZE)
        out[first:last] = b"\1" * (last - first)
        off = stop
    return out


class _NewFile:
    """A file that appears under ``path`` only on :meth:`commit`: written
    under a hidden temporary name beside it and renamed over ``path`` once
    whole; :meth:`close` removes it if it was not committed.  (O_TMPFILE
    would leave nothing even after a SIGKILL, but linking it in goes
    through /proc/self/fd, which a non-dumpable supervisor cannot follow.)
    A partial file left by a killed supervisor is ``.<name>.<pid>.partial``
    and lacks the END records: it claims to be nothing."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp: Path | None = path.parent / f".{path.name}.{os.getpid()}.partial"
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.f = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.f.write(data)

    def commit(self) -> None:
        assert self.tmp is not None
        self.f.flush()
        os.replace(self.tmp, self.path)
        self.tmp = None

    def close(self) -> None:
        self.f.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None
