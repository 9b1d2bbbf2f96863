"""Guest kernels of the network tests (imported by the domains through the
PYTHONPATH that xmphost.Host sets)."""

from __future__ import annotations

import hashlib
import json

ETHERTYPE = b"\x88\xb5"            # IEEE 802 local experimental
NET_SIZES = [14, 15, 60, 64, 100, 1514, 4095, 4096, 4097, 8192, 9000, 12289, 32768, 65535]


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def make_frame(dst: bytes, src: bytes, size: int, seq: int = 0) -> bytes:
    """A frame of ``size`` bytes whose payload the receiver recomputes."""
    head = dst + src + ETHERTYPE
    need = size - len(head)
    out = bytearray()
    block = 0
    while len(out) < need:
        out += hashlib.sha256(b"%s/%d/%d/%d" % (src, size, seq, block)).digest()
        block += 1
    return head + bytes(out[:need])


def report(kernel, test: str, **fields) -> None:
    kernel.print("nettest: " + json.dumps({"test": test, **fields}))


def wait_go(kernel, key: str) -> None:
    while kernel.xenstore.read_or(f"data/{key}") is None:
        kernel.sleep(0.02)


def exchange(kernel) -> None:
    """Send every size of NET_SIZES (``args.rounds`` times) to ``args.peer``
    and check what the peer sends us: byte for byte, in order.  Options
    for netfront in ``args.front`` (see netfront.configure)."""
    from xmp.drivers.net import frontend

    if kernel.args.get("front"):
        frontend.configure(kernel, **kernel.args["front"])
    nic = kernel.net(kernel.args.get("nic", "eth0"))
    peer = mac_bytes(kernel.args["peer"])
    rounds = int(kernel.args.get("rounds", 1))
    sizes = [int(s) for s in kernel.args.get("sizes", NET_SIZES)]
    report(kernel, "ready", mac=nic.mac_address, sg=nic.sg, split=nic.split, queues=len(nic.queues))
    wait_go(kernel, "go")
    expected = [(r, s) for r in range(rounds) for s in sizes]
    got, bad = 0, []
    sent = 0
    todo = list(expected)
    while got < len(expected):
        while todo and nic.send(make_frame(peer, nic.mac, todo[0][1], todo[0][0]), block=False):
            todo.pop(0)
            sent += 1
        frame = nic.recv(timeout=0.2 if todo else 20)
        if frame is None:
            if not todo:
                break
            continue
        if frame[12:14] != ETHERTYPE or frame[6:12] != peer:
            continue  # not the peer's test frame (an ARP, a neighbour's probe)
        r, s = expected[got]
        if frame != make_frame(nic.mac, peer, s, r):
            bad.append([r, s, len(frame)])
        got += 1
    while todo:
        nic.send(make_frame(peer, nic.mac, todo[0][1], todo[0][0]))
        todo.pop(0)
        sent += 1
    kernel.sleep(0.3)  # let the last answers land before the counters are read
    report(kernel, "exchange", got=got, want=len(expected), bad=bad, sent=sent, stats=nic.counters())
    kernel.idle()


def pump(kernel) -> None:
    """Send ``args.count`` 64-byte frames to ``args.peer`` as fast as the
    ring takes them, then report; answers frames of ``args.echo`` back."""
    nic = kernel.net("eth0")
    peer = mac_bytes(kernel.args["peer"])
    report(kernel, "ready", mac=nic.mac_address)
    wait_go(kernel, "go")
    count = int(kernel.args.get("count", 1000))
    for i in range(count):
        nic.send(make_frame(peer, nic.mac, 64, i))
    kernel.sleep(0.3)
    report(kernel, "pumped", count=count, stats=nic.counters())
    kernel.idle()


def sink(kernel) -> None:
    """Take frames and count them; with ``args.stall`` never repost rx
    buffers (a frontend that never refills its rx ring)."""
    nic = kernel.net("eth0")
    if kernel.args.get("stall"):
        nic._post = lambda q, ids: None    # the buffers are never given back
    if kernel.args.get("bad_gref"):        # buffers given back under a gref that grants nothing
        for q in nic.queues:
            q.rx_grefs[:] = [60000] * len(q.rx_grefs)
    # announce ourselves (a broadcast), so that switches learn where we are
    nic.send(b"\xff" * 6 + nic.mac + ETHERTYPE + bytes(50))
    report(kernel, "ready", mac=nic.mac_address)
    while True:
        got = 0
        while nic.recv(block=False) is not None:
            got += 1
        kernel.sleep(0.1)


