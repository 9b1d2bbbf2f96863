"""The topology file: parsing, xl's defaults, one located error per mistake,
and the to_dict/from_dict round trip.  Kernels name real, findable modules
("json:dumps"); they are looked up, never imported or run."""

from __future__ import annotations

import json
import pickle
import socket

import pytest

from xmp import topology
from xmp.errors import XmpError
from xmp.topology import (
    DomainConfig,
    HostConfig,
    Topology,
    TopologyError,
    check_fits,
    load_domain,
    load_topology,
    parse_domain,
    parse_topology,
)

POOL_MIB = 8192


@pytest.fixture(autouse=True)
def fixed_host_memory(monkeypatch):
    # The default pool is the machine's available memory; pin it so that
    # results do not depend on the machine running the tests.
    monkeypatch.setattr(topology, "_available_mib", lambda: POOL_MIB)


FULL = """\
# a lab with a web guest and a network driver domain
[host]
name = "lab"
memory = 4096
rundir = "/tmp/xmp-lab"

[dom0]
memory = 512
maxmem = 1024
vcpus = 2
kernel = "json:dumps"
args = { }

[[domain]]
name = "web"
type = "pv"
memory = 256
maxmem = 512
vcpus = 2
maxvcpus = 4
kernel = "json:dumps"
args = { greeting = "hi", sizes = [1, 2], nested = { ok = true } }
disk = ["format=raw, vdev=xvda, access=rw, target=a.img"]
vif = ["mac=00:16:3e:00:00:01, bridge=xenbr0"]
on_poweroff = "preserve"
on_reboot = "rename-restart"
on_crash = "coredump-restart"
trusted_backend = false
max_event_channels = 2048
max_grant_frames = 32

[[domain]]                  # defaults only
name = "net.0"
driver_domain = true
trusted_backend = true
"""


def test_full_example_parses_with_defaults_filled():
    topo = parse_topology(FULL, "lab.toml")
    assert topo == Topology(
        host=HostConfig(name="lab", memory_mib=4096, rundir="/tmp/xmp-lab"),
        dom0=DomainConfig(
            name="Domain-0", type="pv", memory_mib=512, maxmem_mib=1024, vcpus=2, maxvcpus=2,
            kernel="json:dumps", args={}, devices={}, on_poweroff="destroy", on_reboot="restart",
            on_crash="destroy", driver_domain=True, trusted_backend=True, max_event_channels=4096,
            max_grant_frames=64, source="lab.toml:7"),
        domains=(
            DomainConfig(
                name="web", type="pv", memory_mib=256, maxmem_mib=512, vcpus=2, maxvcpus=4,
                kernel="json:dumps", args={"greeting": "hi", "sizes": [1, 2], "nested": {"ok": True}},
                devices={"disk": ("format=raw, vdev=xvda, access=rw, target=a.img",),
                         "vif": ("mac=00:16:3e:00:00:01, bridge=xenbr0",)}, on_poweroff="preserve",
                on_reboot="rename-restart", on_crash="coredump-restart", driver_domain=False,
                trusted_backend=False, max_event_channels=2048, max_grant_frames=32, source="lab.toml:14"),
            DomainConfig(
                name="net.0", type="pvh", memory_mib=128, maxmem_mib=128, vcpus=1, maxvcpus=1,
                kernel=None, args={}, devices={}, on_poweroff="destroy", on_reboot="restart",
                on_crash="destroy", driver_domain=True, trusted_backend=True, max_event_channels=1023,
                max_grant_frames=64, source="lab.toml:32"),
        ),
    )


def test_empty_file_is_dom0_alone_with_host_defaults():
    topo = parse_topology("", "empty.toml")
    assert topo.host == HostConfig(name=socket.gethostname(), memory_mib=POOL_MIB, rundir=None)
    assert topo.dom0.name == "Domain-0" and topo.dom0.memory_mib == 256 and topo.dom0.maxmem_mib == 256
    assert topo.dom0.kernel is None and topo.dom0.source is None
    assert topo.domains == ()


