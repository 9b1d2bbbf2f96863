"""The ``xmp`` command, after xl.

``xmp run TOPOLOGY`` starts a supervisor (in the foreground, or in the
background with ``--detach``); every other command talks to a running one
through ``<rundir>/control.sock``.  The run directory defaults to
``$XMP_RUNDIR``, else ``$XDG_RUNTIME_DIR/xmp/<host>``, else
``/tmp/xmp-<uid>/<host>``.

Every command is one :func:`~xmp.clitable.command` registration next to
its function below: its name, xl's one-line summary and usage
(``tools/xl/xl_cmdtable.c``), and its arguments.  ``xmp help`` and each
command's ``--help`` are printed from that table in xl's layout; every
command takes ``--rundir``, and those that print a table take ``--json``.
A new command is one more registration here, in xl's order.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import termios
import time
import traceback
import tty
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from xmp import devices
from xmp.clitable import COMMANDS, DOM, CliError, UsageError, arg, command, overview, unknown
from xmp.errors import XmpError
from xmp.hypercall import SHUTDOWN_REASONS
from xmp.sharedmem.shm import remove_stale
from xmp.toolstack import sched

ESCAPE = b"\x1d"  # Ctrl-], as xl console


def default_rundir(host: str | None = None) -> Path:
    if os.environ.get("XMP_RUNDIR"):
        return Path(os.environ["XMP_RUNDIR"])
    host = host or socket.gethostname()
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "xmp" / host if base else Path(f"/tmp/xmp-{os.getuid()}") / host


# -- the command table (xmp.clitable) ---------------------------------------

# -- talking to a supervisor -------------------------------------------------


def request(rundir: Path, cmd: str, *, waiting: Callable[[], None] | None = None,
            **fields: Any) -> dict[str, Any]:
    path = rundir / "control.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        raise CliError(f"no supervisor runs in {rundir} (start one with "
                       f"`xmp run TOPOLOGY --rundir {rundir}`)") from None
    with sock:
        sock.sendall((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            if waiting is not None:   # called every 0.1 s until the answer comes (progress)
                while not select.select([sock], [], [], 0.1)[0]:
                    waiting()
            chunk = sock.recv(65536)
            if not chunk:
                raise CliError("the supervisor closed the connection")
            buf += chunk
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise CliError(reply.get("error", "failed"))
    return reply


# -- commands ------------------------------------------------------------------


@command("run", "Start a supervisor and the domains of a topology file (xmp's own)", "[options] <Topology>",
         arg("topology", metavar="Topology"),
         arg("--detach", action="store_true", help="Return once every domain runs (stop it with "
             "`xmp destroy Domain-0`)."))
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
    from xmp.toolstack.runlock import RunLock

    try:  # refused here, in the same words as in the foreground (the child takes the lock again)
        RunLock(rundir).release()
    except XmpError as exc:
        raise CliError(str(exc)) from None
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


# -- looking domains up --------------------------------------------------------


def _rundir(args) -> Path:
    return Path(args.rundir) if args.rundir else default_rundir()


def _domains(args) -> list[dict[str, Any]]:
    return request(_rundir(args), "list")["domains"]


def _find(doms: list[dict[str, Any]], ref: str) -> dict[str, Any]:
    """A domain by name or id, as the hypervisor's find (the living first)."""
    for d in sorted(doms, key=lambda d: d.get("state") == "dying"):
        if str(d["domid"]) == ref or d["name"] == ref:
            return d
    raise CliError(f"domain '{ref}' does not exist")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


# -- commands, in xl's order (xl_cmdtable.c) ----------------------------------


@command("create", "Create a domain from config file <filename>", "<ConfigFile> [options]",
         arg("file", metavar="ConfigFile"),
         arg("-p", dest="paused", action="store_true", help="Leave the domain paused after it is created."),
         arg("-c", dest="console", action="store_true",
             help="Connect to the console after the domain is created."))
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


