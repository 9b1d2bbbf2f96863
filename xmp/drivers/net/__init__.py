"""The virtual network interface: Xen's netif split driver."""
