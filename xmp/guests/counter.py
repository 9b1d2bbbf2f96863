"""Counts on its console, one number per tick, then powers off.

args: count (int, default 5; 0 = forever), interval (seconds, default 0.1)
"""


def main(kernel) -> None:
    count = int(kernel.args.get("count", 5))
    interval = float(kernel.args.get("interval", 0.1))
    n = 0
    while count == 0 or n < count:
        n += 1
        kernel.print(f"count {n}")
        kernel.sleep(interval)
    kernel.print(f"counted to {n}")
