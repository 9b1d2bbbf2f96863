"""A supervisor under measurement: ``xmp run`` in a child process, in a
fresh temporary run directory, stopped with SIGTERM and checked for leaks.
Shared by the benchmarks that need a running host."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


class BenchError(Exception):
    pass


class BenchHost:
    def __init__(self, prefix: str, topology: str):
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.rundir = self.dir / "run"
        self.consoles = self.rundir / "console"
        self.topology = self.dir / "topology.toml"
        self.topology.write_text(topology)
        self.proc: subprocess.Popen | None = None
        self.seen: set[int] = set()

    def start(self) -> None:
        out = open(self.dir / "supervisor.out", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "xmp.cli", "run", "--rundir",
                                      str(self.rundir), str(self.topology)],
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(f"the supervisor exited ({self.proc.returncode}): {self.output()}")

    def output(self) -> str:
        try:
            return (self.dir / "supervisor.out").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen |= {p.pid for p in procs}
        return procs

    def stop(self) -> list[str]:
        """SIGTERM, wait, and check that nothing of this supervisor is left."""
        problems: list[str] = []
        if self.proc is None:
            return problems
        pid = self.proc.pid
        self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            problems.append("the supervisor did not stop within 30 s of SIGTERM; killed")
            self.proc.kill()
            code = self.proc.wait()
        if code not in (0, -signal.SIGTERM):
            problems.append(f"the supervisor exited with status {code}: {self.output()}")
        deadline = time.monotonic() + 5
        while True:
            alive = [p for p in self.seen if _alive(p)]
            shm = [n for n in os.listdir("/dev/shm") if n.startswith(f"xmp.{pid}.")]
            if not (alive or shm) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if alive:
            problems.append(f"processes of the supervisor left running: {alive}")
            for p in alive:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if shm:
            problems.append(f"shared-memory objects left in /dev/shm: {shm}")
        self.proc = None
        return problems

    def remove_dir(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