def test_guest_defaults_follow_xl():
    (d,) = parse_topology('[[domain]]\nname = "a"\nkernel = "json:dumps"\n').domains
    assert (d.type, d.memory_mib, d.maxmem_mib, d.vcpus, d.maxvcpus) == ("pvh", 128, 128, 1, 1)
    assert (d.on_poweroff, d.on_reboot, d.on_crash) == ("destroy", "restart", "destroy")
    assert (d.driver_domain, d.trusted_backend) == (False, False)
    assert (d.max_event_channels, d.max_grant_frames) == (1023, 64)
    assert d.source == "<topology>:1"


def test_kernel_in_a_package_is_found_without_importing_it():
    import sys

    if "email.mime" in sys.modules:
        pytest.skip("email.mime was already imported by something else")
    parse_topology('[[domain]]\nname = "a"\nkernel = "email.mime.text:MIMEText"\n')
    assert "email.mime" not in sys.modules


def test_the_documented_example_parses():
    doc = topology.__doc__
    example = doc[doc.index("    [host]"):doc.index("\nActions are")]
    example = "\n".join(line[4:] for line in example.splitlines())
    for kernel in ("pkg.mod:func", "xmp.guests.hello:main"):  # not written yet: any findable module
        example = example.replace(kernel, "json:dumps")
    topo = parse_topology(example, "doc.toml")
    assert topo.host.memory_mib == 4096 and topo.dom0.kernel == "json:dumps"
    assert [d.name for d in topo.domains] == ["web"] and topo.domains[0].maxvcpus == 2


