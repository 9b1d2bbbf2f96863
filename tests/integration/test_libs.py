"""dom0's libraries (xmp.libs) between real domains: evtchn, gnttab/gntshr,
foreignmemory and their refusals to guests; vchan byte for byte."""

from __future__ import annotations

import json

import pytest
from xmphost import HOST


def _lines(h, name: str, tag: str) -> list[dict]:
    return [json.loads(ln[len(tag):]) for ln in h.console_log(name).splitlines() if ln.startswith(tag)]


def _field(h, name: str, tag: str, key: str, timeout: float = 30):
    def find():
        return next((r for r in _lines(h, name, tag) if key in r), None)
    return h.wait(find, timeout, f"{name}'s {key}")


def _dom0(kernel: str, **args) -> str:
    a = ", ".join(f"{k} = {json.dumps(v)}" for k, v in args.items())
    return HOST.replace("[dom0]\n", f'[dom0]\nkernel = "libkernels:{kernel}"\nargs = {{ {a} }}\n')


def _guest(name: str, kernel: str, memory: int = 32, **args) -> str:
    a = ", ".join(f"{k} = {json.dumps(v)}" for k, v in args.items())
    return (f'[[domain]]\nname = "{name}"\nkernel = "libkernels:{kernel}"\nmemory = {memory}\n'
            f'args = {{ {a} }}\n')


@pytest.mark.timeout(90)
def test_evtchn_gnttab_gntshr_foreignmemory_between_dom0_and_a_guest(hosts):
    h = hosts(_dom0("libdom0", guest=1) + _guest("g", "libguest")).start(("g",))
    refused = _field(h, "g", "libguest: ", "refused")["refused"]
    # a guest may not map grants nor foreign pages (privcmd is dom0's)
    assert refused["gnttab_map"] == "EPERM"
    assert refused["foreign_map"] == "EPERM"
    assert refused["notify_not_ours"] == "EINVAL"
    r = _field(h, "Domain-0", "libdom0: ", "events_via_fd")
    # three events reached dom0's selectors thread through the handle's fd, one per unmask
    assert r["events_via_fd"] == [r["port"]] * 3
    assert r["rw_read"] == ["shared-rw-page!!", "second-rw-page!!"]
    assert r["ro_read"] == "shared-ro-page!!"
    assert r["ro_write"] == "TypeError"
    assert r["ro_as_writable"] != "allowed"
    assert r["foreign_read"] == "shared-rw-page!!dom0-wrote-this!"
    assert r["foreign_errs"] == [0, 0]
    assert r["foreign_beyond"] == "EINVAL"
    g = _field(h, "g", "libguest: ", "events")
    assert g["events"] == 3 and g["reply"] == "dom0-wrote-this!"
    assert _field(h, "g", "libguest: ", "done")["ro_unshared"] is True
    assert h.stop() == 0
    h.assert_clean()


def _vchan_pair(hosts, server: str, client: str, nbytes: int, **extra):
    """Domains "srv" and "cli" (either may be dom0)."""
    topo = HOST
    sid = 0 if server == "dom0" else 1
    cid = 0 if client == "dom0" else (2 if sid == 1 else 1)
    srv_args = {"role": "server", "peer": cid, "bytes": nbytes, "direction": "send"}
    cli_args = {"role": "client", "peer": sid, "server": sid, "bytes": nbytes, "direction": "recv"}
    srv_args.update(extra.get("srv", {}))
    cli_args.update(extra.get("cli", {}))
    guests = ""
    if server == "dom0":
        topo = _dom0("vchanpeer", **srv_args)
    else:
        guests += _guest("srv", "vchanpeer", 48, **srv_args)
    if client == "dom0":
        topo = _dom0("vchanpeer", **cli_args)
    else:
        guests += _guest("cli", "vchanpeer", 48, **cli_args)
    names = tuple(n for n, who in (("srv", server), ("cli", client)) if who != "dom0")
    return hosts(topo + guests).start(names)


def _name(who: str, dom: str) -> str:
    return "Domain-0" if who == "dom0" else dom


@pytest.mark.timeout(240)
@pytest.mark.parametrize("server,client", [("guest", "dom0"), ("dom0", "guest")])
def test_vchan_carries_100_mib_byte_for_byte(hosts, server, client):
    nbytes = 100 << 20
    h = _vchan_pair(hosts, server, client, nbytes)
    s, c = _name(server, "srv"), _name(client, "cli")
    mapped = _field(h, c, "vchanpeer: ", "connected")["mapped"]
    assert mapped is (client == "dom0")  # only dom0 maps; a guest client copies
    sent = _field(h, s, "vchanpeer: ", "sent", 200)
    got = _field(h, c, "vchanpeer: ", "received", 200)
    assert got["received"] == nbytes == sent["sent"]
    assert got["sha"] == sent["sha"]
    assert _field(h, s, "vchanpeer: ", "ack")["ack"] == 16
    _field(h, s, "vchanpeer: ", "closed")
    _field(h, c, "vchanpeer: ", "closed")
    assert h.stop() == 0
    h.assert_clean()
