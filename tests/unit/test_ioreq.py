"""The ioreq core against ioreq.h: the layout of ioreq_t and buf_ioreq_t,
the slot's state machine, the buffered ring."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from xmp.errors import LocalError, RemoteProtocolError
from xmp.hvm.ioreq import (
    IOREQ_BUFFER_SLOT_NUM,
    IOREQ_READ,
    IOREQ_SIZE,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_PIO,
    IOREQ_WRITE,
    TRANSITIONS,
    BufferedIoPage,
    Ioreq,
    IoreqSlot,
    IoreqState,
    ones,
    pack_ioreq,
    unpack_ioreq,
)

pytestmark = pytest.mark.timeout(60)


def test_ioreq_t_layout_is_ioreq_h():
    """32 bytes: addr, data, count, size, vp_eport, pad, the state/dir byte
    (state:4, data_is_ptr:1, dir:1, df:1), type -- as GCC lays out the C struct."""
    buf = bytearray(IOREQ_SIZE)
    pack_ioreq(buf, 0, Ioreq(0x3F8, 0x41, 1, 1, 7, IoreqState.READY, True, IOREQ_READ, True, IOREQ_TYPE_COPY))
    assert struct.unpack("<QQIIIH", buf[:30]) == (0x3F8, 0x41, 1, 1, 7, 0)
    assert buf[30] == 0b0111_0001 and buf[31] == IOREQ_TYPE_COPY
    assert unpack_ioreq(buf).state == IoreqState.READY and unpack_ioreq(buf).dir == IOREQ_READ


def test_buf_ioreq_t_layout_is_ioreq_h():
    """type:8, pad:1, dir:1, size:2 (log2), addr:20, then data; 8 bytes wide
    take two slots (the high half second); write_pointer at 4, slots from 8."""
    page = bytearray(4096)
    ring = BufferedIoPage(page)
    assert ring.push(0x1F0, 2, 0xBEEF)
    assert struct.unpack_from("<II", page, 0) == (0, 1)
    word, data = struct.unpack_from("<II", page, 8)
    assert word == IOREQ_TYPE_PIO | (IOREQ_WRITE << 9) | (1 << 10) | (0x1F0 << 12) and data == 0xBEEF
    assert ring.push(0xA0000, 8, 0x1122334455667788, IOREQ_TYPE_COPY)
    assert struct.unpack_from("<II", page, 0) == (0, 3)
    assert struct.unpack_from("<I", page, 20)[0] == 0x55667788      # slot 1's data: the low half
    assert struct.unpack_from("<I", page, 28)[0] == 0x11223344      # slot 2's: the high half
    got = ring.pop_all()
    assert [(r.addr, r.size, r.data, r.type) for r in got] == \
        [(0x1F0, 2, 0xBEEF, IOREQ_TYPE_PIO), (0xA0000, 8, 0x1122334455667788, IOREQ_TYPE_COPY)]
    assert struct.unpack_from("<II", page, 0) == (3, 3)


def test_buffered_ring_refuses_what_it_cannot_hold():
    ring = BufferedIoPage(bytearray(4096))
    assert not ring.push(1 << 20, 1, 0)       # past addr:20: sent synchronously instead
    assert not ring.push(0x10, 3, 0)          # no such size
    for i in range(IOREQ_BUFFER_SLOT_NUM):
        assert ring.push(0x80, 1, i & 0xFF)
    assert not ring.push(0x80, 1, 0)          # full
    assert [r.data for r in ring.pop_all()] == [i & 0xFF for i in range(IOREQ_BUFFER_SLOT_NUM)]


def test_scribbled_buffer_pointers_are_a_remote_fault_and_the_ring_recovers():
    page = bytearray(4096)
    struct.pack_into("<II", page, 0, 5, 5 + 2000)
    ring = BufferedIoPage(page)
    with pytest.raises(RemoteProtocolError, match="2000 pending"):
        ring.pop_all()
    assert ring.pop_all() == [] and ring.push(0x80, 1, 9) and [r.data for r in ring.pop_all()] == [9]


def test_a_round_trip_walks_none_ready_inprocess_resp_ready_none():
    page = bytearray(4096)
    struct.pack_into("<I", page, IOREQ_SIZE + 24, 42)      # vp_eport of vCPU 1, set by the hypervisor
    vcpu, dm = IoreqSlot(page, 1), IoreqSlot(page, 1)
    assert vcpu.state == IoreqState.NONE and dm.take() is None
    vcpu.send(0x71, 1, IOREQ_READ)
    assert vcpu.state == IoreqState.READY
    req = dm.take()
    assert req is not None and (req.addr, req.size, req.dir, req.vp_eport) == (0x71, 1, IOREQ_READ, 42)
    assert vcpu.state == IoreqState.INPROCESS
    dm.complete(0x59)
    assert vcpu.state == IoreqState.IORESP_READY
    assert vcpu.finish() == 0x59 and vcpu.state == IoreqState.NONE
    assert IoreqSlot(page, 0).state == IoreqState.NONE     # slot 0 untouched


OPS = st.sampled_from(sorted(TRANSITIONS))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(OPS, st.integers(0, 3)), max_size=40), st.integers(0, 7))
def test_the_state_machine_allows_exactly_ioreq_h_transitions(ops, vcpu):
    """Any sequence of operations by either side: each succeeds exactly when
    the slot is in the operation's "before" state, and then leaves it in the
    "after" state; otherwise it fails and changes nothing (the other bits of
    the state byte included)."""
    page = bytearray(4096)
    page[vcpu * IOREQ_SIZE + 30] = 0xE0   # dir/df/pad bits set: the state nibble alone moves
    slot = IoreqSlot(page, vcpu)
    state = IoreqState.NONE
    for op, _ in ops:
        before, after = TRANSITIONS[op]
        snapshot = bytes(page)
        try:
            if op == "send":
                slot.send(0x3F8, 1, IOREQ_WRITE, 0x41)
            elif op == "take":
                if slot.take() is None:
                    raise LocalError("nothing ready")
            elif op == "complete":
                slot.complete(7)
            else:
                slot.finish()
        except LocalError:
            assert state != before
            assert bytes(page) == snapshot
            continue
        assert state == before
        state = after
        assert slot.state == state
    assert {IoreqSlot(page, v).state for v in range(8) if v != vcpu} == {IoreqState.NONE}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, (1 << 20) - 1), st.sampled_from([1, 2, 4, 8]),
                          st.integers(0, (1 << 64) - 1)), max_size=600),
       st.integers(0, (1 << 32) - 1))
# at the wrap: an 8-byte write's halves, and queued writes the restarted slot index would overwrite
@example(writes=[(0, 1, 0), (0, 8, 1 << 32)], start=(1 << 32) - 2)
@example(writes=[(i, 1, i & 0xFF) for i in range(80)], start=(1 << 32) - 20)
def test_buffered_writes_come_out_in_order_across_pointer_wrap(writes, start):
    page = bytearray(4096)
    struct.pack_into("<II", page, 0, start, start)
    ring = BufferedIoPage(page)
    queued = []
    for addr, size, data in writes:
        if ring.push(addr, size, data & ones(size)):
            queued.append((addr, size, data & ones(size)))
        else:
            assert [(r.addr, r.size, r.data) for r in ring.pop_all()] == queued
            queued = []
            assert ring.push(addr, size, data & ones(size))
            queued.append((addr, size, data & ones(size)))
    assert [(r.addr, r.size, r.data) for r in ring.pop_all()] == queued


@given(st.binary(min_size=IOREQ_SIZE, max_size=IOREQ_SIZE))
def test_any_slot_bytes_decode_and_validate_without_raising(raw):
    req = unpack_ioreq(raw)
    assert req.valid() is None or isinstance(req.valid(), str)
    assert 0 <= req.state <= 15
