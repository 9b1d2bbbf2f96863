"""The isolation probe tells a refusal from an attempt that proved nothing."""

from __future__ import annotations

import os

import pytest

from xmp.guests import probe

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def dead_pid():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # reaped: the pid names nothing now
    return pid


def test_a_process_that_is_gone_is_not_a_refusal(dead_pid):
    assert probe._try(lambda: probe._read_mem(dead_pid))["ok"] is None
    assert probe._try(lambda: probe._signal(dead_pid, 0))["ok"] is None


def test_a_refusal_keeps_its_errno(tmp_path):
    missing = tmp_path / "no-such-dir" / "file"
    assert probe._try(lambda: probe._append(str(missing))) == {
        "ok": False, "errno": 2, "error": f"[Errno 2] No such file or directory: '{missing}'"}
    assert probe._try(lambda: probe._signal(os.getpid(), 0))["ok"] is True
