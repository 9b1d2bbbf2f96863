"""Console and xenstore byte rings (io/console.h, io/xs_wire.h)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmp.errors import RemoteProtocolError
from xmp.sharedmem.bytering import (
    CONSOLE_IN,
    CONSOLE_OUT,
    XENSTORE_REQ,
    XENSTORE_RSP,
    XS_EVTCHN_PORT,
    XS_SERVER_FEATURES,
    console_rings,
    xenstore_rings,
)


def test_console_layout_matches_xencons_interface():
    # char in[1024]; char out[2048]; in_cons, in_prod, out_cons, out_prod
    assert (CONSOLE_IN.data, CONSOLE_IN.size) == (0, 1024)
    assert (CONSOLE_OUT.data, CONSOLE_OUT.size) == (1024, 2048)
    assert (CONSOLE_IN.cons, CONSOLE_IN.prod, CONSOLE_OUT.cons, CONSOLE_OUT.prod) == (3072, 3076, 3080, 3084)


def test_xenstore_layout_matches_xenstore_domain_interface():
    assert (XENSTORE_REQ.data, XENSTORE_RSP.data, XENSTORE_REQ.size) == (0, 1024, 1024)
    indices = (XENSTORE_REQ.cons, XENSTORE_REQ.prod, XENSTORE_RSP.cons, XENSTORE_RSP.prod)
    assert indices == (2048, 2052, 2056, 2060)
    assert (XS_SERVER_FEATURES, XS_EVTCHN_PORT) == (2064, 2076)


def test_console_out_bytes_and_indices_in_the_page():
    page = bytearray(4096)
    _in, out = console_rings(page)
    assert out.write(b"hello") == 5
    assert page[1024:1029] == b"hello"
    assert struct.unpack_from("<II", page, 3080) == (0, 5)
    assert out.read() == b"hello"
    assert struct.unpack_from("<II", page, 3080) == (5, 5)


def test_full_ring_takes_only_what_fits_and_wraps():
    page = bytearray(4096)
    req, rsp = xenstore_rings(page)
    assert req.write(b"a" * 1000) == 1000
    assert req.write(b"b" * 100) == 24  # 1024 - 1000
    assert req.space() == 0 and req.available() == 1024
    assert req.read(1000) == b"a" * 1000
    assert req.write(b"c" * 50) == 50  # wraps to the start of req[]
    assert page[0:26] == b"c" * 26
    assert req.read() == b"b" * 24 + b"c" * 50


def test_hostile_indices_raise_remote_error():
    page = bytearray(4096)
    _in, out = console_rings(page)
    struct.pack_into("<II", page, 3080, 0, 5000)  # out_prod - out_cons > 2048
    with pytest.raises(RemoteProtocolError, match="console out"):
        out.read()
    with pytest.raises(RemoteProtocolError):
        out.write(b"x")
    with pytest.raises(RemoteProtocolError):
        out.available()


@given(start=st.integers(0, 2**32 - 1),
       chunks=st.lists(st.binary(min_size=0, max_size=700), min_size=1, max_size=30),
       reads=st.lists(st.integers(1, 1024), min_size=1, max_size=30))
@settings(max_examples=100, deadline=None)
def test_stream_survives_any_chunking_and_the_u32_wrap(start, chunks, reads):
    page = bytearray(4096)
    struct.pack_into("<II", page, XENSTORE_RSP.cons, start, start)
    _req, rsp = xenstore_rings(page)
    sent, got = b"".join(chunks), bytearray()
    pending = sent
    i = 0
    while len(got) < len(sent):
        if pending:
            pending = pending[rsp.write(pending):]
        got += rsp.read(reads[i % len(reads)])
        i += 1
    assert bytes(got) == sent


def test_a_writer_that_filled_the_ring_during_a_read_is_noticed():
    page = bytearray(4096)
    req, _rsp = xenstore_rings(page)
    req.write(b"a" * 100)
    data, waits = req.read_and_check_room()
    assert data == b"a" * 100 and not waits          # never full: nobody waits
    req.write(b"b" * 1024)                            # full
    data, waits = req.read_and_check_room(10)
    assert waits                                      # the writer may be blocked on a full ring
    assert req.read_and_check_room(0) == (b"", False)  # nothing read: nothing to report
