"""What every handler of a domain that serves others runs under -- dom0's
services and backends, a driver domain's backends: a failure is reported
(the domain's own log and the hypervisor's, dmesg) and the loop goes on,
as separate daemons would.  ``on_error`` cuts the one peer whose data
caused it; ``guard_loop`` guards every handler a domain's loop runs.

DomainGone is not a failure to survive: it says our supervisor is gone,
and a domain whose supervisor is gone must end (DESIGN.md section 1)."""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xmp.errors import DomainGone

if TYPE_CHECKING:
    from xmp.domain_proc.kernel import Kernel


def report(xen: Any, what: str, text: str) -> None:
    """One line (or a traceback) to this domain's log and to dmesg."""
    print(f"{what}: {text}", flush=True)
    try:
        xen.console_io(f"{what}: {text}")
    except Exception:  # the log above has it; dmesg is best effort
        pass


def guarded(xen: Any, what: str, handler: Callable[..., None],
            on_error: Callable[[], None] | None = None) -> Callable[..., None]:
    """``handler`` that never lets an exception out: it is reported and,
    if given, ``on_error`` cuts that peer off."""
    @functools.wraps(handler)
    def run(*args: Any) -> None:
        try:
            handler(*args)
        except DomainGone:
            raise
        except Exception:
            report(xen, what, "failed:\n" + traceback.format_exc())
            if on_error is not None:
                try:
                    on_error()
                except Exception:
                    report(xen, what, "cutting the peer off failed:\n" + traceback.format_exc())
    run.guarded = True  # type: ignore[attr-defined]
    return run


def guard_loop(kernel: Kernel, who: str) -> None:
    """Every handler bound in ``kernel``'s loop from now on runs guarded:
    one that fails is reported and the domain serves on -- dom0 ending
    takes every domain with it, a driver domain every device it serves."""
    bind = kernel.loop.bind

    def guarded_bind(port: int, handler: Callable[[int], None]) -> None:
        if not getattr(handler, "guarded", False):  # one wrapper per event is enough
            handler = guarded(kernel.xen, f"{who}: the handler of port {port}", handler)
        bind(port, handler)

    kernel.loop.bind = guarded_bind  # type: ignore[method-assign]
