"""Event channels across real processes: the receiver's sleep and a
sender's kick through its doorbell, with the receiver stopped in between
(SIGSTOP takes a sleeper off its futex; a kick that lands then must still
be seen when it resumes)."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import select
import signal
import struct
import time

import psutil
import pytest

from xmp.sharedmem.evtchn import DOORBELL_SIZE, EVTCHN_OBJECT_SIZE, EVTCHN_WAKE_SIZE, Doorbell, EventChannels

SENDER = 3
PORT_DB, PORT_PRIV = 5, 9


def _layout():
    area = mmap.mmap(-1, EVTCHN_OBJECT_SIZE + EVTCHN_WAKE_SIZE + DOORBELL_SIZE)  # shared across fork
    view = memoryview(area)
    priv = view[:EVTCHN_OBJECT_SIZE]
    wake = view[EVTCHN_OBJECT_SIZE:EVTCHN_OBJECT_SIZE + EVTCHN_WAKE_SIZE]
    db = view[EVTCHN_OBJECT_SIZE + EVTCHN_WAKE_SIZE:]
    return area, priv, wake, db


def _receiver(priv, wake, db, out) -> None:
    ev = EventChannels(priv, wake)
    ev.attach_doorbell(SENDER, db)
    ev.scan()
    while True:
        ev.wait(timeout=30, spin=0)
        for port in ev.scan():
            os.write(out, struct.pack("<I", port))


def _sleeping(wake) -> bool:
    return struct.unpack_from("<I", wake, 0)[0] == 1


def _wait(cond, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


@pytest.mark.timeout(60)
def test_a_kick_while_the_receiver_is_stopped_is_not_lost():
    area, priv, wake, db = _layout()
    ev = EventChannels(priv, wake, init_vcpus=1)
    ev.set_owner(PORT_DB, SENDER)
    sender = Doorbell(db, wake)
    rfd, wfd = os.pipe()
    proc = multiprocessing.get_context("fork").Process(target=_receiver, args=(priv, wake, db, wfd),
                                                      daemon=True)
    proc.start()
    os.close(wfd)
    try:
        child = psutil.Process(proc.pid)
        for round_ in range(20):
            port = PORT_DB if round_ % 2 else PORT_PRIV
            _wait(lambda: _sleeping(wake), "the receiver to sleep")
            os.kill(proc.pid, signal.SIGSTOP)
            _wait(lambda: child.status() == psutil.STATUS_STOPPED, "the receiver to stop")
            if port == PORT_DB:
                assert sender.send(port) is True
            else:
                assert ev.send(port) is True  # the supervisor's kind of kick
            os.kill(proc.pid, signal.SIGCONT)
            _wait(lambda: child.status() != psutil.STATUS_STOPPED, "the receiver to resume")
            got = b""
            deadline = time.monotonic() + 10
            while len(got) < 4:
                assert time.monotonic() < deadline, f"round {round_}: the kick on port {port} was lost"
                if select.select([rfd], [], [], 0.1)[0]:
                    got += os.read(rfd, 4 - len(got))
            assert struct.unpack("<I", got)[0] == port
    finally:
        proc.kill()
        proc.join(10)
        os.close(rfd)
        sender.release()
        ev.release()
        for v in (priv, wake, db):
            v.release()
        area.close()
