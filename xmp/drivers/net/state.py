"""What netfront and netback keep outside the guest's RAM, and how it is
rebuilt when the guest moves (save/restore, migration)."""

from xmp.devices import MoveState

STATE = MoveState(
    frontend_outside_ram=(
        "the xenbus device and its watches (the guest's xenstore connection)",
        "the grant refs and event-channel ports of its rings and buffer pages",
        "which rx buffer was posted in which ring slot, and the tx packets in flight",
        "the negotiated features (sg, gso, split event channels)",
    ),
    frontend_rebuild=(
        "the frontend sees its backend change and goes back through the handshake: new rings, "
        "grants and ports, every rx buffer posted again; tx packets in flight are lost, as on a real "
        "network (counted as dropped), and the guest's TCP/IP stack retransmits; the guest's "
        "interface announces itself again with a gratuitous ARP"
    ),
    backend_outside_ram=(
        "its TAP device or learning-switch port, and the frames queued for the guest",
        "grant mappings of the rings (dom0) or its bounce pages (driver domain)",
        "its event-channel ports and its counters",
    ),
    backend_rebuild=(
        "none moves: the old backend is torn down with its domain (its TAP vanishes with its "
        "descriptor), and the destination's backend starts fresh from the backend directory the "
        "toolstack writes, counters from zero"
    ),
)
