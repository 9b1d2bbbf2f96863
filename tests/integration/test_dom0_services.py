"""dom0's services against hostile and careless peers: a guest that breaks
its console ring, clients that send garbage or never read.  One peer's bad
behaviour costs that peer its connection (logged); dom0 and every other
domain and client go on being served."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import struct
import threading
import time

import pytest
from xmphost import HOST, guest

from xmp.errors import XenStoreError
from xmp.xenstore.client import SocketTransport, XsClient
from xmp.xenstore.wire import Packet, PacketParser, XsType

pytestmark = pytest.mark.timeout(120)


def kernel(name: str, func: str, **extra) -> str:
    text = f'[[domain]]\nname = "{name}"\nkernel = "kernels:{func}"\nmemory = 32\n'
    for key, value in extra.items():
        text += f"{key} = {value}\n"
    return text


def counted(h, name: str) -> int:
    return h.console_log(name).count("count ")


def assert_goes_on(h, name: str, more: int = 5, timeout: float = 10) -> None:
    """``name``'s counter goes on: its console keeps flowing through dom0."""
    n = counted(h, name)
    h.wait(lambda: counted(h, name) >= n + more, timeout, f"{name}'s console to go on")


def xs_read(h, path: str) -> str:
    return h.xmp("xenstore", "read", path, timeout=10).stdout.rstrip("\n")


