"""xmp's exception tree.

One root, a few subclasses that carry fields and survive pickling (they
cross process boundaries).  Errors say whose fault it was: ``LocalError``
means this side misused an API; ``RemoteProtocolError`` means the peer
(another domain, a shared page it writes) sent garbage -- the caller should
disconnect that peer, not die.
"""

from __future__ import annotations

import errno as _errno


class XmpError(Exception):
    """Root of every error xmp raises on purpose."""

    def __reduce__(self):
        return (self.__class__, self.args)


class LocalError(XmpError):
    """The caller misused an API (wrong size, ring full, bad argument)."""


class RemoteProtocolError(XmpError):
    """The other end broke a protocol: e.g. a producer index claiming more
    than a ring's worth of entries.  Disconnect that peer; serve the rest."""


class RingFull(LocalError):
    """No free slot: the producer must wait for the consumer."""


class HypercallError(XmpError):
    """A hypercall failed with a Xen errno (positive, as in errno.h)."""

    def __init__(self, errno: int, op: str, detail: str = ""):
        self.errno = errno
        self.op = op
        self.detail = detail
        name = _errno.errorcode.get(errno, str(errno))
        super().__init__(errno, op, detail)
        self._msg = f"{op}: {name}" + (f" ({detail})" if detail else "")

    def __str__(self) -> str:
        return self._msg


# grant_table.h GNTST_* statuses, by value.
GNTST_NAMES = {
    0: "GNTST_okay", -1: "GNTST_general_error", -2: "GNTST_bad_domain",
    -3: "GNTST_bad_gntref", -4: "GNTST_bad_handle", -5: "GNTST_bad_virt_addr",
    -6: "GNTST_bad_dev_addr", -7: "GNTST_no_device_space", -8: "GNTST_permission_denied",
    -9: "GNTST_bad_page", -10: "GNTST_bad_copy_arg", -11: "GNTST_address_too_big",
    -12: "GNTST_eagain", -13: "GNTST_no_space",
}


class GrantError(XmpError):
    """A grant operation failed with a GNTST_* status."""

    def __init__(self, domid: int, gref: int, status: int, op: str = "map_grant_ref"):
        self.domid = domid
        self.gref = gref
        self.status = status
        self.op = op
        super().__init__(domid, gref, status, op)

    def __str__(self) -> str:
        name = GNTST_NAMES.get(self.status, f"GNTST({self.status})")
        return f"{self.op} of gref {self.gref} (granted by dom{self.domid}): {name}"


class DomainGone(XmpError):
    """The domain no longer exists."""

    def __init__(self, domid: int):
        self.domid = domid
        super().__init__(domid)

    def __str__(self) -> str:
        return f"domain {self.domid} is gone"


class XenStoreError(XmpError):
    """A xenstore request answered with ERROR; ``errno`` is the wire's errno
    name ("ENOENT", "EACCES", "EAGAIN", …)."""

    def __init__(self, errno: str, path: str = "", op: str = ""):
        self.errno = errno
        self.path = path
        self.op = op
        super().__init__(errno, path, op)

    def __str__(self) -> str:
        where = f" {self.path}" if self.path else ""
        return f"xenstore {self.op or 'request'}{where}: {self.errno}"
