"""Stamps its start: prints ``stamp: <time.monotonic_ns() at kernel entry>``
as its first console line, then idles (for the domain-creation benchmark;
CLOCK_MONOTONIC is the host's, so the stamp compares with the caller's)."""

import time


def main(kernel) -> None:
    t = time.monotonic_ns()
    kernel.print(f"stamp: {t}")
    kernel.idle()
