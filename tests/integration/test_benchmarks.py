"""The benchmarks run (quickly) in the suite so they never rot.  Their
figures are not judged here -- speed is measured on demand, not in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.timeout(300)
@pytest.mark.xdist_group("heavy")
@pytest.mark.parametrize("name", ["bench_ring.py", "bench_domains.py", "bench_xenstore.py",
                                  "bench_blk.py", "bench_scale.py", "bench_save.py",
                                  "bench_vchan.py"])
def test_benchmark_smoke_run_reports_every_target(name):
    out = subprocess.run([sys.executable, str(BENCH / name), "--smoke", "--json"], capture_output=True,
                         text=True, timeout=280, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["results"] and "errors" not in report
    for target in report["targets"].values():
        assert set(target) >= {"measured", "target", "better", "met"}
        assert target["better"] in ("higher", "lower")
