"""The ``xmp`` command, after xl.

``xmp run TOPOLOGY`` starts a supervisor (in the foreground, or in the
background with ``--detach``); every other command talks to a running one
through ``<rundir>/control.sock``.  The run directory defaults to
``$XMP_RUNDIR``, else ``$XDG_RUNTIME_DIR/xmp/<host>``, else
``/tmp/xmp-<uid>/<host>``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import termios
import time
import traceback
import tty
from importlib.metadata import version
from pathlib import Path
from typing import Any

from xmp import devices
from xmp.errors import XmpError
from xmp.sharedmem.shm import remove_stale

ESCAPE = b"\x1d"  # Ctrl-], as xl console


def default_rundir(host: str | None = None) -> Path:
    if os.environ.get("XMP_RUNDIR"):
        return Path(os.environ["XMP_RUNDIR"])
    host = host or socket.gethostname()
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "xmp" / host if base else Path(f"/tmp/xmp-{os.getuid()}") / host


class CliError(Exception):
    """One clear message for the user, and exit status 1."""


# -- talking to a supervisor -------------------------------------------------


def request(rundir: Path, cmd: str, **fields: Any) -> dict[str, Any]:
    path = rundir / "control.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        raise CliError(f"no supervisor runs in {rundir} (start one with `xmp run TOPOLOGY`, "
                       "or give --rundir)") from None
    with sock:
        sock.sendall((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise CliError("the supervisor closed the connection")
            buf += chunk
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise CliError(reply.get("error", "failed"))
    return reply


# -- commands ------------------------------------------------------------------


def cmd_run(args) -> int:
    from xmp.hypervisor import Supervisor
    from xmp.toolstack import run_host
    from xmp.topology import load_topology

    try:
        topo = load_topology(os.path.abspath(args.topology))  # disk targets are relative to it
    except XmpError as exc:
        raise CliError(str(exc)) from None
    rundir = Path(args.rundir or topo.host.rundir or default_rundir(topo.host.name))
    if not args.detach:
        hosts: list[Supervisor] = []

        def started(sup: Supervisor) -> None:
            hosts.append(sup)
            print(f"xmp: supervisor {os.getpid()} running {args.topology} in {rundir}", flush=True)

        try:
            code = run_host(topo, rundir, echo=True, started=started)
        except XmpError as exc:
            raise CliError(str(exc)) from None
        print(f"xmp: stopped ({hosts[0].stop_reason}), exit status {code}", flush=True)
        return code
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the detached supervisor
        os.close(r)
        os.setsid()
        os.dup2(os.open(os.devnull, os.O_RDWR), 0)
        _to_log(rundir)  # no terminal: whatever it prints, a traceback above all, goes to its log
        code = 1
        told: list[bool] = []  # once closed, w's number may be another descriptor's: never write it again
        hosts = []
        try:
            def ready() -> None:
                os.write(w, b"ok\n")
                os.close(w)
                told.append(True)

            code = run_host(topo, rundir, echo=False, stop_when_guests_gone=False, ready=ready,
                            started=hosts.append)
            if not told:  # it stopped (a signal) before every domain ran
                os.write(w, f"stopped during start-up ({hosts[0].stop_reason})\n".encode())
        except BaseException as exc:
            if not hosts:  # run() logs its own failure
                traceback.print_exc()
                sys.stderr.flush()
            if not told:
                try:
                    os.write(w, f"{exc}\n".encode())
                except OSError:
                    pass
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        status = f.readline().strip()  # a line, not EOF: the zygote holds a copy of the pipe
    if status != "ok":
        raise CliError(f"the supervisor did not start: {status or 'it exited'}")
    print(f"xmp: supervisor {pid} running {args.topology} in {rundir}")
    return 0


def _to_log(rundir: Path) -> None:
    """A detached supervisor's stdout and stderr: logs/hypervisor.log."""
    try:
        (rundir / "logs").mkdir(parents=True, exist_ok=True, mode=0o700)
        log = os.open(rundir / "logs" / "hypervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        log = os.open(os.devnull, os.O_WRONLY)
    os.dup2(log, 1)
    os.dup2(log, 2)


def _rundir(args) -> Path:
    return Path(args.rundir) if args.rundir else default_rundir()


def cmd_list(args) -> int:
    doms = request(_rundir(args), "list")["domains"]
    if args.json:
        print(json.dumps(doms, indent=2))
        return 0
    # xl list's exact header and row formats (tools/xl/xl_info.c)
    print(f"{'Name':<40}ID   Mem VCPUs\tState\tTime(s)")
    for d in doms:
        print(f"{d['name']:<40}{d['domid']:5d} {d['mem_kb'] // 1024:5d} {d['vcpus']:5d}     "
              f"{d['state_letters']:6}  {d['cpu_time']:8.1f}")
    return 0


def cmd_create(args) -> int:
    from xmp.topology import load_domain

    try:
        cfg = load_domain(os.path.abspath(args.file))
    except XmpError as exc:
        raise CliError(str(exc)) from None
    reply = request(_rundir(args), "create", config=cfg.to_dict(), paused=args.paused)
    print(f"xmp: created domain {reply['name']!r} (id {reply['domid']})")
    if args.console:
        return _attach(_rundir(args), str(reply["domid"]))
    return 0


def _simple(cmd: str):
    def run(args) -> int:
        request(_rundir(args), cmd, dom=args.dom)
        return 0
    return run


def cmd_shutdown(args, reason: str = "poweroff") -> int:
    rundir = _rundir(args)
    domid = request(rundir, "shutdown", dom=args.dom, reason=reason)["domid"]
    if not getattr(args, "wait", False) and not getattr(args, "force", False):
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            doms = request(rundir, "list")["domains"]
        except CliError:
            return 0  # the supervisor stopped (its last guest went): so did this one
        if not [d for d in doms if d["domid"] == domid and d["state"] != "dying"]:
            return 0
        time.sleep(0.05)
    if args.force:
        request(rundir, "destroy", dom=str(domid))
        print(f"xmp shutdown: {args.dom} did not shut down within {args.timeout:g} s: destroyed",
              file=sys.stderr)
        return 0
    raise CliError(f"{args.dom} did not shut down within {args.timeout:g} s (-F destroys it)")


def cmd_reboot(args) -> int:
    return cmd_shutdown(args, "reboot")


def cmd_suspend(args) -> int:
    request(_rundir(args), "shutdown", dom=args.dom, reason="suspend")
    return 0


def cmd_resume(args) -> int:
    request(_rundir(args), "resume", dom=args.dom)
    return 0


XENSTORE_CLI_TIMEOUT = 5.0  # seconds `xmp xenstore` waits for an answer


def cmd_xenstore(args) -> int:
    from xmp.errors import XenStoreError
    from xmp.xenstore.client import SocketTransport, XsClient

    path = os.environ.get("XENSTORED_PATH") or str(_rundir(args) / "xenstored.sock")
    try:
        xs = XsClient(SocketTransport.connect(path), timeout=XENSTORE_CLI_TIMEOUT)
    except OSError as exc:
        raise CliError(f"cannot reach xenstored at {path}: {exc}") from None
    try:
        if args.op == "ls":
            _xs_ls(xs, args.path, 0)
        elif args.op == "read":
            sys.stdout.write(xs.read(args.path).decode(errors="replace") + "\n")
        elif args.op == "write":
            if len(args.values) != 1:
                raise CliError("usage: xmp xenstore write PATH VALUE")
            xs.write(args.path, args.values[0])
        elif args.op == "rm":
            xs.rm(args.path)
        elif args.op == "chmod":
            if not args.values:
                raise CliError("usage: xmp xenstore chmod PATH PERM... (e.g. n0 r3)")
            xs.set_perms(args.path, args.values)
        elif args.op == "watch":
            xs.watch(args.path, "xmp")
            count = int(args.values[0]) if args.values else 0
            seen = 0
            while count == 0 or seen < count:
                event = xs.wait_watch()
                if event:
                    print(event[0], flush=True)
                    seen += 1
    except XenStoreError as exc:
        if exc.errno == "ETIMEDOUT":
            raise CliError(f"xenstored did not answer within {XENSTORE_CLI_TIMEOUT:g} s "
                           "(is Xenstore paused?)") from None
        raise CliError(str(exc)) from None
    finally:
        xs.close()
    return 0


def _xs_ls(xs, path: str, depth: int) -> None:
    for name in xs.directory(path):
        child = path.rstrip("/") + "/" + name
        value = xs.read_or(child, b"") or b""
        print(f"{'  ' * depth}{name} = \"{value.decode(errors='replace')}\"")
        _xs_ls(xs, child, depth + 1)


def _device_attach(cls):
    def run(args) -> int:
        reply = request(_rundir(args), "device-add", **{"class": cls.command}, dom=args.dom, spec=args.spec,
                        cwd=os.getcwd())
        print(f"xmp: {cls.config_key} {reply['devid']} attached to dom{reply['domid']} "
              f"(backend dom{reply['backend']})")
        return 0
    return run


def _device_detach(cls):
    """As xl: the toolstack asks the backend to close, waits for Closed,
    then removes the device (--force: at once)."""
    def run(args) -> int:
        request(_rundir(args), "device-remove", **{"class": cls.command}, dom=args.dom, name=args.device,
                force=args.force, timeout=args.timeout)
        return 0
    return run


def _device_list(cls):
    def run(args) -> int:
        reply = request(_rundir(args), "device-list", **{"class": cls.command}, dom=args.dom)
        print(reply["header"])
        for row in reply["rows"]:
            print(row)
        return 0
    return run


def cmd_dmesg(args) -> int:
    for line in request(_rundir(args), "dmesg", clear=args.clear)["lines"]:
        print(line)
    return 0


def cmd_console(args) -> int:
    return _attach(_rundir(args), args.dom)


def _attach(rundir: Path, dom: str) -> int:
    info = request(rundir, "console", dom=dom)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(info["socket"])
    except OSError as exc:
        raise CliError(f"console of {info['name']!r} is not available: {exc}") from None
    stdin = sys.stdin.fileno()
    raw = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if raw else None
    if raw:
        tty.setraw(stdin)
        os.write(1, f"xmp: attached to {info['name']} (Ctrl-] detaches)\r\n".encode())
    try:
        stdin_open = True
        while True:
            ready, _, _ = select.select([sock] + ([stdin] if stdin_open else []), [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    return 0
                os.write(1, data)
            if stdin in ready:
                data = os.read(stdin, 4096)
                if not data:
                    stdin_open = False  # keep showing output until the console goes
                    continue
                if ESCAPE in data:
                    sock.sendall(data.split(ESCAPE)[0])
                    return 0
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
            os.write(1, b"\r\n")
        sock.close()


def cmd_cleanup(args) -> int:
    removed = remove_stale()
    for name in removed:
        print(f"removed /dev/shm/{name}")
    print(f"{len(removed)} stale object(s) of dead supervisors removed")
    return 0


def cmd_info(args) -> int:
    from xmp.hv.jail import describe
    from xmp.limits import describe_capacity, nofile_limits
    from xmp.sharedmem import _ffi  # noqa: F401  (fails with instructions if not built)

    print(f"xmp {version('xmp')}")
    print("fast path: built (xmp.sharedmem._fast)")
    soft, hard = nofile_limits()
    print(f"descriptors: RLIMIT_NOFILE soft {soft}, hard {hard} (`xmp run` raises soft to hard)")
    print(f"capacity: {describe_capacity(hard)}")
    for line in describe():
        print(f"isolation: {line}")
    rundir = _rundir(args)
    try:
        host = request(rundir, "info")
    except CliError as exc:
        if args.rundir:
            print(f"supervisor in {rundir}: {exc}")
        return 0  # a report: the facts above are all there is
    print(f"supervisor in {rundir}: {host['domains']} domains of {host['capacity']} it can hold "
          f"(RLIMIT_NOFILE {host['nofile']}), {host['pool_free_mib']} MiB of its pool free")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmp", description="Xen's architecture as Linux processes.")
    parser.add_argument("--version", action="version", version=f"xmp {version('xmp')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if name != "cleanup":
            p.add_argument("--rundir", help="the supervisor's run directory")
        return p

    p = add("run", cmd_run, "start a supervisor and the domains of a topology file")
    p.add_argument("topology")
    p.add_argument("--detach", action="store_true", help="return once every domain runs")
    p = add("list", cmd_list, "list domains (xl list)")
    p.add_argument("--json", action="store_true")
    p = add("create", cmd_create, "create one more domain from a TOML file")
    p.add_argument("file")
    p.add_argument("-p", dest="paused", action="store_true", help="leave it paused")
    p.add_argument("-c", dest="console", action="store_true", help="attach to its console")
    for name, help in (("destroy", "destroy a domain at once (pull the plug)"),
                       ("pause", "stop scheduling a domain"), ("unpause", "resume a paused domain")):
        add(name, _simple(name), help).add_argument("dom", help="name or id")
    for name, func, help in (("shutdown", cmd_shutdown, "ask a guest to power off (control/shutdown)"),
                             ("reboot", cmd_reboot, "ask a guest to reboot (control/shutdown)")):
        p = add(name, func, help)
        p.add_argument("dom", help="name or id")
        p.add_argument("-w", dest="wait", action="store_true", help="wait until it has gone")
        p.add_argument("-F", "--force", action="store_true", help="destroy it if it does not answer in time")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    add("suspend", cmd_suspend, "ask a guest to suspend (control/shutdown)").add_argument(
        "dom", help="name or id")
    add("resume", cmd_resume, "resume a suspended guest in place").add_argument("dom", help="name or id")
    for cls in devices.DEVICE_CLASSES:  # <command>-attach / -detach / -list for each device class
        if cls.command is None:
            continue
        p = add(f"{cls.command}-attach", _device_attach(cls), f"hot-plug a {cls.devtype} device into a guest")
        p.add_argument("dom", help="name or id")
        p.add_argument("spec", help=f"an xl {cls.config_key} spec")
        p = add(f"{cls.command}-detach", _device_detach(cls),
                f"unplug a guest's {cls.devtype} device (the guest is asked first)")
        p.add_argument("dom", help="name or id")
        p.add_argument("device", help="its name (e.g. xvdb) or number")
        p.add_argument("--force", action="store_true", help="remove it without waiting for the guest")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for Closed (default 10)")
        p = add(f"{cls.command}-list", _device_list(cls),
                f"a guest's {cls.devtype} devices (xl {cls.command}-list)")
        p.add_argument("dom", help="name or id")
    p = add("xenstore", cmd_xenstore, "read and change xenstore (ls, read, write, rm, watch, chmod)")
    p.add_argument("op", choices=["ls", "read", "write", "rm", "watch", "chmod"])
    p.add_argument("path")
    p.add_argument("values", nargs="*", help="write: VALUE; chmod: PERM...; watch: how many events")
    p = add("console", cmd_console, "attach to a domain's console (Ctrl-] detaches)")
    p.add_argument("dom", help="name or id")
    p = add("dmesg", cmd_dmesg, "the hypervisor's log")
    p.add_argument("-c", dest="clear", action="store_true", help="clear it after printing")
    add("info", cmd_info, "what this installation has")
    add("cleanup", cmd_cleanup, "remove shared-memory objects left by dead supervisors")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"xmp {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
