"""A guest that does nothing, using no CPU, until it is shut down."""


def main(kernel) -> None:
    kernel.idle()