@command("list", "List information about all/some domains", "[options] [Domain...]",
         arg("doms", nargs="*", metavar="Domain"),
         arg("-l", "--long", dest="json", action="store_true", help="The same as --json, as xl list -l."),
         arg("-v", "--verbose", action="store_true", help="Prints out UUIDs and the shutdown reason code."),
         table=True)
def cmd_list(args) -> int:
    doms = _domains(args)
    if args.doms:
        doms = [_find(doms, ref) for ref in args.doms]
    if args.json:
        _print_json(doms)
        return 0
    sys.stdout.write(list_table(doms, args.verbose))
    return 0


def list_table(doms: list[dict[str, Any]], verbose: bool = False) -> str:
    """xl list's exact header and rows (tools/xl/xl_info.c, list_domains):
    ``%-40s %5d %5lu %5d     %c%c%c%c%c%c  %8.1f``; -v adds
    `` <uuid> %8x|%8s %16s`` (reason code, and the security label xmp does
    not have: "-")."""
    out = ["Name" + " " * 40 + "ID   Mem VCPUs\tState\tTime(s)"
           + ("   UUID                            Reason-Code\tSecurity Label" if verbose else "") + "\n"]
    for d in doms:
        row = (f"{d['name']:<40} {d['domid']:5d} {d['mem_kb'] // 1024:5d} {d['vcpus']:5d}     "
               f"{d['state_letters']:6}  {d['cpu_time']:8.1f}")
        if verbose:
            code = SHUTDOWN_REASONS.get(d.get("shutdown_reason") or "", 0)
            reason = f"{code:8x}" if d["state"] == "shutdown" else f"{'-':>8}"
            row += f" {d['uuid']} {reason} {'-':>16}"
        out.append(row + "\n")
    return "".join(out)


def _simple(cmd: str):
    def run(args) -> int:
        request(_rundir(args), cmd, dom=args.dom)
        return 0
    return run


command("destroy", "Terminate a domain immediately", "<Domain>", DOM)(_simple("destroy"))

_SHUTDOWN_ARGS = (arg("dom", nargs="?", metavar="Domain"),
                  arg("-a", "--all", action="store_true", help="Every guest (all but Domain-0)."),
                  arg("-w", "--wait", dest="wait", action="store_true", help="Wait for the guest(s) to go."),
                  arg("-F", "--force", action="store_true",
                      help="Destroy a guest that has not gone within the timeout."),
                  arg("--timeout", type=float, default=30.0, metavar="S",
                      help="Seconds -w and -F wait (default 30)."))


@command("shutdown", "Issue a shutdown signal to a domain", "[options] <-a|Domain>", *_SHUTDOWN_ARGS)
def cmd_shutdown(args, reason: str = "poweroff") -> int:
    rundir = _rundir(args)
    if bool(args.all) == bool(args.dom):
        raise UsageError("name one domain, or give -a for every guest")
    if args.all:
        refs = [str(d["domid"]) for d in _domains(args) if d["domid"] != 0 and d["state"] == "running"]
    else:
        refs = [args.dom]
    asked = {request(rundir, "shutdown", dom=ref, reason=reason)["domid"]: ref for ref in refs}
    if not args.wait and not args.force:
        return 0
    deadline = time.monotonic() + args.timeout
    while asked and time.monotonic() < deadline:
        try:
            doms = request(rundir, "list")["domains"]
        except CliError:
            return 0  # the supervisor stopped (its last guest went): so did these
        alive = {d["domid"] for d in doms if d["state"] != "dying"}
        asked = {domid: ref for domid, ref in asked.items() if domid in alive}
        if asked:
            time.sleep(0.05)
    if not asked:
        return 0
    late = ", ".join(asked.values())
    if args.force:
        for domid in asked:
            request(rundir, "destroy", dom=str(domid))
        print(f"xmp: {late} did not shut down within {args.timeout:g} s: destroyed", file=sys.stderr)
        return 0
    raise CliError(f"{late} did not shut down within {args.timeout:g} s (-F destroys it)")


