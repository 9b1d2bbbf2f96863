"""The guest's control driver (Linux's drivers/xen/manage.c): it watches
``control/shutdown`` and, when the toolstack writes a request there,
acknowledges by writing "" and shuts the domain down with that reason.
It advertises what it supports in ``control/feature-*``.

Its boot-time requests are posted (not awaited); one that fails is told on
the console, as manage.c's pr_err("Failed to set shutdown watcher") -- the
domain boots on, as Linux's does, but nobody is left guessing why it
ignores ``xmp shutdown``."""

from __future__ import annotations

from collections.abc import Callable

from xmp.errors import XenStoreError
from xmp.xenstore.client import XsClient
from xmp.xenstore.wire import XsType

REASONS = {"poweroff": "poweroff", "halt": "poweroff", "reboot": "reboot", "suspend": "suspend",
           "crash": "crash"}
TOKEN = "control/shutdown"


class ControlDriver:
    def __init__(self, xs: XsClient, shutdown: Callable[[str], None],
                 log: Callable[[str], None] = print):
        self.xs = xs
        self.shutdown = shutdown
        self.log = log
        xs.on_posted_error = self._post_failed
        # Posted, not awaited: the guest boots on while xenstored takes them.
        for feature in ("poweroff", "reboot", "suspend"):
            xs.post(XsType.WRITE, f"control/feature-{feature}\0".encode() + b"1")
        xs.on_watch(TOKEN, self._changed)
        xs.post(XsType.WATCH, f"control/shutdown\0{TOKEN}\0".encode())

    def _post_failed(self, exc: XenStoreError) -> None:
        if exc.op == "WATCH":
            self.log(f"xen:manage: Failed to set shutdown watcher ({exc.errno}): "
                     "control/shutdown requests will not be seen")
        else:
            self.log(f"xen:manage: {exc}")

    def _changed(self, _path: str) -> None:
        request = (self.xs.read_or("control/shutdown", b"") or b"").decode(errors="replace")
        reason = REASONS.get(request)
        if reason is None:
            return  # "" (our own acknowledgement) or something we do not know
        self.xs.write("control/shutdown", "")
        self.shutdown(reason)  # for "suspend", returns once resumed
