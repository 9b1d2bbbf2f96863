"""The ``xmp`` command's table, help and formats, against xl's printf
formats (tools/xl/xl.c help(), xl_info.c list_domains and print_uptime),
written here as C-style ``%`` formats so a drift in either shows."""

# ruff: noqa: UP031  (xl's printf formats, kept as printf formats)
from __future__ import annotations

import time

import pytest

from xmp import cli

pytestmark = pytest.mark.timeout(30)

# xl_cmdtable.c's summaries for the commands xmp shares with xl
XL_SUMMARIES = {
    "create": "Create a domain from config file <filename>",
    "list": "List information about all/some domains",
    "destroy": "Terminate a domain immediately",
    "shutdown": "Issue a shutdown signal to a domain",
    "reboot": "Issue a reboot signal to a domain",
    "pause": "Pause execution of a domain",
    "unpause": "Unpause a paused domain",
    "console": "Attach to domain's console",
    "dump-core": "Core dump a domain",
    "vm-list": "List guest domains, excluding dom0, stubdoms, etc.",
    "info": "Get information about Xen host",
    "domid": "Convert a domain name to domain id",
    "domname": "Convert a domain id to domain name",
    "rename": "Rename a domain",
    "trigger": "Send a trigger to a domain",
    "sysrq": "Send a sysrq to a domain",
    "dmesg": "Read and/or clear dmesg buffer",
    "block-attach": "Create a new virtual block device",
    "block-list": "List virtual block devices for a domain",
    "block-detach": "Destroy a domain's virtual block device",
    "uptime": "Print uptime for all/some domains",
}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_xl_command_has_xls_summary():
    for name, summary in XL_SUMMARIES.items():
        assert cli.COMMANDS[name].summary == summary, name


@pytest.mark.parametrize("argv", [["help"], ["--help"], ["-h"], ["help", "help"]])
def test_help_lists_every_command_in_xls_layout(capsys, argv):
    code, out, err = run(capsys, *argv)
    expected = "Usage xmp <subcommand> [args]\n\nxmp full list of subcommands:\n\n"
    for cmd in cli.COMMANDS.values():  # xl.c help(): " %-19s ", a second line past 19, "%s\n"
        expected += " %-19s " % cmd.name
        if len(cmd.name) > 19:
            expected += "\n %-19s " % ""
        expected += "%s\n" % cmd.summary
    assert (code, out, err) == (0, expected, "")
    assert " uptime              Print uptime for all/some domains\n" in out


def test_no_command_prints_the_list_and_fails_as_xl(capsys):
    code, out, _ = run(capsys)
    assert code == 1 and out.startswith("Usage xmp <subcommand> [args]\n")


@pytest.mark.parametrize("argv", [["help", "sysrq"], ["sysrq", "--help"], ["sysrq", "-h"]])
def test_command_help_states_its_arguments_as_xl(capsys, argv):
    code, out, err = run(capsys, *argv)
    # xl.c help(cmd): "Usage: xl %s %s\n\n%s.\n\n" then "Options:\n\n%s\n"
    head = "Usage: xmp %s %s\n\n%s.\n\n" % ("sysrq", "<Domain> <letter>", "Send a sysrq to a domain")
    assert code == 0 and err == "" and out.startswith(head)
    assert out[len(head):] == (
        "Options:\n\n"
        "--rundir DIR            The supervisor's run directory (default: $XMP_RUNDIR).\n"
        "-h, --help              Print this help.\n")


def test_table_commands_take_json_and_say_so(capsys):
    for name in ("list", "uptime", "block-list"):
        assert cli.COMMANDS[name].table, name
        assert "--json                  Print the table as JSON.\n" in cli.COMMANDS[name].help()
    code, out, _ = run(capsys, "help", "uptime")
    assert out.startswith("Usage: xmp uptime [-s] [Domain...]\n\nPrint uptime for all/some domains.\n\n")
    assert "-s                      Print a short uptime output.\n" in out


def test_every_command_takes_rundir():
    for cmd in cli.COMMANDS.values():
        assert any("--rundir" in a.option_strings for a in cmd.parser()._actions), cmd.name
        assert "--rundir DIR" in cmd.help(), cmd.name


@pytest.mark.parametrize(("typo", "near"), [("lsit", "list"), ("uptme", "uptime"), ("renam", "rename"),
                                            ("sysreq", "sysrq"), ("block-lst", "block-list")])
