"""What pci keeps outside the guest's RAM, and why it does not move."""

from xmp.devices import MoveState

STATE = MoveState(
    frontend_outside_ram=(
        "the xenbus device and its watches",
        "the shared page's grant ref and its event-channel port",
        "the bound doorbell and MSI ports, the BAR copy pages",
    ),
    frontend_rebuild=(
        "none: a passed-through device is the host's, not the guest's, so a domain holding one is not "
        "restored (check_restored refuses it, as xl refuses to save one); after a backend restart the "
        "frontend grants a fresh page and the guest scans and maps again"
    ),
    backend_outside_ram=("the device (configuration space, BAR pages, its interrupt port)",
                         "the mapping of the frontend's page and its port"),
    backend_rebuild="none moves: a new pciback resets the device and exports it afresh",
)
