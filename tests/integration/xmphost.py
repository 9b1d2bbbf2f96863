"""A supervisor under test: ``xmp run`` in a child process with its own run
directory, driven through the real ``xmp`` commands.

Every test gets its own run directory (so parallel supervisors never meet),
and teardown checks that nothing of it is left: no process it started, no
shared-memory object named by it, no socket in its run directory.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from xmp.sharedmem.shm import leftovers

XMP = [sys.executable, "-m", "xmp.cli"]
# Test-only guest kernels (tests/integration/kernels.py) are importable by the domains.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])}


class Host:
    def __init__(self, tmp_path: Path, topology: str, name: str = "host", netns: str | None = None):
        self.netns = netns  # run the supervisor in this network namespace (tests/integration/netns.py)
        self.dir = tmp_path / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.topology = self.dir / "topology.toml"
        self.topology.write_text(topology)
        self.rundir = self.dir / "run"
        self.out_path = self.dir / "out.txt"
        self.proc: subprocess.Popen | None = None
        self.seen: set[int] = set()  # every process of this host we saw

    # -- start / stop -------------------------------------------------------

    def start(self, wait_for: tuple[str, ...] = (), nofile: int | None = None) -> Host:
        """``nofile``: the supervisor's RLIMIT_NOFILE (soft and hard)."""
        out = open(self.out_path, "wb")

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []  # it execs: the pid is xmp's
        self.proc = subprocess.Popen([*prefix, *XMP, "run", "--rundir", str(self.rundir), str(self.topology)],
                                     stdout=out, stderr=subprocess.STDOUT, env=ENV,
                                     preexec_fn=limit if nofile else None)
        out.close()
        # A supervisor may also be done already (every guest gone): that is for the test to judge.
        self.wait(lambda: self.proc.poll() is not None or self._answers(), 20, "exit")
        if wait_for:
            self.wait(lambda: set(wait_for) <= {d["name"] for d in self.list()}, 20,
                      f"domains {wait_for}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def descendants(self) -> list[psutil.Process]:
        try:
            procs = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen |= {p.pid for p in procs}
        return procs

    def domain_pid(self, name: str) -> int:
        """The pid of a domain's process, found by its title ``xmp:<id>:<name>``."""
        for p in self.descendants():
            try:
                if p.cmdline() and p.cmdline()[0].split(":", 2)[-1] == name:
                    return p.pid
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no process for domain {name!r}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def wait_exit(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.descendants()
        return self.proc.wait(timeout)

    def assert_clean(self, timeout: float = 5, sockets: bool = True) -> None:
        """Nothing of this host is left: processes, /dev/shm, sockets (the
        socket files of a supervisor killed with SIGKILL stay until the next
        start in that run directory removes them: ``sockets=False``)."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [pid for pid in self.seen if _alive(pid)]
            shm = [n for n in leftovers() if n.startswith(f"xmp.{self.pid}.")]
            socks = list(self.rundir.glob("**/*.sock")) if self.rundir.exists() and sockets else []
            if not (alive or shm or socks) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not alive, f"processes left: {alive}"
        assert not shm, f"shared memory left: {shm}"
        assert not socks, f"sockets left: {socks}"

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.descendants()
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.seen:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    # -- the xmp commands ---------------------------------------------------

    def xmp(self, *args: str, check: bool = True, timeout: float = 30, input: str | None = None):
        out = subprocess.run([*XMP, *args, "--rundir", str(self.rundir)], capture_output=True,
                             text=True, timeout=timeout, input=input, check=False, env=ENV)
        if check and out.returncode != 0:
            raise AssertionError(f"xmp {' '.join(args)} failed ({out.returncode}): {out.stderr}")
        return out

    def _answers(self) -> bool:
        return self.xmp("list", "--json", check=False).returncode == 0

    def list(self) -> list[dict]:
        return json.loads(self.xmp("list", "--json").stdout)

    def info(self, name: str) -> dict | None:
        return next((d for d in self.list() if d["name"] == name), None)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def console_log(self, name: str) -> str:
        path = self.rundir / "console" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tails(self, lines: int = 40) -> str:
        """The last lines of every log of this host (for a failed test's report)."""
        out = []
        logs = sorted((self.rundir / "logs").glob("*.log")) + sorted((self.rundir / "console").glob("*.log"))
        for path in [*logs, self.out_path]:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"----- {path.relative_to(self.dir)} -----\n" + "\n".join(tail))
        return "\n".join(out)

    def dmesg(self) -> str:
        return self.xmp("dmesg").stdout

    def wait(self, cond, timeout: float = 10, what: str = "a condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None and what != "exit":
                raise AssertionError(f"supervisor exited ({self.proc.returncode}) while waiting for "
                                     f"{what}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()}")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def guest(name: str, kernel: str, memory: int = 32, **extra) -> str:
    lines = [f'[[domain]]\nname = "{name}"\nkernel = "xmp.guests.{kernel}:main"\nmemory = {memory}']
    for key, value in extra.items():
        lines.append(f"{key} = {json.dumps(value) if not isinstance(value, dict) else _table(value)}")
    return "\n".join(lines) + "\n"


def _table(d: dict) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + " }"


HOST = "[host]\nmemory = 1024\n[dom0]\nmemory = 64\n"
