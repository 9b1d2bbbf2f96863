"""ruff and mypy stay clean on xmp/ (a habit, kept by the suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tool", [["ruff", "check", "xmp", "examples", "tests", "benchmarks"],
                                  ["mypy", "xmp"]], ids=["ruff", "mypy"])
def test_clean(tool):
    pytest.importorskip(tool[0])
    out = subprocess.run([sys.executable, "-m", *tool], cwd=ROOT, capture_output=True, text=True,
                         timeout=220, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