# (name, toml text, expected line, expected substring of str(error))
GUEST = '[[domain]]\nname = "a"\nkernel = "json:dumps"\n'  # lines 1-3
CASES = [
    # TOML syntax, with tomllib's position
    ("syntax", "[host]\nmemory = \n", 2, "TOML syntax error at column 10"),
    ("syntax-end", "[host]\nmemory = [1,\n", 2, "TOML syntax error at end of document"),
    # unknown tables and keys, with a suggestion
    ("unknown-table", "[hosts]\nmemory = 1\n", 1, "[hosts]: unknown table; did you mean [host]?"),
    ("unknown-array", "[[domians]]\nname = 'a'\n", 1, "did you mean [[domain]]?"),
    ("unknown-top-key", 'name = "x"\n', 1, "name: unknown top-level key"),
    ("unknown-host-key", '[host]\nnmae = "x"\n', 2, "[host]: nmae: unknown key; did you mean 'name'?"),
    ("unknown-dom0-key", '[dom0]\nname = "x"\n', 2, "[dom0]: name: unknown key"),
    ("unknown-domain-key", GUEST + "memroy = 64\n", 4,
     "[[domain]] #1: memroy: unknown key; did you mean 'memory'?"),
    ("unknown-dotted-subtable", GUEST + "[domain.extra]\nx = 1\n", 4, "extra: unknown key"),
    ("unknown-key-no-match", GUEST + "zzz = 1\n", 4, "known keys: name, type"),
    # table shapes
    ("host-array", "[[host]]\nname = 'x'\n", 1,
     "host: expected a table (write [host]), got an array of tables"),
    ("domain-single", '[domain]\nname = "a"\n', 1, "write [[domain]]), got a table"),
    # wrong types: bool is not an int
    ("memory-bool", GUEST + "memory = true\n", 4,
     "[[domain]] 'a': memory: expected an integer, got a boolean (true)"),
    ("memory-float", GUEST + "memory = 1.5\n", 4, "expected an integer, got a float (1.5)"),
    ("vcpus-string", GUEST + 'vcpus = "2"\n', 4, 'expected an integer, got a string ("2")'),
    ("evtchn-bool", GUEST + "max_event_channels = false\n", 4, "got a boolean (false)"),
    ("host-memory-string", '[host]\nmemory = "4G"\n', 2, "[host]: memory: expected an integer"),
    ("host-name-int", "[host]\nname = 5\n", 2, "[host]: name: expected a string, got an integer (5)"),
    ("host-rundir-bool", "[host]\nrundir = true\n", 2, "rundir: expected a string"),
    ("dom0-vcpus-bool", "[dom0]\nvcpus = true\n", 2, "[dom0]: vcpus: expected an integer"),
    ("type-int", GUEST + "type = 1\n", 4, "type: expected a string"),
    ("disk-string", GUEST + 'disk = "xvda"\n', 4, "disk: expected an array of strings, got a string"),
    ("vif-int-item", GUEST + 'vif = ["bridge=xenbr0", 1]\n', 4, "item 1 is an integer (1)"),
    ("args-int", GUEST + "args = 5\n", 4, "args: expected a table, got an integer"),
    ("args-date", GUEST + "args = { when = 1979-05-27 }\n", 4, "args.when is a date"),
    ("driver-int", GUEST + "driver_domain = 1\n", 4, "driver_domain: expected a boolean (true or false)"),
    ("trusted-string", GUEST + 'trusted_backend = "yes"\n', 4, "trusted_backend: expected a boolean"),
    ("kernel-int", '[[domain]]\nname = "a"\nkernel = 5\n', 3, "kernel: expected a string"),
    ("name-int", "[[domain]]\nname = 5\n", 2, "[[domain]] #1: name: expected a string"),
    # out of range
    ("memory-zero", GUEST + "memory = 0\n", 4, "memory: 0 MiB is out of range: must be >= 1"),
    ("memory-negative", GUEST + "memory = -5\n", 4, "must be >= 1"),
    ("host-memory-zero", "[host]\nmemory = 0\n", 2, "[host]: memory: 0 MiB is out of range"),
    ("dom0-memory-zero", "[dom0]\nmemory = 0\n", 2, "[dom0]: memory: 0 MiB is out of range"),
    ("vcpus-zero", GUEST + "vcpus = 0\n", 4, "vcpus: 0 is out of range: must be 1..32"),
    ("vcpus-33", GUEST + "vcpus = 33\n", 4, "vcpus: 33 is out of range: must be 1..32"),
    ("maxvcpus-40", GUEST + "maxvcpus = 40\n", 4, "maxvcpus: 40 is out of range: must be 1..32"),
    ("evtchn-low", GUEST + "max_event_channels = 1\n", 4, "must be 2..4096"),
    ("evtchn-high", GUEST + "max_event_channels = 4097\n", 4, "4097 is out of range: must be 2..4096"),
    ("grant-frames-low", GUEST + "max_grant_frames = 0\n", 4, "must be 1..64"),
    ("grant-frames-high", GUEST + "max_grant_frames = 65\n", 4, "65 is out of range: must be 1..64"),
    ("dom0-vcpus-high", "[dom0]\nvcpus = 64\n", 2, "must be 1..32"),
    # relations
    ("maxmem-below", GUEST + "memory = 256\nmaxmem = 128\n", 5,
     "maxmem: 128 MiB is below memory (256 MiB)"),
    ("maxvcpus-below", GUEST + "vcpus = 4\nmaxvcpus = 2\n", 5, "maxvcpus: 2 is below vcpus (4)"),
    ("dom0-maxmem-below", "[dom0]\nmemory = 512\nmaxmem = 256\n", 3, "[dom0]: maxmem: 256 MiB is below"),
    # actions and types
    ("bad-type", GUEST + 'type = "kvm"\n', 4, "type: 'kvm' is not one of: pv, pvh, hvm"),
    ("bad-poweroff", GUEST + 'on_poweroff = "halt"\n', 4,
     "on_poweroff: 'halt' is not one of: destroy, restart, rename-restart, preserve, "
     "coredump-destroy, coredump-restart"),
    ("bad-reboot", GUEST + 'on_reboot = "soft-reset"\n', 4, "on_reboot: 'soft-reset' is not one of"),
    ("bad-crash", GUEST + 'on_crash = "Destroy"\n', 4, "on_crash: 'Destroy' is not one of"),
    # kernel syntax and module
    ("kernel-no-colon", '[[domain]]\nname = "a"\nkernel = "json"\n', 3,
     "kernel: 'json' is not of the form \"module.path:function\""),
    ("kernel-no-func", '[[domain]]\nname = "a"\nkernel = "json:"\n', 3, "is not of the form"),
    ("kernel-bad-func", '[[domain]]\nname = "a"\nkernel = "json:1x"\n', 3, "is not of the form"),
    ("kernel-bad-module", '[[domain]]\nname = "a"\nkernel = "js-on:f"\n', 3, "is not of the form"),
    ("kernel-empty-part", '[[domain]]\nname = "a"\nkernel = "xmp..x:f"\n', 3, "is not of the form"),
    ("kernel-empty", '[[domain]]\nname = "a"\nkernel = ""\n', 3, "kernel: must not be empty"),
    ("kernel-missing-module", '[[domain]]\nname = "a"\nkernel = "no_such_module_xmp:main"\n', 3,
     "kernel: module 'no_such_module_xmp' not found"),
    ("kernel-missing-submodule", '[[domain]]\nname = "a"\nkernel = "json.no_such:main"\n', 3,
     "module 'json.no_such' not found"),
    ("kernel-parent-not-package", '[[domain]]\nname = "a"\nkernel = "json.decoder.x:main"\n', 3,
     "not found"),
    ("dom0-kernel-missing-module", '[dom0]\nkernel = "no_such_module_xmp:main"\n', 2,
     "[dom0]: kernel: module 'no_such_module_xmp' not found"),
    # names
    ("name-missing", '[[domain]]\nkernel = "json:dumps"\n', 1, "[[domain]] #1: name: missing"),
    ("name-missing-second", GUEST + '\n[[domain]]\nkernel = "json:dumps"\n', 5,
     "[[domain]] #2: name: missing"),
    ("name-empty", '[[domain]]\nname = ""\n', 2, "name: must not be empty"),
    ("name-space", '[[domain]]\nname = "a b"\n', 2, "'a b' is not 1..64 characters"),
    ("name-too-long", f'[[domain]]\nname = "{"x" * 65}"\n', 2, "is not 1..64 characters"),
    ("name-dom0", '[[domain]]\nname = "Domain-0"\n', 2, "'Domain-0' is dom0's name"),
    ("name-incoming", '[[domain]]\nname = "web--incoming"\n', 2, "ends in '--incoming'"),
    ("name-migratedaway", '[[domain]]\nname = "web--migratedaway"\n', 2, "ends in '--migratedaway'"),
    ("name-duplicate", GUEST + '\n[[domain]]\nname = "a"\nkernel = "json:dumps"\n', 6,
     "[[domain]] 'a': name: duplicate name 'a': already used by the [[domain]] at line 2"),
    # a guest needs a kernel
    ("kernel-missing", '\n[[domain]]\nname = "a"\nmemory = 64\n', 2,
     "[[domain]] 'a': kernel: missing: a guest needs kernel"),
    ("kernel-missing-driver-false", '[[domain]]\nname = "a"\ndriver_domain = false\n', 1,
     "or driver_domain = true"),
    # memory: dom0 plus every domain must fit the host pool
    ("dom0-too-big", "[host]\nmemory = 1024\n[dom0]\nmemory = 2048\n", 4,
     "[dom0]: memory: 2048 MiB does not fit: the host pool has 1024 MiB, 0 MiB already given"),
    ("domain-too-big", "[host]\nmemory = 1024\n" + GUEST + "memory = 8192\n", 6,
     "[[domain]] 'a': memory: 8192 MiB does not fit: the host pool has 1024 MiB, 256 MiB already given "
     "to other domains, 768 MiB free; dom0 and all domains need 8448 MiB in total"),
    ("domains-add-up", "[host]\nmemory = 512\n" + GUEST + "memory = 200\n"
     '[[domain]]\nname = "b"\nkernel = "json:dumps"\n', 7,
     "[[domain]] 'b': memory: 128 MiB does not fit: the host pool has 512 MiB, 456 MiB already given"),
    ("default-pool", GUEST + f"memory = {POOL_MIB}\n", 4, f"need {POOL_MIB + 256} MiB in total"),
    # the locator skips multi-line strings and arrays, and follows dotted tables
    ("locator-skips-strings", GUEST + 'vif = [\n  """\ndisk = 1\n""",\n]\ndisk = [2]\n', 9,
     "disk: expected an array of strings, item 0 is an integer"),
    ("locator-skips-nested-arrays", GUEST + "vif = [\n  [1],\n]\nmemory = true\n", 7, "memory: expected"),
    ("locator-second-domain", GUEST + '[[domain]]\nname = "b"\nkernel = "json:dumps"\nvcpus = 0\n', 7,
     "[[domain]] 'b': vcpus: 0 is out of range"),
    ("locator-dotted-key", GUEST + "args.x = 1979-05-27\n", 4, "args.x is a date"),
    ("locator-comments", "# [dom0]\n[dom0]  # dom0\n# memory = 1\nmemory = true  # no\n", 4,
     "[dom0]: memory: expected an integer"),
]


