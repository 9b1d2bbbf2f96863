"""The guest's control driver (Linux's drivers/xen/manage.c): it watches
``control/shutdown`` and, when the toolstack writes a request there,
acknowledges by writing "" and shuts the domain down with that reason.
It advertises what it supports in ``control/feature-*``."""

from __future__ import annotations

from collections.abc import Callable

from xmp.xenstore.client import XsClient
from xmp.xenstore.wire import XsType

REASONS = {"poweroff": "poweroff", "halt": "poweroff", "reboot": "reboot", "suspend": "suspend",
           "crash": "crash"}
TOKEN = "control/shutdown"


class ControlDriver:
    def __init__(self, xs: XsClient, shutdown: Callable[[str], None]):
        self.xs = xs
        self.shutdown = shutdown
        # Posted, not awaited: the guest boots on while xenstored takes them.
        for feature in ("poweroff", "reboot", "suspend"):
            xs.post(XsType.WRITE, f"control/feature-{feature}\0".encode() + b"1")
        xs.on_watch(TOKEN, self._changed)
        xs.post(XsType.WATCH, f"control/shutdown\0{TOKEN}\0".encode())

    def _changed(self, _path: str) -> None:
        request = (self.xs.read_or("control/shutdown", b"") or b"").decode(errors="replace")
        reason = REASONS.get(request)
        if reason is None:
            return  # "" (our own acknowledgement) or something we do not know
        self.xs.write("control/shutdown", "")
        self.shutdown(reason)  # for "suspend", returns once resumed
