"""The xenbus state machine, both ends run against each other in memory."""

from __future__ import annotations

from xmp.drivers.xenbus.state import Act, XenbusState, backend_step, frontend_step, parse_state

S = XenbusState


class Pair:
    """Two ends that see each other's state, as through xenstore."""

    def __init__(self):
        self.front = S.INITIALISING
        self.back = S.INITIALISING
        self.log: list[tuple[str, Act]] = []

    def settle(self, limit: int = 20) -> None:
        for _ in range(limit):
            moved = False
            b = backend_step(self.back, self.front)
            self.log += [("back", a) for a in b.actions]
            if b.switch_to is not None and b.switch_to != self.back:
                self.back, moved = b.switch_to, True
            f = frontend_step(self.front, self.back)
            self.log += [("front", a) for a in f.actions]
            if f.switch_to is not None and f.switch_to != self.front:
                self.front, moved = f.switch_to, True
            if not moved:
                return
        raise AssertionError("the two ends never settle")


def test_state_numbers_are_xens():
    assert [int(s) for s in S] == list(range(9))
    assert S.INIT_WAIT == 2 and S.RECONFIGURED == 8


def test_handshake_reaches_connected_in_xens_order():
    p = Pair()
    p.settle()
    assert (p.front, p.back) == (S.CONNECTED, S.CONNECTED)
    assert p.log == [("back", Act.PUBLISH_FEATURES), ("front", Act.SETUP), ("back", Act.CONNECT),
                     ("front", Act.CONNECTED)]


def test_frontend_closing_takes_both_to_closed():
    p = Pair()
    p.settle()
    p.front = S.CLOSING
    p.log.clear()
    p.settle()
    assert (p.front, p.back) == (S.CLOSED, S.CLOSED)
    assert p.log == [("back", Act.DISCONNECT)]


def test_backend_restart_reconnects_the_frontend():
    p = Pair()
    p.settle()
    p.back = S.INITIALISING  # a new backend domain starts the device over
    p.log.clear()
    p.settle()
    assert (p.front, p.back) == (S.CONNECTED, S.CONNECTED)
    assert ("front", Act.DISCONNECT) in p.log and ("front", Act.SETUP) in p.log
    assert ("back", Act.CONNECT) in p.log


def test_frontend_restart_reconnects_the_backend():
    p = Pair()
    p.settle()
    p.front = S.INITIALISING
    p.log.clear()
    p.settle()
    assert (p.front, p.back) == (S.CONNECTED, S.CONNECTED)
    assert p.log[0] == ("back", Act.DISCONNECT)


def test_garbage_state_is_unknown():
    assert parse_state(b"4") == S.CONNECTED
    assert parse_state(b"banana") == S.UNKNOWN
    assert parse_state(b"99") == S.UNKNOWN
    assert parse_state(None) == S.UNKNOWN
