"""netback's learning switch and the flow hash, without processes."""

from __future__ import annotations

from xmp.drivers.net.packets import flow_hash
from xmp.drivers.net.switch import LearningSwitch, SwitchPort


class Port(SwitchPort):
    def __init__(self, name: str):
        self.name = name
        self.got: list[bytes] = []

    def deliver(self, frame: bytes, gso=None) -> None:
        self.got.append(frame)


def mac(n: int) -> bytes:
    return bytes([0, 0x16, 0x3E, 0, 0, n])


def frame(dst: bytes, src: bytes, body: bytes = b"x") -> bytes:
    return dst + src + b"\x88\xb5" + body


def test_unknown_unicast_floods_then_the_switch_learns():
    sw = LearningSwitch("br")
    a, b, c = Port("a"), Port("b"), Port("c")
    for p in (a, b, c):
        sw.join(p)
    sw.forward(a, frame(mac(2), mac(1)))           # b unknown yet: to b and c, never back to a
    assert len(b.got) == len(c.got) == 1 and a.got == []
    sw.forward(b, frame(mac(1), mac(2)))           # a was learnt: to a alone
    assert len(a.got) == 1 and len(c.got) == 1
    sw.forward(a, frame(mac(2), mac(1)))           # and b now too
    assert len(b.got) == 2 and len(c.got) == 1


def test_broadcast_floods_and_a_port_that_leaves_is_forgotten():
    sw = LearningSwitch("br")
    a, b = Port("a"), Port("b")
    sw.join(a)
    sw.join(b)
    sw.forward(b, frame(b"\xff" * 6, mac(2)))
    assert len(a.got) == 1 and b.got == []
    sw.leave(b)
    assert mac(2) not in sw.fdb and sw.ports == [a]
    sw.forward(a, frame(mac(2), mac(1)))           # nobody else: nowhere to go
    assert b.got == []


def test_invented_source_macs_cannot_grow_the_table_without_bound():
    sw = LearningSwitch("br")
    a, b = Port("a"), Port("b")
    sw.join(a)
    sw.join(b)
    for i in range(3 * LearningSwitch.MAX_FDB):
        sw.forward(a, frame(mac(9), b"\x02" + i.to_bytes(5, "big")))  # unicast, locally administered
    assert len(sw.fdb) <= LearningSwitch.MAX_FDB


def test_flow_hash_keeps_a_flow_together_and_tells_flows_apart():
    ip = bytes.fromhex("450000280000000040110000") + bytes([10, 0, 0, 1, 10, 0, 0, 2])

    def udp(sport: int, payload: bytes) -> bytes:
        return mac(2) + mac(1) + b"\x08\x00" + ip + sport.to_bytes(2, "big") + b"\x00\x09" + payload

    assert flow_hash(udp(1000, b"a")) == flow_hash(udp(1000, b"something else"))
    assert len({flow_hash(udp(p, b"")) % 4 for p in range(1000, 1064)}) >= 3
    assert flow_hash(frame(mac(2), mac(1), b"a")) == flow_hash(frame(mac(2), mac(1), b"b"))
