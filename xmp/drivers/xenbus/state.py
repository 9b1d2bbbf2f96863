"""The xenbus state machine (``xen/include/public/io/xenbus.h``), sans I/O.

Each end of a split device publishes its state in its own xenstore
directory (``state``) and reacts to the other end's.  The handshake of
``docs/misc/xenstore-paths`` / XEN-REFERENCE §7::

    toolstack  writes both directories, both ends Initialising (1)
    backend    publishes its feature-* keys                      -> InitWait (2)
    frontend   reads them, allocates ring and event channel,
               publishes ring-ref / event-channel / protocol     -> Initialised (3)
    backend    maps the ring, binds the event channel            -> Connected (4)
    frontend                                                     -> Connected (4)

Closing: either end goes Closing (5); the other disconnects and both end
Closed (6).  Reconnection: when the other end starts over (Initialising or
InitWait after having been connected, e.g. a backend domain restarted),
this end disconnects and goes through the handshake again -- the guest's
device comes back without the guest restarting.

``frontend_step`` and ``backend_step`` map (this end's state, the other
end's state) to the actions to take, from tables; the runner performs
them.  Unlisted pairs need nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class XenbusState(enum.IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


class Act(enum.Enum):
    PUBLISH_FEATURES = "publish-features"   # backend: write feature-* keys
    SETUP = "setup"                          # frontend: read features, make ring + evtchn, publish them
    CONNECT = "connect"                      # backend: map the ring, bind the evtchn
    CONNECTED = "connected"                  # frontend: the device is usable
    DISCONNECT = "disconnect"                # either: drop ring / evtchn / in-flight bookkeeping


@dataclass(frozen=True)
class Step:
    actions: tuple[Act, ...]
    switch_to: XenbusState | None


S = XenbusState
NOTHING = Step((), None)

# (backend state, frontend state) -> what the backend does
_BACKEND: dict[tuple[S, S], Step] = {
    (S.INITIALISING, S.INITIALISING): Step((Act.PUBLISH_FEATURES,), S.INIT_WAIT),
    (S.INITIALISING, S.UNKNOWN): Step((Act.PUBLISH_FEATURES,), S.INIT_WAIT),
    # a frontend that got ahead (it may skip waiting): features first, then connect
    (S.INITIALISING, S.INITIALISED): Step((Act.PUBLISH_FEATURES,), S.INIT_WAIT),
    (S.INITIALISING, S.CONNECTED): Step((Act.PUBLISH_FEATURES,), S.INIT_WAIT),
    (S.INIT_WAIT, S.INITIALISED): Step((Act.CONNECT,), S.CONNECTED),
    # (INIT_WAIT, CONNECTED) waits: a frontend still Connected is connected to a
    # previous backend (this one is a restart); it starts over and comes back Initialised
    # the frontend started over (reconnecting, or a new frontend): handshake again
    (S.CONNECTED, S.INITIALISING): Step((Act.DISCONNECT, Act.PUBLISH_FEATURES), S.INIT_WAIT),
    # (CONNECTED, INITIALISED) needs nothing: watch events are not one per change,
    # and a frontend that really starts over passes through Initialising first
    (S.CLOSED, S.INITIALISING): Step((Act.PUBLISH_FEATURES,), S.INIT_WAIT),
    (S.CLOSED, S.INITIALISED): Step((Act.PUBLISH_FEATURES,), S.INIT_WAIT),
    (S.CLOSING, S.INITIALISING): Step((Act.PUBLISH_FEATURES,), S.INIT_WAIT),
}
for _mine in (S.INIT_WAIT, S.CONNECTED):
    _BACKEND[(_mine, S.CLOSING)] = Step((Act.DISCONNECT,), S.CLOSING)
    _BACKEND[(_mine, S.CLOSED)] = Step((Act.DISCONNECT,), S.CLOSED)
_BACKEND[(S.CLOSING, S.CLOSED)] = Step((), S.CLOSED)
_BACKEND[(S.CLOSING, S.CLOSING)] = Step((), S.CLOSED)

# (frontend state, backend state) -> what the frontend does
_FRONTEND: dict[tuple[S, S], Step] = {
    (S.INITIALISING, S.INIT_WAIT): Step((Act.SETUP,), S.INITIALISED),
    (S.INITIALISED, S.CONNECTED): Step((Act.CONNECTED,), S.CONNECTED),
    # the backend started over (its domain restarted): handshake again
    (S.CONNECTED, S.INIT_WAIT): Step((Act.DISCONNECT, Act.SETUP), S.INITIALISED),
    (S.CONNECTED, S.INITIALISING): Step((Act.DISCONNECT,), S.INITIALISING),
    # the backend vanished (its domain died): drop the connection and wait for one
    (S.CONNECTED, S.UNKNOWN): Step((Act.DISCONNECT,), S.INITIALISING),
    (S.INITIALISED, S.UNKNOWN): Step((Act.DISCONNECT,), S.INITIALISING),
    (S.INITIALISING, S.INITIALISING): NOTHING,
    (S.CLOSED, S.INIT_WAIT): Step((Act.SETUP,), S.INITIALISED),
    (S.INITIALISED, S.INIT_WAIT): NOTHING,  # waiting for the backend to connect
}
for _mine in (S.INITIALISING, S.INITIALISED, S.CONNECTED):
    _FRONTEND[(_mine, S.CLOSING)] = Step((Act.DISCONNECT,), S.CLOSED)
    _FRONTEND[(_mine, S.CLOSED)] = Step((Act.DISCONNECT,), S.CLOSED)
# this end asked to close: once the backend follows, it is closed
_FRONTEND[(S.CLOSING, S.CLOSING)] = Step((), S.CLOSED)
_FRONTEND[(S.CLOSING, S.CLOSED)] = Step((), S.CLOSED)


def backend_step(mine: XenbusState, frontend: XenbusState) -> Step:
    return _BACKEND.get((mine, frontend), NOTHING)


def frontend_step(mine: XenbusState, backend: XenbusState) -> Step:
    return _FRONTEND.get((mine, backend), NOTHING)


def parse_state(raw: bytes | None) -> XenbusState:
    """A ``state`` node's value; anything unreadable is UNKNOWN (a peer's
    garbage must not crash us)."""
    try:
        return XenbusState(int(raw or b"0"))
    except ValueError:
        return XenbusState.UNKNOWN
