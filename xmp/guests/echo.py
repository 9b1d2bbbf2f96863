"""Console echo: answers every line typed at its console ("xmp console")
with ``echo: <line>``; the line ``quit`` powers it off."""


def main(kernel) -> None:
    kernel.print(f"echo: ready on {kernel.name}")
    while True:
        line = kernel.console.readline().decode(errors="replace").rstrip("\r\n")
        if line == "quit":
            kernel.print("echo: bye")
            return
        kernel.print(f"echo: {line}")
