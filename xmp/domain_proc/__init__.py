"""What runs inside a domain process: the hypercall client, the event loop,
the console driver, the `Kernel` a guest's entry point receives, and dom0's
services."""