@pytest.mark.parametrize(("text", "line", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_mistake_is_one_located_error(text, line, expected):
    with pytest.raises(TopologyError) as info:
        parse_topology(text, "bad.toml")
    err = info.value
    assert err.path == "bad.toml"
    assert err.line == line, str(err)
    assert str(err).startswith(f"bad.toml:{line}: "), str(err)
    assert expected in str(err)


def test_error_fields_and_format():
    with pytest.raises(TopologyError) as info:
        parse_topology("[host]\nmemory = 1024\n" + GUEST + "memory = 8192\n", "hello.toml")
    err = info.value
    assert isinstance(err, XmpError)
    assert (err.path, err.line, err.key, err.table) == ("hello.toml", 6, "memory", "[[domain]] 'a'")
    assert str(err).startswith("hello.toml:6: [[domain]] 'a': memory: 8192 MiB does not fit")
    assert err.message.endswith("lower memory or raise [host] memory")


def test_errors_pickle():
    with pytest.raises(TopologyError) as info:
        parse_topology(GUEST + "memroy = 1\n", "x.toml")
    for err in (info.value, TopologyError("p", None, None, "m")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is TopologyError
        assert (back.path, back.line, back.key, back.message, back.table) == \
            (err.path, err.line, err.key, err.message, err.table)
        assert str(back) == str(err)
    assert str(TopologyError("p", None, None, "m")) == "p: m"


# -- files --------------------------------------------------------------------

def test_load_topology_reads_a_file(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text(FULL)
    topo = load_topology(path)
    assert topo.domains[0].source == f"{path}:14"


def test_load_topology_reports_the_os_reason(tmp_path):
    with pytest.raises(TopologyError, match="No such file or directory") as info:
        load_topology(tmp_path / "missing.toml")
    assert info.value.path == str(tmp_path / "missing.toml") and info.value.line is None
    with pytest.raises(TopologyError, match="Is a directory"):
        load_topology(tmp_path)
    (tmp_path / "latin1.toml").write_bytes(b'[host]\nname = "\xe9"\n')
    with pytest.raises(TopologyError, match="not UTF-8"):
        load_topology(tmp_path / "latin1.toml")


# -- one-domain files (xmp create FILE) ----------------------------------------

@pytest.mark.parametrize("header", ["[domain]", "[[domain]]"])
def test_parse_domain_accepts_either_form(header):
    cfg = parse_domain(f'{header}\nname = "web"\nkernel = "json:dumps"\nmemory = 64\n', "web.cfg")
    assert (cfg.name, cfg.memory_mib, cfg.kernel, cfg.source) == ("web", 64, "json:dumps", "web.cfg:1")


DOMAIN_CASES = [
    ("empty", "", None, "no domain: a domain file holds exactly one"),
    ("two", GUEST + '[[domain]]\nname = "b"\nkernel = "json:dumps"\n', 4, "[[domain]]: 2 domains"),
    ("empty-array", "domain = []\n", 1, "0 domains"),
    ("other-table", GUEST + "[host]\nmemory = 1\n", 4, "[host]: unknown table"),
    ("dom0-table", "[dom0]\nmemory = 1\n", 1, "[dom0]: unknown table"),
    ("top-key", 'name = "a"\n', 1, "name: unknown top-level key"),
    ("not-a-table", "domain = 5\n", 1, "domain: expected a table, got an integer"),
    ("validated", '[domain]\nname = "a"\nmemory = true\nkernel = "json:dumps"\n', 3,
     "[domain] 'a': memory: expected an integer"),
    ("needs-kernel", '[domain]\nname = "a"\n', 1, "[domain] 'a': kernel: missing"),
    ("syntax", "[domain\n", 1, "TOML syntax error"),
]


@pytest.mark.parametrize(("text", "line", "expected"), [c[1:] for c in DOMAIN_CASES],
                         ids=[c[0] for c in DOMAIN_CASES])
def test_parse_domain_rejects(text, line, expected):
    with pytest.raises(TopologyError) as info:
        parse_domain(text, "d.cfg")
    assert info.value.line == line, str(info.value)
    assert expected in str(info.value)


def test_load_domain(tmp_path):
    path = tmp_path / "web.cfg"
    path.write_text('[domain]\nname = "web"\ndriver_domain = true\n')
    assert load_domain(path).name == "web"
    with pytest.raises(TopologyError, match="No such file"):
        load_domain(tmp_path / "nope.cfg")


# -- to_dict / from_dict -------------------------------------------------------

def test_round_trip_through_json():
    topo = parse_topology(FULL, "lab.toml")
    for cfg in (topo.dom0, *topo.domains):
        data = json.loads(json.dumps(cfg.to_dict()))
        assert DomainConfig.from_dict(data) == cfg


def test_to_dict_uses_the_file_keys_and_copies_args():
    cfg = parse_topology(FULL).domains[0]
    data = cfg.to_dict()
    assert data["memory"] == 256 and data["maxmem"] == 512 and "memory_mib" not in data
    data["args"]["nested"]["ok"] = False
    assert cfg.args["nested"]["ok"] is True


def test_from_dict_fills_defaults_and_leaves_source_unset():
    cfg = DomainConfig.from_dict({"name": "a", "kernel": "json:dumps"})
    assert cfg.memory_mib == 128 and cfg.source is None and cfg.devices == {}
    assert "source" not in cfg.to_dict()


VALID = {"name": "a", "kernel": "json:dumps"}
BAD_DICTS = [
    ("not-a-dict", ["name", "a"], "expected a table of domain keys, got an array"),
    ("memory-bool", {**VALID, "memory": True}, "memory: expected an integer, got a boolean (true)"),
    ("unknown-key", {**VALID, "memroy": 1}, "did you mean 'memory'?"),
    ("missing-name", {"kernel": "json:dumps"}, "name: missing"),
    ("bad-name", {**VALID, "name": "x--incoming"}, "xl reserves for migration"),
    ("kernel-null", {**VALID, "kernel": None}, "kernel: expected a string, got nothing (null)"),
    ("kernel-missing", {"name": "a"}, "kernel: missing"),
    ("kernel-not-found", {**VALID, "kernel": "no_such_module_xmp:f"}, "not found"),
    ("maxmem-below", {**VALID, "memory": 64, "maxmem": 32}, "below memory"),
    ("disk-items", {**VALID, "disk": [1]}, "item 0 is an integer"),
    ("args-null", {**VALID, "args": {"x": None}}, "args.x is nothing (null)"),
    ("args-key", {**VALID, "args": {1: "x"}}, "keys must be strings"),
    ("action", {**VALID, "on_crash": "explode"}, "not one of"),
    ("source-int", {**VALID, "source": 5}, "source: expected a string"),
    ("dom0-checked", {"name": "Domain-0", "vcpus": 0}, "vcpus: 0 is out of range"),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in BAD_DICTS], ids=[c[0] for c in BAD_DICTS])
def test_from_dict_validates_like_the_file(data, expected):
    with pytest.raises(TopologyError) as info:
        DomainConfig.from_dict(data, "saved.json")
    assert info.value.path == "saved.json" and info.value.line is None
    assert expected in str(info.value)


# -- check_fits ----------------------------------------------------------------

def test_check_fits():
    cfg = parse_domain('[domain]\nname = "web"\nkernel = "json:dumps"\nmemory = 512\n', "web.cfg")
    check_fits(1024, 512, cfg)  # exactly fits
    with pytest.raises(TopologyError) as info:
        check_fits(1024, 768, cfg)
    err = info.value
    assert (err.path, err.line, err.key) == ("web.cfg", 1, "memory")
    assert str(err).startswith("web.cfg:1: domain 'web': memory: 512 MiB does not fit: the host pool has "
                               "1024 MiB, 768 MiB already given to other domains, 256 MiB free")
    unsourced = DomainConfig.from_dict(cfg.to_dict() | {"source": "restored"})
    with pytest.raises(TopologyError) as info:
        check_fits(100, 0, unsourced)
    assert (info.value.path, info.value.line) == ("restored", None)


def test_xenstore_quota_is_checked_and_kept():
    base = '[[domain]]\nname = "a"\nkernel = "json:dumps"\n'
    cfg = parse_topology(base + "xenstore_quota = { nodes = 2000, watches = 256 }\n").domains[0]
    assert cfg.xenstore_quota == {"nodes": 2000, "watches": 256}
    assert DomainConfig.from_dict(cfg.to_dict()).xenstore_quota == {"nodes": 2000, "watches": 256}
    with pytest.raises(TopologyError, match="no quota named 'node': did you mean 'nodes'"):
        parse_topology(base + "xenstore_quota = { node = 5 }\n")
    with pytest.raises(TopologyError, match="nodes: expected a positive integer"):
        parse_topology(base + "xenstore_quota = { nodes = 0 }\n")
    with pytest.raises(TopologyError, match=":4: .*xenstore_quota: expected a table"):
        parse_topology(base + 'xenstore_quota = "nodes=5"\n', "t.toml")


@pytest.mark.parametrize("value, problem", [
    ('"200000-265535"', None), ('"7-7"', None),
    ('"0-10"', "is not a range of uids"), ('"10-5"', "is not a range of uids"),
    ('"abc"', "is not a range of uids"), ("5", "expected a string, got an integer (5)"),
])
def test_host_guest_uids_is_a_range_of_uids(value, problem):
    text = f"[host]\nmemory = 1024\nguest_uids = {value}\n"
    if problem is None:
        first, last = (int(x) for x in value.strip('"').split("-"))
        assert topology.parse_topology(text).host.guest_uids == (first, last)
        return
    with pytest.raises(topology.TopologyError) as err:
        topology.parse_topology(text, "t.toml")
    assert str(err.value).startswith("t.toml:3: [host]: guest_uids: ") and problem in str(err.value)
    assert topology.parse_topology("[host]\nmemory = 1024\n").host.guest_uids == topology.GUEST_UIDS