def test_a_typo_suggests_the_nearest_command(capsys, typo, near):
    code, out, err = run(capsys, typo)
    assert (code, out) == (2, "")
    assert err == f"xmp: '{typo}' is not an xmp command; did you mean '{near}'? (xmp help lists them)\n"
    code, out, err = run(capsys, "help", typo)
    assert code == 2 and f"did you mean '{near}'?" in err and err.count("\n") == 1


def test_nothing_near_gets_no_guess(capsys):
    code, _, err = run(capsys, "zzzzqqq")
    assert code == 2 and err == "xmp: 'zzzzqqq' is not an xmp command (xmp help lists them)\n"


def test_bad_arguments_are_one_line(capsys):
    code, out, err = run(capsys, "rename", "only-one")
    assert (code, out) == (2, "")
    assert err == ("xmp: the following arguments are required: NewDomainName; usage: xmp rename <Domain> "
                   "<NewDomainName> (see xmp help rename)\n")


def test_list_table_is_xls_printf_byte_for_byte():
    doms = [{"name": "Domain-0", "domid": 0, "mem_kb": 65536, "vcpus": 1, "state_letters": "r-----",
             "cpu_time": 12.345},
            {"name": "a-rather-long-guest-name-that-passes-forty-chars", "domid": 17, "mem_kb": 131072 + 512,
             "vcpus": 4, "state_letters": "---sc-", "cpu_time": 98765.25}]
    expected = "Name                                        ID   Mem VCPUs\tState\tTime(s)\n"
    for d in doms:
        expected += "%-40s %5d %5lu %5d     %s  %8.1f\n" % (
            d["name"], d["domid"], d["mem_kb"] // 1024, d["vcpus"], d["state_letters"], d["cpu_time"])
    assert cli.list_table(doms) == expected
    header, dom0 = expected.splitlines()[:2]
    assert header.index("ID") + 1 == dom0.index(" 0 ") + 1 == 45  # the ID header ends over the id column


@pytest.mark.parametrize(("secs", "long", "short"), [
    (0, " 0:00:00", " 0:00"), (59, " 0:00:59", " 0:00"), (3725, " 1:02:05", " 1:02"),
    (86399, "23:59:59", "23:59"), (86400, "1 day,  0:00:00", "1 day,  0:00"),
    (2 * 86400 + 3600 + 61, "2 days,  1:01:01", "2 days,  1:01"),
])
def test_uptime_strings_are_xls(secs, long, short):
    assert cli.uptime_string(secs, False) == long
    assert cli.uptime_string(secs, True) == short


def test_uptime_table_is_xls_printf():
    rows = [("Domain-0", 0, 3725), ("web", 12, 90000)]
    assert cli.uptime_table(rows, 0, False) == (
        "%-33s %4s %s\n" % ("Name", "ID", "Uptime")
        + "%-33s %4d %s\n" % ("Domain-0", 0, " 1:02:05") + "%-33s %4d %s\n" % ("web", 12, "1 day,  1:00:00"))
    now = int(time.time())
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    assert cli.uptime_table(rows, now, True) == (
        " %s up %s, %s (%d)\n" % (clock, " 1:02", "Domain-0", 0)
        + " %s up %s, %s (%d)\n" % (clock, "1 day,  1:00", "web", 12))


def test_list_verbose_is_xls_printf():
    doms = [{"name": "Domain-0", "domid": 0, "mem_kb": 65536, "vcpus": 1, "state_letters": "r-----",
             "cpu_time": 1.0, "uuid": "00000000-0000-0000-0000-000000000000", "state": "running",
             "shutdown_reason": None},
            {"name": "kept", "domid": 3, "mem_kb": 32768, "vcpus": 1, "state_letters": "---sc-",
             "cpu_time": 0.5, "uuid": "8e1f0c6a-3b4d-4c8e-9f00-123456789abc", "state": "shutdown",
             "shutdown_reason": "crash"}]
    lines = cli.list_table(doms, verbose=True).splitlines()
    assert lines[0] == ("Name                                        ID   Mem VCPUs\tState\tTime(s)"
                        "   UUID                            Reason-Code\tSecurity Label")
    assert lines[1].endswith(" 00000000-0000-0000-0000-000000000000" + " %8s" % "-" + " %16s" % "-")
    assert lines[2] == ("%-40s %5d %5lu %5d     %s  %8.1f" % ("kept", 3, 32, 1, "---sc-", 0.5)
                        + " 8e1f0c6a-3b4d-4c8e-9f00-123456789abc" + " %8x" % 3 + " %16s" % "-")
