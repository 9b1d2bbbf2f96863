"""What blkfront and blkback keep outside the guest's RAM, and how it is
rebuilt when the guest moves (save/restore, migration)."""

from xmp.devices import MoveState

STATE = MoveState(
    frontend_outside_ram=(
        "the xenbus device and its watches (the guest's xenstore connection)",
        "the shadow of requests in flight (ids, sectors, segments) and their waiters",
        "the grant refs and event-channel ports of its rings and persistent pool",
        "the negotiated features (queues, ring-page-order, persistent, indirect)",
    ),
    frontend_rebuild=(
        "at the suspend the frontend hands the kernel its shadow (each write, discard and flush in "
        "flight; a write's data is in its pool, in RAM); on the new host it is opened afresh, goes "
        "back through the handshake with that host's backend (new rings, ports and grants, features "
        "negotiated again), and issues the shadow's requests again before anything new, so no "
        "acknowledged write is lost and none is applied twice (a re-issued write carries the same "
        "data); a read's waiter does not move, so reads in flight are not carried"
    ),
    backend_outside_ram=(
        "the open image file and its descriptor",
        "grant mappings of the frontend's rings, persistent grants and bounce pages",
        "its event-channel ports and the requests it is serving",
    ),
    backend_rebuild=(
        "none moves: the old backend is torn down with its domain (or the frontend's), and the "
        "destination's backend domain starts fresh from the backend directory the toolstack writes"
    ),
)
