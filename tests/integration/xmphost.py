"""A supervisor under test: ``xmp run`` in a child process with its own run
directory, driven through the real ``xmp`` commands.

Every test gets its own run directory (so parallel supervisors never meet),
and teardown checks that nothing of it is left: no process it started, no
shared-memory object named by it, no socket in its run directory.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from xmp.errors import XenStoreError, XmpError
from xmp.sharedmem.shm import leftovers
from xmp.xenstore.client import SocketTransport, XsClient

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
        """Stop the supervisor; first, while it runs, check that no domain's
        backend keeps a directory for a frontend domain that has gone."""
        assert self.proc is not None
        self.descendants()
        stale: list[str] = []
        if self.proc.poll() is None:
            stale = self.stale_backends()
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        assert not stale, f"backend directories of domains that have gone: {stale}"
        return code

    def wait_exit(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.descendants()
        return self.proc.wait(timeout)

    def assert_clean(self, timeout: float = 5, sockets: bool = True) -> None:
        """Nothing of this host is left: processes, /dev/shm, sockets (the
        socket files of a supervisor killed with SIGKILL stay until the next
        start in that run directory removes them: ``sockets=False``)."""
        left = self.leaks(timeout, sockets)
        assert not left, "; ".join(left)

    def leaks(self, timeout: float = 5, sockets: bool = True) -> list[str]:
        """What of this host is still there, waiting up to ``timeout`` for it
        to go: its processes, its /dev/shm names, sockets in its run
        directory, network objects; empty when nothing is."""
        if self.proc is None:
            return []
        self.descendants()
        deadline = time.monotonic() + timeout
        while True:
            alive = [pid for pid in [self.pid, *self.seen] if _alive(pid) and (pid != self.pid or
                                                                           self.proc.poll() is None)]
            shm = [n for n in leftovers() if n.startswith(f"xmp.{self.pid}.")]
            socks = list(self.rundir.glob("**/*.sock")) if self.rundir.exists() and sockets else []
            net = self.network_leftovers()
            if not (alive or shm or socks or net) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return [f"{what} left: {items}" for what, items in
                (("processes", [_describe(pid) for pid in alive]), ("shared memory", shm),
                 ("sockets", [str(p) for p in socks]), ("network objects", net)) if items]

    @property
    def killed(self) -> bool:
        """Its supervisor died by SIGKILL (the test's or cleanup's): its
        sockets stay until the next start in that run directory."""
        return self.proc is not None and self.proc.returncode == -signal.SIGKILL

    def network_leftovers(self) -> list[str]:
        """The hook for network objects (interfaces, namespaces, bridges named
        with this supervisor's prefix) left behind.  None exist yet: when
        netback makes them, list the ones still there here."""
        return []

    def stale_backends(self, timeout: float = 5) -> list[str]:
        """``/local/domain/<back>/backend/<type>/<front>`` directories whose
        frontend domain has gone (its ``/local/domain/<front>`` is no more),
        waiting up to ``timeout`` for a teardown under way; [] when xenstored
        cannot be reached (dom0 gone)."""
        try:
            xs = self.xs()
        except OSError:
            return []
        try:
            deadline = time.monotonic() + timeout
            while (stale := _stale_backends(xs)) and time.monotonic() < deadline:
                time.sleep(0.05)
            return stale
        except (XmpError, OSError):
            return []  # xenstored went meanwhile (the supervisor stopped by itself)
        finally:
            xs.close()

    # -- what this host holds (the lifecycle and leak checks) -------------------

    def xs(self):
        """A xenstore client on this host's socket (close it with ``.close()``)."""
        return XsClient(SocketTransport.connect(str(self.rundir / "xenstored.sock")))

    def shm_held(self) -> dict[tuple[int, int], tuple[str, int, list[str]]]:
        """Every shared-memory object of this supervisor that any of its
        processes still holds, by descriptor or by mapping:
        (dev, inode) -> (name, allocated bytes, holders as "<title or pid>:<fd or 'map'>")."""
        prefix = f"/dev/shm/xmp.{self.pid}."
        held: dict[tuple[int, int], tuple[str, int, list[str]]] = {}
        for pid in [self.pid, *(p.pid for p in self.descendants())]:
            for where, path in _shm_refs(pid, prefix):
                try:
                    st = os.stat(path)
                except OSError:
                    continue  # gone meanwhile
                key = (st.st_dev, st.st_ino)
                name, _, holders = held.get(key, (os.readlink(path), 0, []))
                held[key] = (name, st.st_blocks * 512, [*holders, f"{_title(pid)}:{where}"])
        return held

    def interfaces(self) -> list[str]:
        """The network interfaces this host's topology names (``bridge=``,
        ``vifname=``) that exist now -- tests name them uniquely."""
        names = set(re.findall(r"\b(?:bridge|vifname)=([A-Za-z0-9_.-]+)", self.topology.read_text()))
        if not names or not os.path.isdir("/sys/class/net"):
            return []
        return sorted(names & set(os.listdir("/sys/class/net")))

    def assert_no_interfaces(self, timeout: float = 5) -> None:
        """No TAP or bridge of this host outlives it (a guest's network
        namespace goes with its process, which assert_clean checks)."""
        deadline = time.monotonic() + timeout
        while self.interfaces() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.interfaces()
        assert not left, f"network interfaces left: {left}"

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.interfaces():
            # a host that made bridges removes them when it stops (not when it is killed)
            self.descendants()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
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


def _stale_backends(xs: XsClient) -> list[str]:
    live = set(xs.directory("/local/domain"))
    stale = []
    for back in live:
        for devtype in _children(xs, f"/local/domain/{back}/backend"):
            path = f"/local/domain/{back}/backend/{devtype}"
            stale += [f"{path}/{front}" for front in _children(xs, path) if front not in live]
    return stale


def _children(xs: XsClient, path: str) -> list[str]:
    try:
        return xs.directory(path)
    except XenStoreError as exc:
        if exc.errno == "ENOENT":
            return []
        raise


def _title(pid: int) -> str:
    """A domain's process title (``xmp:3:web``), or the pid of another process."""
    try:
        cmd = psutil.Process(pid).cmdline()
    except psutil.Error:
        return str(pid)
    return cmd[0] if cmd and cmd[0].startswith("xmp:") else str(pid)


def _describe(pid: int) -> str:
    try:
        return f"{pid} ({' '.join(psutil.Process(pid).cmdline())[:80]})"
    except psutil.Error:
        return str(pid)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _shm_refs(pid: int, prefix: str) -> list[tuple[str, str]]:
    """(where, a /proc path that stats as the object) for each descriptor and
    mapping of ``pid`` on an object whose name starts with ``prefix``."""
    out = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                    out.append((fd, f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].startswith(prefix):
                    out.append(("map", f"/proc/{pid}/map_files/{fields[0]}"))
    except OSError:
        pass  # the process has gone
    return out


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
