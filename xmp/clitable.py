"""The ``xmp`` command table and xl's help layout (tools/xl/xl.c help()).

A command is one :func:`command` registration next to its function in
:mod:`xmp.cli`: its name, xl's one-line summary and usage
(``tools/xl/xl_cmdtable.c``), its argparse arguments, and whether it prints
a table (then it takes ``--json``).  Every command takes ``--rundir`` and
``-h``/``--help``; a bad argument is one line with the usage.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from xmp.errors import LocalError


class CliError(Exception):
    """One clear message for the user, and exit status 1."""


class UsageError(CliError):
    """Arguments a command cannot take: one line, and exit status 2."""


RUNDIR_HELP = "The supervisor's run directory (default: $XMP_RUNDIR)."
OPTION_COLUMN = 24  # xl aligns its option help here


@dataclass(frozen=True)
class Arg:
    """One argparse argument: ``add_argument(*names, **kw)``."""

    names: tuple[str, ...]
    kw: dict[str, Any]


def arg(*names: str, **kw: Any) -> Arg:
    return Arg(names, kw)


DOM = arg("dom", metavar="Domain")


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace], int]
    summary: str            # xl's one-line summary
    usage: str              # the arguments, as xl's help shows them
    args: tuple[Arg, ...]
    table: bool             # prints a table: takes --json

    def options(self) -> list[Arg]:
        opts = [a for a in self.args if a.names[0].startswith("-")]
        opts.append(arg("--rundir", metavar="DIR", help=RUNDIR_HELP))
        if self.table:
            opts.append(arg("--json", action="store_true", help="Print the table as JSON."))
        opts.append(arg("-h", "--help", action="store_true", help="Print this help."))
        return opts

    def help(self) -> str:
        """xl's layout: ``Usage: xl <cmd> <usage>``, the summary, the options."""
        lines = []
        for a in self.options():
            flags = ", ".join(a.names) + (f" {a.kw['metavar']}" if "metavar" in a.kw else "")
            text = a.kw.get("help", "")
            if len(flags) >= OPTION_COLUMN:
                lines.append(flags)
                flags = ""
            lines.append(f"{flags:<{OPTION_COLUMN}}{text}")
        return (f"Usage: xmp {self.name} {self.usage}\n\n{self.summary}.\n\n"
                "Options:\n\n" + "\n".join(lines) + "\n")

    def parser(self) -> argparse.ArgumentParser:
        p = _Parser(self, prog=f"xmp {self.name}", add_help=False)
        for a in self.args:
            p.add_argument(*a.names, **a.kw)
        p.add_argument("--rundir", help=RUNDIR_HELP)
        if self.table:
            p.add_argument("--json", action="store_true")
        p.add_argument("-h", "--help", action=_Help, nargs=0)
        return p


class _Parser(argparse.ArgumentParser):
    def __init__(self, cmd: Command, **kw: Any):
        super().__init__(**kw)
        self.cmd = cmd

    def error(self, message: str) -> NoReturn:
        cmd = self.cmd
        raise UsageError(f"{message}; usage: xmp {cmd.name} {cmd.usage} (see xmp help {cmd.name})")


class _Help(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        assert isinstance(parser, _Parser)
        sys.stdout.write(parser.cmd.help())
        raise SystemExit(0)


COMMANDS: dict[str, Command] = {}


def command(name: str, summary: str, usage: str = "", *args: Arg, table: bool = False):
    """Register the decorated function as ``xmp <name>``."""
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise LocalError(f"two commands named {name!r}")
        COMMANDS[name] = Command(name, run, summary, usage, args, table)
        return run
    return register


def overview() -> str:
    """``xmp help``: every command with its summary, in xl's layout."""
    out = ["Usage xmp <subcommand> [args]\n\nxmp full list of subcommands:\n\n"]
    for cmd in COMMANDS.values():
        out.append(f" {cmd.name:<19} ")
        if len(cmd.name) > 19:
            out.append(f"\n {'':<19} ")
        out.append(f"{cmd.summary}\n")
    return "".join(out)


def unknown(name: str) -> CliError:
    near = difflib.get_close_matches(name, list(COMMANDS), n=1)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return UsageError(f"'{name}' is not an xmp command{hint} (xmp help lists them)")
