"""The key-value server guest over its vif: its table is in guest RAM, so
``xmp save`` + ``xmp restore`` -- on the same supervisor or on a second
one -- bring back every acknowledged key, byte for byte, and a client
writing during the save loses no acknowledged write."""

from __future__ import annotations

import random
import socket
import threading

import pytest
from test_net_stack import lan
from xmphost import guest

from xmp.drivers.net import tap
from xmp.guests.kvclient import KvClient

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not tap.privileged(),
                                 reason="network namespaces, TAPs and bridges need root")]

KEEP = guest("keep", "idle")   # so the host does not stop when the saved guest goes


def bare(br: str, net: str) -> str:
    return f'[host]\nmemory = 1024\nbridges = {{ {br} = "{net}.1/24" }}\n[dom0]\nmemory = 64\n' + KEEP


def topology(br: str, net: str, **args) -> str:
    return (bare(br, net)
            + guest("kv", "kvserver", 64, args=args or {"port": 7000},
                    vif=[f"mac=00:16:3e:4e:07:02, bridge={br}, ip={net}.2, vifname={br}k"]))


def serving(h) -> int:
    return h.console_log("kv").count("kvserver: serving")


def values(n: int, seed: int) -> dict[bytes, bytes]:
    """``n`` keys with values of every length up to 1024, each of printable bytes and high bytes."""
    rnd = random.Random(seed)
    alphabet = bytes(c for c in range(0x20, 0x100) if c != 0x7f)
    return {b"key-%d-%d" % (seed, i): bytes(rnd.choices(alphabet, k=rnd.randrange(0, 1025)))
            for i in range(n)}


def raw(net: str, data: bytes, want_lines: int) -> list[bytes]:
    with socket.create_connection((f"{net}.2", 7000), timeout=10) as s:
        s.sendall(data)
        buf = b""
        while buf.count(b"\n") < want_lines:
            chunk = s.recv(65536)
            assert chunk, buf
            buf += chunk
    return buf.split(b"\n")[:want_lines]


def test_thousands_of_keys_survive_save_and_restore_here_and_on_a_second_supervisor(hosts, tmp_path):
    br, net = lan()
    h = hosts(topology(br, net), name="one").start(("keep", "kv"))
    h.wait(lambda: serving(h) == 1, 30, "the server serving")
    # hostile and malformed requests: answered ERR, in order, and the server serves on
    got = raw(net, b"HELLO\nPUT nokeyvalue\nGET \x01\nPUT k " + b"v" * 1025 + b"\n"
              + b"x" * 5000 + b"\nDEL never\nPUT ok 1\nGET ok\n", 8)
    assert got == [b"ERR unknown request", b"ERR usage: PUT <key> <value>", b"ERR usage: GET <key>",
                   b"ERR a value is at most 1024 bytes, not 1025", b"ERR line too long",
                   b"ERR nokey", b"OK", b"OK 1"], got
    with socket.create_connection((f"{net}.2", 7000), timeout=10) as s:   # a line that never ends
        s.sendall(b"y" * 200_000)
        assert s.recv(100) == b"ERR line too long\n"
    data = values(3000, 1)
    with KvClient(f"{net}.2", 7000) as c:
        c.delete(b"ok")
        for k, v in data.items():
            c.put(k, v)
        assert c.count() == len(data)
        for gen in (1, 2):
            f = tmp_path / f"kv{gen}.save"
            h.xmp("save", "kv", str(f))
            assert h.info("kv") is None
            if gen == 2:   # brought back by another supervisor: this one goes, bridge and all
                assert h.stop() == 0
                h.assert_clean()
                h = hosts(bare(br, net), name="two").start(("keep",))
                assert h.info("kv") is None
            h.xmp("restore", str(f))
            h.wait(lambda h=h, n=3 - gen: serving(h) == n, 30, "the restored server")
            assert "(restored table, 8192 slots)" in h.console_log("kv").rsplit("kvserver: serving", 1)[1]
            assert c.count() == len(data)
            for k, v in data.items():
                assert c.get(k) == v, k
            assert c.verify() == []
    assert h.stop() == 0
    h.assert_clean()


def test_a_client_writing_during_save_and_restore_loses_no_acknowledged_write(hosts, tmp_path):
    br, net = lan()
    h = hosts(topology(br, net)).start(("keep", "kv"))
    h.wait(lambda: serving(h) == 1, 30, "the server serving")
    c = KvClient(f"{net}.2", 7000, deadline=90)
    stop = threading.Event()
    failed: list[BaseException] = []

    def write() -> None:
        i = 0
        try:
            while not stop.is_set():
                c.put(b"w%d" % i, b"%d" % (i * 7))
                i += 1
        except BaseException as exc:   # seen by the test's thread
            failed.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        h.wait(lambda: len(c.acked) > 200, 30, "writes before the save")
        before = len(c.acked)
        f = tmp_path / "kv.save"
        h.xmp("save", "kv", str(f))
        h.xmp("restore", str(f))
        h.wait(lambda: serving(h) == 2, 30, "the restored server")
        h.wait(lambda: len(c.acked) > before + 200 or failed, 60, "writes after the restore")
    finally:
        stop.set()
        writer.join(100)
    assert not failed, failed
    assert c.retries >= 1            # the save did cut the connection: the client sent again
    with KvClient(f"{net}.2", 7000) as check:
        check.acked, check.unsure = c.acked, c.unsure
        assert check.verify() == []
        assert check.count() in (len(c.acked), len(c.acked) + len(c.unsure))
    c.close()
    assert h.stop() == 0
    h.assert_clean()
