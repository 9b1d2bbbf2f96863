"""The key-value server's RAM table and line protocol, as a pure core over
a bytearray: a dict is the model it must agree with."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmp.errors import LocalError
from xmp.guests.kvtable import KvTable, TableFull, answer, table_bytes

pytestmark = pytest.mark.timeout(60)

keys = st.binary(min_size=1, max_size=8)
ops = st.lists(st.tuples(st.sampled_from(["put", "del", "get"]), keys, st.binary(max_size=16)), max_size=200)


def table(nslots: int = 16, key_max: int = 8, value_max: int = 16) -> tuple[KvTable, memoryview]:
    buf = memoryview(bytearray(table_bytes(nslots, key_max, value_max)))
    return KvTable.format(buf, nslots, key_max, value_max), buf


@settings(max_examples=300, deadline=None)
@given(nslots=st.integers(2, 24), ops=ops)
def test_the_table_agrees_with_a_dict_and_reattaches_to_the_same_bytes(nslots, ops):
    t, buf = table(nslots)
    model: dict[bytes, bytes] = {}
    for op, key, value in ops:
        if op == "put":
            if key not in model and len(model) >= t.limit:
                with pytest.raises(TableFull):
                    t.put(key, value)
            else:
                assert t.put(key, value) == (key not in model)
                model[key] = value
        elif op == "del":
            assert t.delete(key) == (model.pop(key, None) is not None)
        else:
            assert t.get(key) == model.get(key)
        assert len(t) == len(model)
    # what a restored guest sees: the same bytes, attached afresh
    again = KvTable.attach(memoryview(bytearray(buf)))
    assert dict(again.items()) == model
    assert all(again.get(k) == v for k, v in model.items())


def test_colliding_keys_all_live_on_one_chain_and_a_delete_keeps_the_rest_reachable():
    t, _ = table(16)
    t._home = lambda key: 5      # every key hashes to one slot: the worst chain
    for i in range(t.limit):
        t.put(b"k%d" % i, b"v%d" % i)
    assert t.delete(b"k3") and t.get(b"k3") is None
    assert [t.get(b"k%d" % i) for i in range(4, t.limit)] == [b"v%d" % i for i in range(4, t.limit)]
    assert t.put(b"new", b"x") and t.get(b"new") == b"x"    # into k3's tombstone
    with pytest.raises(TableFull, match="holds 14 keys"):
        t.put(b"one-more", b"")
    assert t.put(b"k0", b"changed") is False and t.get(b"k0") == b"changed"  # full, an update still goes


def test_tombstones_are_cleared_by_a_rebuild_without_losing_a_key():
    t, _ = table(16)
    for round_ in range(50):            # far more deletes than slots
        t.put(b"stay", b"%d" % round_)
        t.put(b"go%d" % round_, b"x")
        assert t.delete(b"go%d" % round_)
    assert len(t) == 1 and t.get(b"stay") == b"49" and t._tombs <= t.limit


def test_hash_salt_is_per_table_and_kept_in_ram():
    a, buf = table(1024)
    b, _ = table(1024)
    assert a.salt != b.salt
    assert KvTable.attach(buf)._home(b"key") == a._home(b"key")


def test_sizes_are_bounded():
    t, _ = table()
    with pytest.raises(LocalError, match="a key is 1..8 bytes, not 9"):
        t.put(b"123456789", b"")
    with pytest.raises(LocalError, match="a value is at most 16 bytes, not 17"):
        t.put(b"k", b"v" * 17)
    with pytest.raises(LocalError, match="a key is 1..8 bytes, not 0"):
        t.get(b"")


@pytest.mark.parametrize("mangle, why", [
    (lambda b: b.__setitem__(slice(0, 8), b"NOTKV\0\0\1"), "magic"),
    (lambda b: b.__setitem__(slice(8, 12), (1 << 20).to_bytes(4, "little")), "does not fit"),  # nslots
    (lambda b: b.__setitem__(slice(12, 16), (7).to_bytes(4, "little")), "does not fit"),       # slot size
    (lambda b: b.__setitem__(slice(24, 28), (99).to_bytes(4, "little")), "does not fit"),      # count
])
def test_attach_checks_the_header_as_fresh_input(mangle, why):
    _, buf = table()
    raw = bytearray(buf)
    mangle(raw)
    with pytest.raises(LocalError, match=why):
        KvTable.attach(memoryview(raw))
    with pytest.raises(LocalError, match="needs 64 bytes"):
        KvTable.attach(memoryview(bytearray(10)))


def test_a_slot_claiming_a_long_key_is_an_error_answer_not_a_crash():
    t, buf = table(4)
    t._home = lambda key: 0
    buf[64:66] = bytes([1, 200])   # slot 0: FULL, with a key of 200 bytes in an 8-byte field
    assert answer(t, b"GET k") == b"ERR kv slot 0 claims a key of 200 bytes\n"


def test_the_protocol_answers():
    t, _ = table()
    script = [(b"PUT a 1 2 3", b"OK\n"), (b"GET a", b"OK 1 2 3\n"), (b"PUT a \xff\x00", b"OK\n"),
              (b"GET a\r", b"OK \xff\x00\n"), (b"COUNT", b"OK 1\n"), (b"DEL a", b"OK\n"),
              (b"DEL a", b"ERR nokey\n"), (b"GET a", b"ERR nokey\n"), (b"PUT e ", b"OK\n"),
              (b"GET e", b"OK \n"), (b"PUT a", b"ERR usage: PUT <key> <value>\n"),
              (b"PUT a b\rc", b"ERR usage: PUT <key> <value>\n"), (b"GET", b"ERR usage: GET <key>\n"),
              (b"get a", b"ERR unknown request\n"), (b"COUNT x", b"ERR unknown request\n"),
              (b"", b"ERR unknown request\n")]
    assert [answer(t, line) for line, _ in script] == [want for _, want in script]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=30))
def test_no_request_line_makes_answer_raise(lines):
    t, _ = table()
    for line in lines:
        reply = answer(t, line.replace(b"\n", b""))
        assert reply.endswith(b"\n") and reply.count(b"\n") == 1 and reply[:2] in (b"OK", b"ER")
