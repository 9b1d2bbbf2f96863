"""The migration channel over real sockets: only a peer holding the key
gets anything, and every bad peer is refused, logged, and the listener
keeps serving the next one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest
from xmphost import ENV, HOST, XMP

from xmp.errors import LocalError
from xmp.migration.channel import (
    MigrationListener,
    MigrationRefused,
    connect,
    generate_key,
    load_key,
)

pytestmark = pytest.mark.timeout(60)
KEY = b"s" * 32


class Rig:
    """A listener on loopback that echoes each frame of an authenticated peer."""

    def __init__(self, **kw):
        self.logs: list[str] = []
        self.sessions = 0

        def echo(session):
            self.sessions += 1
            while (frame := session.recv()) is not None:
                session.send(b"echo:" + frame)

        self.listener = MigrationListener("127.0.0.1:0", KEY, echo, self.logs.append, **kw)
        self.address = self.listener.address_text

    def served_ok(self) -> bool:
        with connect(self.address, KEY) as s:
            s.send(b"hello")
            return s.recv() == b"echo:hello"

    def wait_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.logs:
                if text in line:
                    return line
            time.sleep(0.01)
        raise AssertionError(f"no log line with {text!r}: {self.logs}")


@pytest.fixture
def rig():
    r = Rig(handshake_timeout=0.5, max_pending=4)
    yield r
    r.listener.close()


def test_a_peer_with_the_key_talks_in_authenticated_frames(rig):
    assert rig.served_ok()
    assert rig.listener.accepted == 1 and rig.listener.refused == 0
    rig.wait_log("authenticated")


def test_a_wrong_key_gets_nothing_and_the_listener_goes_on(rig):
    with pytest.raises(MigrationRefused, match="does not hold our key"):
        connect(rig.address, b"w" * 32)
    # a client that skips checking the server and sends a made-up proof
    with socket.create_connection(rig.listener.address) as raw:
        raw.sendall(b"XMPMIG01" + os.urandom(32))
        assert len(raw.recv(100)) == 72  # the challenge, and nothing more
        raw.sendall(os.urandom(32))
        assert raw.recv(100) == b""  # closed without a frame
    rig.wait_log("client does not hold our key")
    assert rig.sessions == 0
    assert rig.served_ok()


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01",
                                     bytes(range(200))], ids=["http", "tls", "binary"])
def test_garbage_is_refused_and_logged(rig, garbage):
    with socket.create_connection(rig.listener.address) as raw:
        raw.sendall(garbage)
        assert raw.recv(100) == b""
    rig.wait_log("refused 127.0.0.1")
    assert rig.sessions == 0 and rig.served_ok()


def test_silence_and_a_slow_trickle_are_cut_off_at_the_handshake_deadline(rig):
    silent = socket.create_connection(rig.listener.address)
    slow = socket.create_connection(rig.listener.address)
    try:
        for b in b"XMPMIG01"[:4]:  # slowloris: a byte at a time, never finishing in time
            slow.sendall(bytes([b]))
            time.sleep(0.15)
        rig.wait_log("no handshake within 0.5 s")
        assert silent.recv(100) == b"" and slow.recv(100) == b""
    finally:
        silent.close()
        slow.close()
    assert rig.served_ok()


def test_a_flood_of_half_open_handshakes_is_bounded(rig):
    socks = [socket.create_connection(rig.listener.address) for _ in range(4)]
    try:
        time.sleep(0.05)  # let the listener accept the four
        extra = socket.create_connection(rig.listener.address)
        assert extra.recv(100) == b""
        extra.close()
        rig.wait_log("4 handshakes already in progress")
    finally:
        for s in socks:
            s.close()
    rig.wait_log("closed the connection during the handshake")
    assert rig.served_ok()


def test_many_peers_at_once_each_get_their_own_session():
    rig = Rig(max_pending=16)
    results = []

    def one(i):
        with connect(rig.address, KEY) as s:
            s.send(str(i).encode())
            results.append(s.recv() == b"echo:" + str(i).encode())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rig.listener.close()
    assert results == [True] * 8 and rig.sessions == 8


def test_key_files_are_checked_like_ssh_keys(tmp_path):
    path = tmp_path / "host.key"
    generate_key(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600" and len(load_key(path)) == 65
    with pytest.raises(FileExistsError):
        generate_key(path)
    path.chmod(0o644)
    with pytest.raises(LocalError, match="readable by others"):
        load_key(path)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 8)
    short.chmod(0o600)
    with pytest.raises(LocalError, match="8 bytes"):
        load_key(short)
    with pytest.raises(LocalError, match="No such file"):
        load_key(tmp_path / "none")


def test_a_host_with_migrate_listens_and_answers_only_the_key_holder(hosts, tmp_path):
    keyfile = tmp_path / "lab.key"
    generate_key(keyfile)
    h = hosts(HOST.replace("[host]\n", f'[host]\nmigrate = "127.0.0.1:0"\nmigrate_key = "{keyfile}"\n'))
    h.start()
    address = h.wait(lambda: (h.rundir / "migrate.address").exists()
                     and (h.rundir / "migrate.address").read_text().strip(), 10, "the listener's address")
    with pytest.raises(MigrationRefused):
        connect(address, b"x" * 32)
    with connect(address, load_key(keyfile)) as s:
        answer = json.loads(s.recv()[1:])   # a control frame ("J" + JSON): the receiver greets first
    assert answer["op"] == "hello" and answer["host"]
    log = (h.rundir / "logs" / "hypervisor.log").read_text()
    assert f"listening for migrations on {address}" in log
    h.wait(lambda: "authenticated" in (h.rundir / "logs" / "hypervisor.log").read_text(), 10, "the log")
    assert h.stop() == 0
    h.assert_clean()
    with pytest.raises(OSError):
        connect(address, load_key(keyfile), timeout=2)  # nothing listens once it stopped


def test_a_host_whose_key_others_can_read_does_not_start(tmp_path):
    keyfile = tmp_path / "lab.key"
    generate_key(keyfile)
    keyfile.chmod(0o644)
    topo = tmp_path / "lab.toml"
    topo.write_text(HOST.replace("[host]\n", f'[host]\nmigrate = "127.0.0.1:0"\nmigrate_key = "{keyfile}"\n'))
    out = subprocess.run([*XMP, "run", "--rundir", str(tmp_path / "run"), str(topo)], capture_output=True,
                         text=True, timeout=30, env=ENV, check=False)
    assert out.returncode != 0 and "readable by others (mode 644); chmod 600 it" in out.stderr
    assert not (tmp_path / "run").exists()  # refused before anything started