def hostile(kernel) -> None:
    """A frontend that breaks netif on purpose: ``args.case`` says how.
    Puts its bad chain on the tx ring directly and reports the answers."""
    import struct

    from xmp.drivers.net.protocol import NETTXF_more_data

    nic = kernel.net("eth0")
    peer = mac_bytes(kernel.args["peer"])
    report(kernel, "ready", mac=nic.mac_address)
    wait_go(kernel, "go")
    case = kernel.args["case"]
    req = struct.Struct("<IHHHH")
    ring = nic.tx_ring
    frame = make_frame(peer, nic.mac, 64)
    mem = kernel.memory
    base = nic._tx_pfn * 4096
    mem[base:base + 64] = frame
    g = nic.tx_grefs
    slots: list[bytes] = []
    ids: list[int] = []

    def put(gref, offset, flags, rid, size):
        slots.append(req.pack(gref, offset, flags, rid, size))
        ids.append(rid)
        nic.tx_free.remove(rid)
        nic.tx_busy.add(rid)

    if case == "bad_gref":
        put(60000, 0, 0, 0, 64)
    elif case == "cross_page":
        put(g[0], 4090, 0, 0, 64)
    elif case == "size_mismatch":       # the second slot claims more than the first's size leaves
        put(g[0], 0, NETTXF_more_data, 0, 100)
        put(g[1], 0, 0, 1, 200)
    elif case == "too_many_slots":      # 1 + 24 slots: past the fatal limit of 20
        put(g[0], 0, NETTXF_more_data, 0, 25 * 14)
        for i in range(1, 25):
            put(g[i], 0, NETTXF_more_data if i < 24 else 0, i, 14)
    elif case == "some_slots":          # 1 + 19 slots: past 18, below the fatal 20: ERROR only
        put(g[0], 0, NETTXF_more_data, 0, 20 * 14)
        for i in range(1, 20):
            put(g[i], 0, NETTXF_more_data if i < 19 else 0, i, 14)
    elif case == "flood":               # requests as fast as the ring takes them, for a while
        sent = 0
        deadline = kernel.monotonic() + float(kernel.args.get("seconds", 2))
        while kernel.monotonic() < deadline:
            nic.send(frame)
            sent += 1
        report(kernel, "flooded", sent=sent, stats=nic.counters())
        kernel.idle()
    kernel.loop.bind(nic.tx_port, lambda _port: None)  # the answers are ours to read, below
    ring.put_requests(b"".join(slots))
    if ring.push_requests_and_check_notify():
        kernel.xen.notify(nic.tx_port)
    answers: dict[int, int] = {}

    def collect() -> bool:
        if nic.tx_ring is None:
            return True
        for off in range(0, len(r := nic.tx_ring.get_responses()), 4):
            rid, status = struct.unpack_from("<Hh", r, off)
            answers[rid] = status
        return len(answers) >= len(ids)

    kernel.loop.run_until(collect, 5)
    state = kernel.xenstore.read_or("device/vif/0/state")
    report(kernel, "hostile", case=case, answers={str(k): v for k, v in answers.items()},
           state=state.decode() if state else None)
    kernel.idle()


def echo(kernel) -> None:
    """Answer every frame: its source becomes its destination, the rest kept."""
    nic = kernel.net("eth0")
    report(kernel, "ready", mac=nic.mac_address)
    while True:
        frame = nic.recv()
        if frame is not None and frame[12:14] == ETHERTYPE:
            nic.send(frame[6:12] + nic.mac + frame[12:])


def chatter(kernel) -> None:
    """Send ``args.peer`` a numbered 1000-byte frame every 10 ms forever,
    and print every second how many of the peer's we got and how often
    eth0 has connected (a backend restart makes it reconnect)."""
    nic = kernel.net("eth0")
    peer = mac_bytes(kernel.args["peer"])
    report(kernel, "ready", mac=nic.mac_address)
    seq = got = 0
    last = kernel.monotonic()
    while True:
        if nic.is_connected:
            nic.send(make_frame(peer, nic.mac, 1000, seq), block=False)
            seq += 1
        while (frame := nic.recv(block=False)) is not None:
            if frame[6:12] == peer and frame[12:14] == ETHERTYPE:
                got += 1
        if kernel.monotonic() - last >= 1:
            last = kernel.monotonic()
            report(kernel, "chatter", got=got, connections=nic.connections)
        kernel.sleep(0.01)


def flows(kernel) -> None:
    """Send ``args.count`` IPv4/UDP-looking frames of as many different
    flows (source ports) to ``args.peer``; report how many each queue took."""
    import struct

    from xmp.drivers.net import frontend

    frontend.configure(kernel, queues=int(kernel.args.get("queues", 4)))
    nic = kernel.net("eth0")
    peer = mac_bytes(kernel.args["peer"])
    report(kernel, "ready", mac=nic.mac_address, queues=len(nic.queues))
    wait_go(kernel, "go")
    count = int(kernel.args.get("count", 64))
    for i in range(count):
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, bytes([10, 0, 0, 1]),
                         bytes([10, 0, 0, 2]))
        udp = struct.pack("!HHHH", 1024 + i, 9, 8, 0)
        nic.send(peer + nic.mac + b"\x08\x00" + ip + udp + bytes(18))
    kernel.sleep(0.3)
    report(kernel, "flows", per_queue=[q.sent for q in nic.queues], stats=nic.counters())
    kernel.idle()


def count_ipv4(kernel) -> None:
    """Count the IPv4 frames that arrive (over however many queues)."""
    from xmp.drivers.net import frontend

    frontend.configure(kernel, queues=int(kernel.args.get("queues", 4)))
    nic = kernel.net("eth0")
    nic.send(b"\xff" * 6 + nic.mac + ETHERTYPE + bytes(50))  # be learnt
    report(kernel, "ready", mac=nic.mac_address, queues=len(nic.queues))
    got = 0
    while True:
        frame = nic.recv(timeout=1)
        if frame is not None and frame[12:14] == b"\x08\x00":
            got += 1
            report(kernel, "ipv4", got=got)
