"""Greets on its console, sleeping on timers between lines, then powers off.

args: greeting (str), times (int, default 3), interval (seconds, default 0.2)
"""


def main(kernel) -> None:
    greeting = kernel.args.get("greeting", "Hello")
    times = int(kernel.args.get("times", 3))
    interval = float(kernel.args.get("interval", 0.2))
    kernel.print(f"{greeting} from {kernel.name} (dom{kernel.domid}, a {kernel.detect()} guest "
                 f"on Xen {_version(kernel)})")
    for i in range(1, times):
        kernel.sleep(interval)
        kernel.print(f"{greeting} again ({i + 1}/{times})")
    kernel.print("bye")


def _version(kernel) -> str:
    v = kernel.xen.xen_version()
    return f"{v['major']}.{v['minor']}{v['extra']}"