@command("reboot", "Issue a reboot signal to a domain", "[options] <-a|Domain>", *_SHUTDOWN_ARGS)
def cmd_reboot(args) -> int:
    return cmd_shutdown(args, "reboot")


command("pause", "Pause execution of a domain", "<Domain>", DOM)(_simple("pause"))
command("unpause", "Unpause a paused domain", "<Domain>", DOM)(_simple("unpause"))


@command("console", "Attach to domain's console", "<Domain>", DOM)
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


@command("suspend", "Suspend a domain to RAM", "<Domain>", DOM)
def cmd_suspend(args) -> int:
    request(_rundir(args), "shutdown", dom=args.dom, reason="suspend")
    return 0


@command("resume", "Resume a domain from RAM", "<Domain>", DOM)
def cmd_resume(args) -> int:
    request(_rundir(args), "resume", dom=args.dom)
    return 0


@command("save", "Save a domain state to restore later", "[options] <Domain> <CheckpointFile>",
         arg("-c", dest="checkpoint", action="store_true",
             help="Leave domain running after creating the snapshot."),
         arg("-p", dest="paused", action="store_true",
             help="Leave domain paused after creating the snapshot."),
         arg("--timeout", type=float, default=60.0, help="Seconds the domain gets to suspend (default 60)."),
         DOM, arg("file", metavar="CheckpointFile"))
def cmd_save(args) -> int:
    """xl save: the image is written by the supervisor (it holds the RAM),
    into FILE, which appears only once complete; on a terminal the growing
    hidden file beside it shows the progress."""
    path = os.path.abspath(args.file)
    show = _save_progress(Path(path)) if sys.stderr.isatty() else None
    reply = request(_rundir(args), "save", waiting=show, dom=args.dom, path=path,
                    checkpoint=args.checkpoint, paused=args.paused, timeout=args.timeout)
    if show is not None:
        sys.stderr.write("\r\033[K")
    rate = reply["bytes"] / max(reply["write_seconds"], 1e-6) / 1e6
    print(f"xmp: saved {reply['name']!r} to {reply['path']}: {reply['pages']} pages, "
          f"{reply['bytes'] / 1e6:.1f} MB in {reply['seconds']:.2f} s ({rate:.0f} MB/s written)")
    return 0


def _save_progress(path: Path) -> Callable[[], None]:
    t0 = time.monotonic()

    def show() -> None:
        partial = next(iter(path.parent.glob(f".{path.name}.*.partial")), None)
        try:
            size = partial.stat().st_size if partial is not None else 0
        except OSError:
            size = 0
        dt = time.monotonic() - t0
        what = (f"~{size >> 12} pages of data, {size / 1e6:.1f} MB, {size / dt / 1e6:.0f} MB/s" if size
                else "suspending")
        sys.stderr.write(f"\rxmp save: {what} ({dt:.1f} s)\033[K")
        sys.stderr.flush()
    return show


@command("restore", "Restore a domain from a saved state", "[options] <CheckpointFile>",
         arg("-p", dest="paused", action="store_true", help="Do not unpause domain after restoring it."),
         arg("-c", dest="console", action="store_true",
             help="Connect to the console after the domain is created."),
         arg("file", metavar="CheckpointFile"))
def cmd_restore(args) -> int:
    reply = request(_rundir(args), "restore", path=os.path.abspath(args.file), paused=args.paused)
    print(f"xmp: restored domain {reply['name']!r} (id {reply['domid']}): {reply['pages']} pages "
          f"in {reply['seconds']:.2f} s")
    if args.console:
        return _attach(_rundir(args), str(reply["domid"]))
    return 0


@command("migrate", "Migrate a domain to another host", "[options] <Domain> <Host[:Port]>",
         arg("--live", action="store_true", help="Pre-copy: the domain runs while its memory is copied "
             "(without: suspend, then copy)."),
         arg("-p", dest="paused", action="store_true", help="Do not unpause domain after migrating it."),
         arg("--json", action="store_true", help="Print the result (rounds, downtime, times) as JSON."),
         arg("--shared", metavar="DIR", help="A directory both hosts see, for the handover's decision "
             "(default: the directory of the domain's first disk image)."),
         DOM, arg("host", metavar="Host[:Port]"))
