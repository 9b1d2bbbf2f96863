"""Pings its vping device: ``args.count`` round trips (default 100), each
answer checked, then ``args.interval``-spaced pings forever if ``args.forever``."""

def main(kernel) -> None:
    dev = kernel.vping(int(kernel.args.get("devid", 0)))
    count = int(kernel.args.get("count", 100))
    for i in range(count):
        data = f"ping {i} from {kernel.name}".encode()
        if dev.ping(data) != data.ljust(56, b"\0")[::-1]:
            raise AssertionError(f"vping: answer {i} is wrong")
    kernel.print(f"pinger: {count} pings verified")
    n = 0
    while kernel.args.get("forever"):
        kernel.sleep(float(kernel.args.get("interval", 0.05)))
        data = f"again {n}".encode()
        if dev.ping(data, timeout=10) != data.ljust(56, b"\0")[::-1]:
            raise AssertionError("vping: a later answer is wrong")
        n += 1
        if n % 10 == 0:
            kernel.print(f"pinger: {n} more pings verified")
