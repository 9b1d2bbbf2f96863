"""Crashes: raises an exception after ``args.after`` seconds (default 0)."""


class GuestPanic(RuntimeError):
    pass


def main(kernel) -> None:
    after = float(kernel.args.get("after", 0))
    kernel.print(f"crasher: crashing in {after} s")
    if after:
        kernel.sleep(after)
    raise GuestPanic("crasher: deliberate crash")