def cmd_migrate(args) -> int:
    """xl migrate: the source's supervisor sends the domain to the other
    host's (its ``[host] migrate`` address; port 8002 when not given)."""
    address = args.host if args.host.rpartition(":")[2].isdigit() and not args.host.endswith("]") \
        else f"{args.host}:{MIGRATE_PORT}"
    rundir = _rundir(args)
    show = _migrate_progress(rundir, args.dom) if sys.stderr.isatty() and not args.json else None
    try:
        reply = request(rundir, "migrate", waiting=show, dom=args.dom, address=address, live=args.live,
                        paused=args.paused, shared=os.path.abspath(args.shared) if args.shared else None)
    finally:
        if show is not None:
            show.stop()  # type: ignore[attr-defined]
    if args.json:
        reply.pop("ok", None)
        print(json.dumps(reply))
        return 0
    for r in reply["rounds"]:
        what = "suspended" if r.get("suspended") else f"{r['mb_s']:.0f} MB/s, {r['dirty']} dirtied"
        print(f"  round {r['round']}: {r['pages']} pages in {r['seconds'] * 1000:.0f} ms ({what})")
    print(f"xmp: migrated {reply['name']!r} to {reply['address']} (id {reply['remote_domid']} there): "
          f"{len(reply['rounds'])} rounds, {reply['pages_sent']} pages sent for {reply['tot_pages']}, "
          f"{reply['seconds']:.2f} s in all, downtime {reply['downtime_ms']:.1f} ms")
    return 0


MIGRATE_PORT = 8002


