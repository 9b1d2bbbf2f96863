"""Counts on its console, one number per tick, then powers off.

It keeps its count in a page of its own RAM and hands over only that
page's pfn when it suspends, so after a save and restore (or a migration)
it goes on at the next number: no gap, no repeat.

args: count (int, default 5; 0 = forever), interval (seconds, default 0.1)
"""

import struct

_STATE = struct.Struct("<Q")  # the last number printed


def main(kernel) -> None:
    count = int(kernel.args.get("count", 5))
    interval = float(kernel.args.get("interval", 0.1))
    if kernel.restored is not None:
        (pfn,) = _STATE.unpack(kernel.restored)
    else:
        pfn = kernel.alloc_pages(1)   # fresh RAM is zero: the count starts at 0
    kernel.on_suspend(lambda: _STATE.pack(pfn))
    state = kernel.page(pfn)
    (n,) = _STATE.unpack_from(state)
    while count == 0 or n < count:
        n += 1
        _STATE.pack_into(state, 0, n)  # in RAM before it shows: a suspend from here on keeps it
        kernel.print(f"count {n}")
        kernel.sleep(interval)
    kernel.print(f"counted to {n}")
