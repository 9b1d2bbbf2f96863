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


def _run_example(tmp_path, name: str, timeout: float = 120):
    """Run an example from a copy, so its images land in tmp_path."""
    import shutil

    topo = tmp_path / name
    shutil.copy(EXAMPLES / name, topo)
    cmd = [sys.executable, "-m", "xmp.cli", "run", "--rundir", str(tmp_path / "run"), str(topo)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    return out


@pytest.mark.timeout(180)
def test_disk_example_verifies_every_byte(tmp_path):
    out = _run_example(tmp_path, "disk.toml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"checker | diskcheck: OK {16 << 20} bytes verified" in out.stdout
    assert (tmp_path / "images" / "disk.img").stat().st_size == 16 << 20


@pytest.mark.timeout(180)
def test_driver_domain_example_serves_two_guests(tmp_path):
    out = _run_example(tmp_path, "driver-domain.toml")
    assert out.returncode == 0, out.stdout + out.stderr
    for guest in ("alpha", "beta"):
        assert f"{guest} | diskcheck: OK {8 << 20} bytes verified" in out.stdout


@pytest.mark.timeout(120)
def test_pci_example_drives_two_passed_through_devices(tmp_path):
    out = _run_example(tmp_path, "pci.toml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pci-a | pcidemo: 0000:00:04.0 vendor 1af4 device 10f0 BAR0 0xc2000000 size 4096" in out.stdout
    assert "pci-a | pcidemo: 0000:00:04.0 round 2: interrupt 3" in out.stdout
    assert "pci-b | pcidemo: found 0000:00:05.0\n" in out.stdout      # each sees its own device only
    assert "pci-b | pcidemo: 0000:00:05.0 round 1: interrupt 2" in out.stdout
    for name in ("pci-a", "pci-b"):
        assert f"{name} | pcidemo: done with 1 device(s)" in out.stdout