def connect(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock


def fill(sock: socket.socket, data: bytes, seconds: float = 2.0) -> int:
    """Send as much of ``data`` as the peer takes within ``seconds``, never blocking."""
    sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            break  # it cut us off
    return sent


def closed_by_peer(sock: socket.socket, timeout: float = 20) -> bool:
    """Read (and discard) until the peer closes; False if it never does."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 20):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


# -- 1. a hostile console ring ------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_hostile_console_ring_is_ignored_and_everyone_lives(hosts):
    h = hosts(HOST + kernel("evil", "conshostile")
              + guest("bystander", "counter", args={"count": 0, "interval": 0.05}))
    h.start(("evil", "bystander"))
    h.wait(lambda: h.xmp("xenstore", "read", "/local/domain/1/data/alive", check=False).stdout.strip()
           not in ("", "1", "2"), 20, "the hostile guest to run on")
    h.wait(lambda: "broke the console ring protocol" in h.console_log("evil"), 10, "the console log's note")
    assert "conshostile: breaking my console ring" in h.console_log("evil")
    assert "dom1 (evil) broke the console ring protocol" in h.dmesg()
    assert_goes_on(h, "bystander")
    states = {d["name"]: d["state"] for d in h.list()}
    assert set(states) == {"Domain-0", "evil", "bystander"}
    assert "c" not in states["evil"]
    alive = int(xs_read(h, "/local/domain/1/data/alive"))
    h.wait(lambda: int(xs_read(h, "/local/domain/1/data/alive")) > alive, 10, "the hostile guest to go on")
    assert h.stop() == 0
    h.assert_clean()


# -- console clients ---------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_console_input_for_a_guest_that_reads_late_waits_and_stalls_no_one(hosts):
    """Input typed at a guest that does not read it yet waits for it (bounded,
    the typist feels back-pressure) and none is lost; meanwhile another
    console's attach and input are served at once."""
    n = 300_000
    h = hosts(HOST + kernel("sink", "conssink", args=f"{{ n = {n}, delay = 4 }}") + guest("echo", "echo"))
    h.start(("sink", "echo"))
    h.wait(lambda: "echo: ready" in h.console_log("echo") and "conssink: ready" in h.console_log("sink"),
           10, "the guests")
    data = hashlib.sha256(b"seed").digest() * (n // 32) + b"x" * (n % 32)
    typist = connect(h.rundir / "console" / "1.sock")
    sender = threading.Thread(target=typist.sendall, args=(data,), daemon=True)
    try:
        sender.start()
        time.sleep(0.5)  # let the typing get ahead of the guest (it reads nothing for 4 s)
        start = time.monotonic()
        out = h.xmp("console", "echo", input="hello there\nquit\n", timeout=30)
        assert "echo: hello there" in out.stdout
        assert time.monotonic() - start < 5
        h.wait(lambda: "conssink: got" in h.console_log("sink"), 30, "the sink's report")
        assert f"conssink: got {n} bytes sha256 {hashlib.sha256(data).hexdigest()}" in h.console_log("sink")
        sender.join(10)
    finally:
        typist.close()
    assert h.stop() == 0
    h.assert_clean()


@pytest.mark.timeout(90)
def test_a_console_client_that_never_reads_is_cut_alone(hosts):
    h = hosts(HOST + kernel("loud", "consflood")
              + guest("bystander", "counter", args={"count": 0, "interval": 0.05}))
    h.start(("loud", "bystander"))
    idle = connect(h.rundir / "console" / "1.sock")  # attached, never reads
    try:
        reader = connect(h.rundir / "console" / "1.sock")
        reader.settimeout(10)
        got = 0
        while got < 4 << 20:  # a client that reads is served all along
            got += len(reader.recv(1 << 20))
        reader.close()
        assert_goes_on(h, "bystander")
        assert xs_read(h, "/local/domain/2/name") == "bystander"
        h.wait(lambda: "does not read its output" in h.dmesg(), 20, "the idle client to be cut")
        assert closed_by_peer(idle)
    finally:
        idle.close()
    assert h.stop() == 0
    h.assert_clean()


@pytest.mark.timeout(90)
def test_a_console_client_sending_garbage_and_resetting_costs_only_itself(hosts):
    """Console input is any bytes: a client that types 256 KiB of noise and
    then resets its connection is one more typist; the guest it typed at and
    everyone else go on being served."""
    h = hosts(HOST + guest("target", "echo") + guest("other", "echo"))
    h.start(("target", "other"))
    h.wait(lambda: "echo: ready" in h.console_log("target") and "echo: ready" in h.console_log("other"),
           10, "the guests")
    noisy = connect(h.rundir / "console" / "1.sock")
    try:
        assert fill(noisy, os.urandom(256 << 10) + b"\n", 10) > 0
        noisy.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
    finally:
        noisy.close()
    out = h.xmp("console", "other", input="still here\nquit\n", timeout=30)
    assert "echo: still here" in out.stdout
    h.wait(lambda: "echo: ready" in h.console_log("target"), 5, "the target's log")
    out = h.xmp("console", "target", input="\nafter the noise\nquit\n", timeout=30)  # ends its noisy line
    assert "echo: after the noise" in out.stdout
    assert h.wait_exit(20) == 0  # its last guest quit
    hvlog = (h.rundir / "logs" / "hypervisor.log").read_text(errors="replace")
    assert "xenconsoled" not in hvlog  # nothing failed, nobody was cut for it
    h.assert_clean()


# -- xenstored's socket --------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_xenstored_client_sending_garbage_is_dropped_alone(hosts):
    h = hosts(HOST + guest("g", "counter", args={"count": 0, "interval": 0.05})).start(("g",))
    bad = connect(h.rundir / "xenstored.sock")
    try:
        bad.sendall(struct.pack("<IIII", int(XsType.READ), 1, 0, 100000))  # len past XENSTORE_PAYLOAD_MAX
        assert closed_by_peer(bad, 10)
    finally:
        bad.close()
    h.xmp("xenstore", "write", "/tool/alive", "yes")
    assert xs_read(h, "/tool/alive") == "yes"
    assert_goes_on(h, "g")
    assert h.stop() == 0
    h.assert_clean()


@pytest.mark.timeout(120)
def test_a_xenstored_client_that_never_reads_its_watch_events_is_cut_alone(hosts):
    h = hosts(HOST + guest("g", "counter", args={"count": 0, "interval": 0.05})).start(("g",))
    path = "/tool/w/" + "a" * 2000
    deaf = connect(h.rundir / "xenstored.sock")  # watches, never reads
    deaf.sendall(Packet(int(XsType.WATCH), 1, 0, b"/tool/w\0tok\0").encode())
    xs = XsClient(SocketTransport.connect(str(h.rundir / "xenstored.sock")))
    other = XsClient(SocketTransport.connect(str(h.rundir / "xenstored.sock")))
    try:
        slowest = 0.0
        for i in range(2000):  # ~4 MB of events for the deaf client
            xs.write(path, str(i))
            if i % 50 == 0:
                start = time.monotonic()
                assert other.read("/local/domain/1/name") == b"g"
                slowest = max(slowest, time.monotonic() - start)
        assert slowest < 1.5, f"a request took {slowest:.1f} s"  # a stall was 2 s
        h.wait(lambda: "does not read its replies" in h.dmesg(), 20, "the deaf client to be cut")
        assert closed_by_peer(deaf)
        assert_goes_on(h, "g")
    finally:
        deaf.close()
        xs.close()
        other.close()
    assert h.stop() == 0
    h.assert_clean()


# -- the supervisor's control socket ------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_control_client_that_never_reads_is_cut_alone(hosts):
    h = hosts(HOST + guest("g", "counter", args={"count": 0, "interval": 0.05})).start(("g",))
    deaf = connect(h.rundir / "control.sock")
    try:
        sent = fill(deaf, b'{"cmd": "list"}\n' * 40000, 10)
        assert sent > 100000
        start = time.monotonic()
        assert {d["name"] for d in h.list()} == {"Domain-0", "g"}  # another client is answered
        assert time.monotonic() - start < 10
        assert_goes_on(h, "g")
        h.wait(lambda: "answers unread; disconnected" in h.dmesg(), 30, "the deaf client to be cut")
        assert closed_by_peer(deaf)
    finally:
        deaf.close()
    assert h.stop() == 0
    h.assert_clean()


# -- callers of a stopped xenstored -------------------------------------------------------


@pytest.mark.timeout(90)
def test_with_dom0_stopped_xenstore_callers_time_out(hosts):
    h = hosts(HOST + kernel("t", "xstimeout", args="{ timeout = 2 }")).start(("t",))
    h.wait(lambda: h.xmp("xenstore", "read", "/local/domain/1/data/tick", check=False).returncode == 0,
           20, "the guest's first write")
    dom0 = h.domain_pid("Domain-0")
    os.kill(dom0, signal.SIGSTOP)
    try:
        start = time.monotonic()
        out = h.xmp("xenstore", "read", "/local/domain/1/name", check=False, timeout=20)
        took = time.monotonic() - start
        assert out.returncode == 1
        assert out.stderr.strip().splitlines() == \
            ["xmp: xenstored did not answer within 5 s (is Domain-0 paused?)"]
        assert 4.5 < took < 9
    finally:
        os.kill(dom0, signal.SIGCONT)
    h.wait(lambda: "xstimeout: read back" in h.console_log("t"), 20, "the guest's check after the timeout")
    log = h.console_log("t")
    assert re.search(r"xstimeout: ETIMEDOUT after 2\.\d s", log)
    for got, want in re.findall(r"xstimeout: read back (\S+) for (\S+)", log):
        assert got == want
    assert xs_read(h, "/local/domain/1/name") == "t"
    assert h.stop() == 0
    h.assert_clean()



# -- a console flood ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_console_flood_is_rate_limited_into_a_capped_rotated_log(hosts):
    from xmp.dom0.xenconsoled import LOG_MAX

    h = hosts(HOST + kernel("loud", "consflood")
              + guest("bystander", "counter", args={"count": 0, "interval": 0.05}))
    h.start(("loud", "bystander"))
    log = h.rundir / "console" / "loud.log"
    old = h.rundir / "console" / "loud.log.1"
    h.wait(old.exists, 30, "the first rotation")
    first = old.stat().st_ino
    assert_goes_on(h, "bystander")  # while the flood runs
    h.wait(lambda: old.stat().st_ino != first, 30, "the second rotation")
    h.xmp("pause", "loud")  # hold the files still to read them
    try:
        assert old.stat().st_size <= LOG_MAX
        assert log.stat().st_size <= LOG_MAX
        assert sorted(p.name for p in log.parent.glob("loud.log*")) == ["loud.log", "loud.log.1"]
        text = old.read_bytes() + log.read_bytes()
        numbers = [int(m) for m in re.findall(rb"^flood (\d{9}) y+$", text, re.M)]
        assert len(numbers) > 1000
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # back-pressure: none lost
    finally:
        h.xmp("unpause", "loud")
    assert h.stop() == 0
    h.assert_clean()


# -- INTRODUCE and the ring's error field ---------------------------------------------------


@pytest.mark.timeout(60)
def test_introduce_of_a_domain_that_does_not_exist_is_refused(hosts):
    h = hosts(HOST + guest("g", "idle")).start(("g",))
    xs = XsClient(SocketTransport.connect(str(h.rundir / "xenstored.sock")))
    try:
        with pytest.raises(XenStoreError) as info:
            xs.introduce(77, 2, 5)
        assert info.value.errno == "EINVAL"
        assert not xs.is_domain_introduced(77)
        assert xs.is_domain_introduced(1)
    finally:
        xs.close()
    assert "xenstored: introducing dom77" not in h.output()
    assert h.stop() == 0
    h.assert_clean()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("mode", "error"), [("idx", 2), ("proto", 3)])  # XENSTORE_ERROR_RINGIDX / _PROTO
def test_a_broken_xenstore_ring_gets_its_error_field_set(hosts, mode, error):
    h = hosts(HOST + kernel("bad", "xsbadring", args=f'{{ mode = "{mode}" }}') + guest("good", "idle"))
    h.start(("bad", "good"))
    h.wait(lambda: "xsbadring: error=" in h.console_log("bad"), 20, "the guest's report")
    assert f"xsbadring: error={error} server_features=2" in h.console_log("bad")  # FEATURE_ERROR
    assert "dom1 broke the ring protocol" in h.dmesg()
    h.xmp("shutdown", "-w", "--timeout", "30", "good", timeout=60)  # the others are served
    assert h.stop() == 0
    h.assert_clean()


@pytest.mark.timeout(90)
def test_a_xenstored_client_that_pipelines_more_than_it_reads_waits_and_loses_nothing(hosts):
    """4 MB of answers asked for at once, read slowly: back-pressure, not a cut."""
    h = hosts(HOST + guest("g", "idle")).start(("g",))
    value = b"0123456789abcdef" * 240
    h.xmp("xenstore", "write", "/tool/big", value.decode())
    sock = connect(h.rundir / "xenstored.sock")
    try:
        n = 1000
        reqs = b"".join(Packet(int(XsType.READ), i, 0, b"/tool/big\0").encode() for i in range(1, n + 1))
        sender = threading.Thread(target=sock.sendall, args=(reqs,), daemon=True)
        sender.start()
        time.sleep(1)  # the answers pile up unread meanwhile
        parser, got = PacketParser(), []
        sock.settimeout(20)
        while len(got) < n:
            data = sock.recv(65536)
            assert data, f"cut off after {len(got)} answers"
            got += parser.feed(data)
        sender.join(10)
        assert [(p.req_id, p.type, p.payload) for p in got] == \
            [(i, XsType.READ, value) for i in range(1, n + 1)]
    finally:
        sock.close()
    assert h.stop() == 0
    h.assert_clean()
