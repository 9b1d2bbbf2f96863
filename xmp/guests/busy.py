"""Burns CPU without pause (for pause/unpause and scheduling tests)."""


def main(kernel) -> None:
    kernel.print("busy: spinning")
    n = 0
    while True:
        n += 1
