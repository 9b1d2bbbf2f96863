"""xenstore over this guest's ring, timed: runs READ, WRITE, a transaction
of 10 writes and a watch round trip, each for ``args.seconds`` (after
``args.warmup`` s untimed), and prints one console line
``xsbench: {json}`` (per operation: ops, seconds, ops_per_s, mean / median /
p99 latency in µs), then idles (for benchmarks/bench_xenstore.py).

A watch round trip is: write ``data/w`` (watched, token ``xsbench``), then
run the domain's event loop until the callback has seen the event.  The
event may come in with the WRITE's reply (then it is queued by the client
and dispatched here) or after it (then the store port's handler dispatches
it); either way the wait happens in the event loop, as waits in a guest do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

WATCH_TOKEN = "xsbench"
WATCH_PATH = "data/w"
TX_WRITES = 10
EVENT_TIMEOUT = 5.0  # s for one watch event before the run is reported as failed


def _timed(op: Callable[[int], None], seconds: float, warmup: float) -> dict:
    i = 0
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        op(i)
        i += 1
    lat: list[float] = []
    t0 = time.perf_counter()
    end = t0 + seconds
    now = t0
    while now < end:
        op(i)
        i += 1
        t = time.perf_counter()
        lat.append(t - now)
        now = t
    elapsed = now - t0
    lat.sort()
    n = len(lat)
    return {
        "ops": n,
        "seconds": elapsed,
        "ops_per_s": n / elapsed if elapsed > 0 else 0.0,
        "mean_us": 1e6 * elapsed / n if n else None,
        "median_us": 1e6 * lat[n // 2] if n else None,
        "p99_us": 1e6 * lat[min(n - 1, int(n * 0.99))] if n else None,
    }


def main(kernel) -> None:
    seconds = float(kernel.args.get("seconds", 1.0))
    warmup = float(kernel.args.get("warmup", 0.2))
    xs = kernel.xenstore
    out: dict = {"domid": kernel.domid}
    try:
        expect = kernel.name.encode()
        if xs.read("name") != expect:
            raise RuntimeError(f"read('name') is not {expect!r}")

        def read(_i: int) -> None:
            xs.read("name")

        def write(i: int) -> None:
            xs.write("data/x", str(i))

        def transaction(i: int) -> None:
            for attempt in xs.transactions():
                with attempt as tx:
                    for k in range(TX_WRITES):
                        xs.write(f"data/t{k}", str(i), tx)

        seen = [0]

        def on_event(_path: str) -> None:
            seen[0] += 1

        xs.on_watch(WATCH_TOKEN, on_event)
        xs.write(WATCH_PATH, "0")
        xs.watch(WATCH_PATH, WATCH_TOKEN)

        def wait_events(n: int) -> None:
            def arrived() -> bool:
                xs.dispatch()  # events that came in with a reply are queued, not yet dispatched
                return seen[0] >= n
            if not kernel.loop.run_until(arrived, EVENT_TIMEOUT):
                raise RuntimeError(f"watch event {n} did not arrive within {EVENT_TIMEOUT} s")

        wait_events(1)  # the event every new watch fires at once
        seen[0] = 0

        def watch(i: int) -> None:
            xs.write(WATCH_PATH, str(i))
            wait_events(i + 1)

        for name, op in (("read", read), ("write", write), ("transaction", transaction), ("watch", watch)):
            if name == "watch":
                seen[0] = 0  # op(i) waits for event i + 1; i starts at 0
            out[name] = _timed(op, seconds, warmup)
        out["transaction"]["writes_per_tx"] = TX_WRITES
        xs.unwatch(WATCH_PATH, WATCH_TOKEN)
        out["ok"] = True
    except Exception as exc:  # reported on the console; the benchmark fails on it
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"
    kernel.print("xsbench: " + json.dumps(out))
    kernel.idle()