def _migrate_progress(rundir: Path, dom: str) -> Callable[[], None]:
    """A progress bar per round (rich), from the supervisor's status of the migration."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                   console=Console(stderr=True),
                   transient=False)
    bar.start()
    tasks: dict[int, Any] = {}
    last = [0.0]

    def show() -> None:
        now = time.monotonic()
        if now - last[0] < 0.2:
            return
        last[0] = now
        try:
            st = request(rundir, "migrate-status", dom=dom)
        except CliError:
            return
        for r in st["rounds"]:
            n = r["round"]
            if n not in tasks:
                tasks[n] = bar.add_task(f"round {n}", total=max(r["pages"], 1), info="")
            info = "suspended" if r.get("suspended") else \
                f"{r['pages']} pages, {r['mb_s']:.0f} MB/s, dirty {r['dirty_pages_s']} pages/s"
            bar.update(tasks[n], completed=max(r["pages"], 1), info=info)
    show.stop = bar.stop  # type: ignore[attr-defined]
    return show


@command("dump-core", "Core dump a domain", "<Domain> <filename>", DOM, arg("file", metavar="filename"))
def cmd_dump_core(args) -> int:
    request(_rundir(args), "dump-core", dom=args.dom, path=os.path.abspath(args.file))
    return 0


MEM_USAGE = "<Domain> <MemMB['b'[bytes]|'k'[KB]|'m'[MB]|'g'[GB]|'t'[TB]]>"  # xl's: a bare number is MiB


def _mem_kb(text: str) -> int:
    from xmp.toolstack.memory import parse_mem_size_kb

    try:
        return parse_mem_size_kb(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None


@command("mem-max", "Set the maximum amount reservation for a domain", MEM_USAGE, DOM,
         arg("size", metavar="Mem"))
def cmd_mem_max(args) -> int:
    request(_rundir(args), "mem-max", dom=args.dom, memkb=_mem_kb(args.size))
    return 0


@command("mem-set", "Set the current memory usage for a domain", f"[--timeout S] {MEM_USAGE}", DOM,
         arg("size", metavar="Mem"),
         arg("--timeout", type=float, default=10.0, metavar="S",
             help="Seconds to wait for the guest to reach it (default 10; 0: do not wait)."))
def cmd_mem_set(args) -> int:
    request(_rundir(args), "mem-set", dom=args.dom, memkb=_mem_kb(args.size), timeout=args.timeout)
    return 0


@command("sched-credit", "Get/set credit scheduler parameters", "[-d <Domain> [-w[=WEIGHT]|-c[=CAP]]]",
         arg("-d", "--domain", dest="dom", metavar="Domain", help="Domain to modify"),
         arg("-w", "--weight", type=int, metavar="WEIGHT", help="Weight (int, 1..65535, default 256)"),
         arg("-c", "--cap", type=int, metavar="CAP", help="Cap (int, percent of one CPU, 0 = none)"),
         table=True)
def cmd_sched_credit(args) -> int:
    if args.dom is None and (args.weight is not None or args.cap is not None):
        raise CliError("Must specify a domain.")
    reply = request(_rundir(args), "sched-credit", dom=args.dom, weight=args.weight, cap=args.cap)
    if args.json:
        _print_json(reply["domains"])
        return 0
    if args.weight is not None or args.cap is not None:
        return 0  # xl sets silently
    # xl_sched.c: the pool line (listing all), then "%-33s %4s %6s %4s" and "%-33s %4d %6d %4d" rows
    if args.dom is None:
        print(f"Cpupool {reply['pool']}: tslice={reply['tslice_ms']}ms ratelimit={reply['ratelimit_us']}us "
              f"migration-delay={reply['migration_delay_us']}us")
    print(f"{'Name':<33} {'ID':>4} {'Weight':>6} {'Cap':>4}")
    for d in reply["domains"]:
        print(f"{d['name']:<33} {d['domid']:4d} {d['weight']:6d} {d['cap']:4d}")
    return 0


@command("vcpu-list", "List the VCPUs for all/some domains", "[Domain, ...]",
         arg("doms", nargs="*", metavar="Domain"), table=True)
def cmd_vcpu_list(args) -> int:
    rows = request(_rundir(args), "vcpu-list", doms=args.doms)["vcpus"]
    if args.json:
        _print_json(rows)
        return 0
    sys.stdout.write(vcpu_table(rows))
    return 0


def vcpu_table(rows: list[dict[str, Any]]) -> str:
    """xl vcpu-list's header and rows (tools/xl/xl_vcpu.c, print_vcpuinfo):
    ``%-32s %5u %5u`` then ``%5u %3c%c- `` (``%5c %3c%cp `` offline), ``%9.1f  ``,
    the hard / soft maps as print_bitmap writes them."""
    out = ["%-32s %5s %5s %5s %5s %9s %s\n" % ("Name", "ID", "VCPU", "CPU", "State",  # noqa: UP031
                                              "Time(s)", "Affinity (Hard / Soft)")]
    for r in rows:
        line = f"{r['name']:<32} {r['domid']:5d} {r['vcpu']:5d}"
        if r["online"]:
            line += f"{r['cpu']:5d} {'r' if r['running'] else '-':>3}{'b' if r['blocked'] else '-'}- "
        else:
            line += f"{'-':>5} {'-':>3}-p "
        every = r["all_cpus"]
        line += f"{r['cpu_time']:9.1f}  {_bitmap(r['hard'], every)} / {_bitmap(r['soft'], every)}"
        out.append(line + "\n")
    return "".join(out)


def _bitmap(cpus: list[int], every: list[int]) -> str:
    """xl's print_bitmap: ``all``, else ranges ``0-2,5``."""
    if set(every) <= set(cpus):
        return "all"
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@command("vcpu-pin", "Set which CPUs a VCPU can use",
         "<Domain> <VCPU|all> <Hard affinity|-> [Soft affinity|-]", DOM, arg("vcpu", metavar="VCPU"),
         arg("hard", metavar="Hard"), arg("soft", nargs="?", metavar="Soft"))
def cmd_vcpu_pin(args) -> int:
    request(_rundir(args), "vcpu-pin", dom=args.dom, vcpu=args.vcpu, hard=args.hard, soft=args.soft)
    return 0


