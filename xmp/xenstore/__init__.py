"""xenstore: the wire protocol, the tree and the server, all sans-I/O.

``wire`` frames packets (io/xs_wire.h), ``store`` holds the tree with its
permissions and transactions, ``server`` answers requests the way C
xenstored does.  The daemon that moves bytes lives elsewhere.
"""

from xmp.xenstore.server import Action, Close, Connection, Introduce, Quota, Release, XenStore
from xmp.xenstore.wire import (
    HEADER_SIZE,
    XENSTORE_PAYLOAD_MAX,
    Packet,
    PacketParser,
    WireError,
    XsType,
    error_packet,
    ok_packet,
    watch_event,
)

__all__ = [
    "HEADER_SIZE",
    "XENSTORE_PAYLOAD_MAX",
    "Action",
    "Close",
    "Connection",
    "Introduce",
    "Packet",
    "PacketParser",
    "Quota",
    "Release",
    "WireError",
    "XenStore",
    "XsType",
    "error_packet",
    "ok_packet",
    "watch_event",
]
