"""What every dom0 service handler runs under: a failure is reported (dom0's
own log and the hypervisor's, dmesg) and the loop goes on, as separate
daemons would.  ``on_error`` cuts the one peer whose data caused it.

DomainGone is not a failure to survive: it says our supervisor is gone,
and a domain whose supervisor is gone must end (DESIGN.md section 1)."""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from typing import Any

from xmp.errors import DomainGone


def report(xen: Any, what: str, text: str) -> None:
    """One line (or a traceback) to dom0's log and to dmesg."""
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
    return run