@command("vcpu-set", "Set the number of active VCPUs allowed for the domain", "<Domain> <vCPUs>",
         DOM, arg("vcpus", metavar="vCPUs"))
def cmd_vcpu_set(args) -> int:
    if not args.vcpus.isdigit():
        raise CliError(f"invalid number of vCPUs '{args.vcpus}'")
    request(_rundir(args), "vcpu-set", dom=args.dom, vcpus=int(args.vcpus))
    return 0


@command("vm-list", "List guest domains, excluding dom0, stubdoms, etc.", "", table=True)
def cmd_vm_list(args) -> int:
    doms = [d for d in _domains(args) if d["state"] != "dying"]
    if args.json:
        _print_json([{"uuid": d["uuid"], "domid": d["domid"], "name": d["name"]} for d in doms])
        return 0
    sys.stdout.write(vm_list_table(doms))
    return 0


def vm_list_table(doms: list[dict[str, Any]]) -> str:
    """xl vm-list (xl_info.c, list_vm): a header, then ``%s  %d    %-30s``
    (dom0 included, as libxl_list_vm gives it, whatever the summary says)."""
    return "UUID                                  ID    name\n" + "".join(
        f"{d['uuid']}  {d['domid']}    {d['name']:<30}\n" for d in doms)


@command("info", "Get information about Xen host", "[options] [Key]", arg("key", nargs="?", metavar="Key"),
         table=True)
def cmd_info(args) -> int:
    """xl info's facts (:mod:`xmp.toolstack.physinfo`), then xmp's own:
    descriptors, capacity, isolation, and the supervisor in the run
    directory if one runs there."""
    from xmp.hv.jail import describe
    from xmp.limits import describe_capacity, nofile_limits
    from xmp.sharedmem import _ffi  # noqa: F401  (fails with instructions if not built)
    from xmp.toolstack import physinfo

    rundir = _rundir(args)
    host: dict[str, Any] | None = None
    try:
        host = request(rundir, "info")
        supervisor = (f"{rundir}: {host['domains']} domains of {host['capacity']} it can hold "
                      f"(RLIMIT_NOFILE {host['nofile']}), {host['pool_free_mib']} MiB of its pool free")
    except CliError as exc:
        supervisor = str(exc)
    soft, hard = nofile_limits()
    facts = physinfo.host_facts(host) + [
        ("xmp_version", version("xmp")), ("xmp_fast_path", "built (xmp.sharedmem._fast)"),
        ("xmp_descriptors", f"RLIMIT_NOFILE soft {soft}, hard {hard} (`xmp run` raises soft to hard)"),
        ("xmp_capacity", describe_capacity(hard)),
        *(("xmp_isolation", line) for line in describe()),
        ("xmp_supervisor", supervisor)]
    if args.json:
        merged: dict[str, Any] = {}
        for key, value in facts:
            if key == "xmp_isolation":  # several lines
                merged.setdefault(key, []).append(value)
            else:
                merged[key] = value
        _print_json(merged)
        return 0
    sys.stdout.write(physinfo.render(facts, args.key))
    return 0


@command("domid", "Convert a domain name to domain id", "<DomainName>", arg("name", metavar="DomainName"))
def cmd_domid(args) -> int:
    found = [d for d in _domains(args) if d["name"] == args.name]
    if not found:
        raise CliError(f"domain '{args.name}' does not exist")
    print(_find(found, args.name)["domid"])
    return 0


@command("domname", "Convert a domain id to domain name", "<DomainId>", arg("domid", metavar="DomainId"))
def cmd_domname(args) -> int:
    if not args.domid.isdigit():
        raise CliError(f"'{args.domid}' is not a domain id")
    found = [d for d in _domains(args) if d["domid"] == int(args.domid)]
    if not found:
        raise CliError(f"domain '{args.domid}' does not exist")
    print(found[0]["name"])
    return 0


@command("rename", "Rename a domain", "<Domain> <NewDomainName>", DOM, arg("name", metavar="NewDomainName"))
def cmd_rename(args) -> int:
    request(_rundir(args), "rename", dom=args.dom, name=args.name)
    return 0


