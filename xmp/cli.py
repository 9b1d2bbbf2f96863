"""The ``xmp`` command.  Named after xl's commands; more arrive with the
hypervisor (run, list, create, destroy, …)."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

from xmp.sharedmem.shm import remove_stale


def cmd_cleanup(args) -> int:
    removed = remove_stale()
    for name in removed:
        print(f"removed /dev/shm/{name}")
    print(f"{len(removed)} stale object(s) of dead supervisors removed")
    return 0


def cmd_info(args) -> int:
    from xmp.sharedmem import _ffi  # noqa: F401  (fails with instructions if not built)

    print(f"xmp {version('xmp')}")
    print("fast path: built (xmp.sharedmem._fast)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xmp", description="Xen's architecture as Linux processes.")
    parser.add_argument("--version", action="version", version=f"xmp {version('xmp')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("info", help="what this installation has").set_defaults(func=cmd_info)
    sub.add_parser("cleanup", help="remove shared-memory objects left by dead supervisors").set_defaults(
        func=cmd_cleanup)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
