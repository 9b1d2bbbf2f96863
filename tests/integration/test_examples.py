"""The shipped examples run in the suite, so they never rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.timeout(120)
def test_ring_demo_verifies_every_message():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "ring_demo.py"), "--messages", "50000", "--ring-page-order", "0"],
        capture_output=True, text=True, timeout=100,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ring-demo: OK 50000 requests and responses over a 1-page ring" in out.stdout
    assert "guest: 50000 round trips" in out.stdout


def test_ring_demo_rejects_bad_arguments():
    out = subprocess.run([sys.executable, str(EXAMPLES / "ring_demo.py"), "--messages", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--messages must be at least 1" in out.stderr