TRIGGERS = ("nmi", "reset", "init", "power", "sleep", "s3resume")


@command("trigger", "Send a trigger to a domain", f"<Domain> <{'|'.join(TRIGGERS)}> [<VCPU>]",
         DOM, arg("trigger", metavar="Trigger"), arg("vcpu", nargs="?", type=int, default=0, metavar="VCPU"))
def cmd_trigger(args) -> int:
    if args.trigger not in TRIGGERS:
        raise CliError(f"Invalid trigger \"{args.trigger}\" (one of {', '.join(TRIGGERS)})")
    request(_rundir(args), "trigger", dom=args.dom, trigger=args.trigger, vcpu=args.vcpu)
    return 0


@command("sysrq", "Send a sysrq to a domain", "<Domain> <letter>", DOM, arg("key", metavar="letter"))
def cmd_sysrq(args) -> int:
    if len(args.key) != 1:
        raise CliError(f"a sysrq is one letter, not '{args.key}'")
    request(_rundir(args), "sysrq", dom=args.dom, key=args.key)
    return 0


@command("dmesg", "Read and/or clear dmesg buffer", "[-c]",
         arg("-c", dest="clear", action="store_true", help="Clear dmesg buffer as well as printing it."))
def cmd_dmesg(args) -> int:
    for line in request(_rundir(args), "dmesg", clear=args.clear)["lines"]:
        print(line)
    return 0


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
        if args.json:
            _print_json(reply["devices"])
            return 0
        print(reply["header"])
        for row in reply["rows"]:
            print(row)
        return 0
    return run


for _cls in devices.DEVICE_CLASSES:  # <command>-attach / -list / -detach for each device class
    if _cls.command is None:
        continue
    _stem = _cls.command
    command(f"{_stem}-attach", f"Create a new virtual {_stem} device", f"<Domain> <{_cls.config_key}-spec>",
            DOM, arg("spec", metavar="Spec"))(_device_attach(_cls))
    command(f"{_stem}-list", f"List virtual {_stem} devices for a domain", "<Domain>", DOM,
            table=True)(_device_list(_cls))
    command(f"{_stem}-detach", f"Destroy a domain's virtual {_stem} device", "[options] <Domain> <DevId>",
            DOM, arg("device", metavar="DevId"),
            arg("--force", action="store_true", help="Remove it without waiting for the guest."),
            arg("--timeout", type=float, default=10.0, metavar="S",
                help="Seconds to wait for Closed (default 10)."))(_device_detach(_cls))


def _host_command(cls, hc):
    """xmp <command>-<op> [ARG]: a class's host command (xmp.devices.HostCommand)."""
    def run(args) -> int:
        fields: dict[str, Any] = {"class": cls.command, "op": hc.op, "arg": getattr(args, "arg", None)}
        reply = request(_rundir(args), "class-op", **fields)
        if getattr(args, "json", False):
            _print_json(reply.get("devices", []))
            return 0
        for row in reply.get("rows", []):
            print(row)
        return 0
    return run


for _cls in devices.DEVICE_CLASSES:  # a class's own host commands (xl's pci-assignable-*)
    for _hc in _cls.host_commands:
        command(f"{_cls.command}-{_hc.op}", _hc.summary, f"<{_hc.arg}>" if _hc.arg else "",
                *([arg("arg", metavar=_hc.arg)] if _hc.arg else []),
                table=_hc.arg is None)(_host_command(_cls, _hc))  # a list takes --json


def uptime_string(seconds: int, short: bool) -> str:
    """xl's uptime_to_string: ``[N day(s), ]H:MM[:SS]``."""
    day, rest = divmod(seconds, 86400)
    hour, rest = divmod(rest, 3600)
    minute, sec = divmod(rest, 60)
    clock = f"{hour:2d}:{minute:02d}" if short else f"{hour:2d}:{minute:02d}:{sec:02d}"
    return f"{day} days, {clock}" if day > 1 else f"{day} day, {clock}" if day == 1 else clock


