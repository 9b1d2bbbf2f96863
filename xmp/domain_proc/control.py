"""The guest's control driver (Linux's drivers/xen/manage.c): it watches
``control/shutdown`` and, when the toolstack writes a request there,
acknowledges by writing "" and shuts the domain down with that reason.
It advertises what it supports in ``control/feature-*``.

Its boot-time requests are posted (not awaited); one that fails is told on
the console, as manage.c's pr_err("Failed to set shutdown watcher") -- the
domain boots on, as Linux's does, but nobody is left guessing why it
ignores ``xmp shutdown``.

It also takes magic SysRq keys from ``control/sysrq`` (``xmp sysrq``),
clearing the node as Linux does, and acts on the keys an xmp guest can
honour, with Linux's console messages: ``b`` reboot at once, ``c`` crash
(so ``on_crash`` applies), ``o`` power off, ``t`` show every thread's
stack.  Any other key prints the help line, as Linux does for a key it
has no handler for."""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable

from xmp.errors import XenStoreError
from xmp.xenstore.client import XsClient
from xmp.xenstore.wire import XsType

REASONS = {"poweroff": "poweroff", "halt": "poweroff", "reboot": "reboot", "suspend": "suspend",
           "crash": "crash"}
TOKEN = "control/shutdown"
SYSRQ_TOKEN = "control/sysrq"
# key -> (Linux's action message, its help text), as drivers/tty/sysrq.c words them
SYSRQ_KEYS = {"b": ("Resetting", "reboot(b)"), "c": ("Trigger a crash", "crash(c)"),
              "o": ("Power Off", "poweroff(o)"), "t": ("Show State", "show-task-states(t)")}
SYSRQ_HELP = "sysrq: HELP : " + " ".join(help for _msg, help in SYSRQ_KEYS.values())


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
        xs.on_watch(SYSRQ_TOKEN, self._sysrq)
        xs.post(XsType.WATCH, f"control/sysrq\0{SYSRQ_TOKEN}\0".encode())

    def _post_failed(self, exc: XenStoreError) -> None:
        if exc.op == "WATCH" and exc.path == "control/sysrq":
            self.log(f"xen:manage: Failed to set sysrq watcher ({exc.errno}): "
                     "control/sysrq keys will not be seen")
        elif exc.op == "WATCH":
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

    def _sysrq(self, _path: str) -> None:
        try:
            key = (self.xs.read_or("control/sysrq", b"") or b"").decode(errors="replace").strip("\0")
            if not key:
                return  # our own clearing, or the watch's first event
            self.xs.write("control/sysrq", "")
        except XenStoreError:
            return  # no node we may read and clear (manage.c gives up the same way)
        letter = key[0]
        if letter not in SYSRQ_KEYS:
            self.log(SYSRQ_HELP)
            return
        self.log(f"sysrq: {SYSRQ_KEYS[letter][0]}")
        if letter == "b":
            self.shutdown("reboot")
        elif letter == "o":
            self.shutdown("poweroff")
        elif letter == "c":
            self.log("Kernel panic - not syncing: sysrq triggered crash")
            self.shutdown("crash")
        elif letter == "t":
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                self.log(f"task:{names.get(ident, ident)}")
                stack = traceback.extract_stack(frame)
                # from the domain's entry on: what came before is the zygote's fork
                start = next((i for i, f in enumerate(stack) if f.name == "domain_main"), 0)
                for line in traceback.format_list(stack[start:]):
                    self.log(line.rstrip("\n"))