@command("uptime", "Print uptime for all/some domains", "[-s] [Domain...]",
         arg("-s", dest="short", action="store_true", help="Print a short uptime output."),
         arg("doms", nargs="*", metavar="Domain"), table=True)
def cmd_uptime(args) -> int:
    doms = request(_rundir(args), "uptime")["domains"]
    if args.doms:
        doms = [_find(doms, ref) for ref in args.doms]
    now = int(time.time())
    rows = [(d["name"], d["domid"], max(0, now - int(d["start_time"]))) for d in doms]
    if args.json:
        _print_json([{"name": n, "domid": i, "uptime": s} for n, i, s in rows])
        return 0
    sys.stdout.write(uptime_table(rows, now, args.short))
    return 0


def uptime_table(rows: list[tuple[str, int, int]], now: int, short: bool) -> str:
    """xl uptime's formats (xl_info.c, print_uptime): ``%-33s %4d %s``, or
    with -s `` %s up %s, %s (%d)``."""
    if short:
        clock = time.strftime("%H:%M:%S", time.localtime(now))
        return "".join(f" {clock} up {uptime_string(s, True)}, {n} ({i})\n" for n, i, s in rows)
    return f"{'Name':<33} {'ID':>4} Uptime\n" + "".join(f"{n:<33} {i:4d} {uptime_string(s, False)}\n"
                                                       for n, i, s in rows)


XENSTORE_CLI_TIMEOUT = 5.0  # seconds `xmp xenstore` waits for an answer


@command("xenstore", "Read and change xenstore (xenstore-ls/-read/-write/-rm/-watch/-chmod; xmp's own)",
         "<ls|read|write|rm|watch|chmod> <Path> [Value|Perm...|Count]",
         arg("op", choices=["ls", "read", "write", "rm", "watch", "chmod"], metavar="Op"),
         arg("path", metavar="Path"),
         arg("values", nargs="*", metavar="Value"))
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
                           "(is Domain-0 paused?)") from None
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




@command("cleanup", "Remove what dead supervisors left: shared memory, and a run directory's sockets "
         "(xmp's own)", "[options]")
def cmd_cleanup(args) -> int:
    from xmp.toolstack.runlock import RunLock

    removed = remove_stale()
    for name in removed:
        print(f"removed /dev/shm/{name}")
    print(f"{len(removed)} stale object(s) of dead supervisors removed")
    for group in sched.remove_stale():
        print(f"removed the cgroup {group} of a dead supervisor")
    rundir = Path(args.rundir) if args.rundir else default_rundir()
    if rundir.is_dir():
        try:
            lock = RunLock(rundir)  # held by a live supervisor: its sockets are in use
        except XmpError as exc:
            print(f"kept the sockets of {rundir}: {str(exc).partition(':')[0]}")
            return 0
        try:
            for sock in [*rundir.glob("*.sock"), *rundir.glob("console/*.sock")]:
                sock.unlink(missing_ok=True)
                print(f"removed {sock}")
        finally:
            lock.release()
    return 0


# -- the entry point -------------------------------------------------------------


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv:
            sys.stdout.write(overview())
            return 1  # as xl with no subcommand
        name, rest = argv[0], argv[1:]
        if name in ("-h", "--help") or (name == "help" and rest[:1] in ([], ["help"])):
            sys.stdout.write(overview())
            return 0
        if name == "--version":
            print(f"xmp {version('xmp')}")
            return 0
        if name == "help":
            if rest[0] not in COMMANDS:
                raise unknown(rest[0])
            sys.stdout.write(COMMANDS[rest[0]].help())
            return 0
        cmd = COMMANDS.get(name)
        if cmd is None:
            raise unknown(name)
        try:
            args = cmd.parser().parse_args(rest)
        except SystemExit as exc:  # --help has printed it
            return int(exc.code or 0)
        return cmd.run(args)
    except UsageError as exc:
        print(f"xmp: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"xmp: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `xmp ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
