"""The network class's toolstack part and its topology keys: what libxl
would write for a vif, MACs chosen once, [host] bridges checked."""

from __future__ import annotations

import pytest

from xmp.drivers.net import toolstack
from xmp.topology import TopologyError, parse_topology

GUEST = '[[domain]]\nname = "g"\nkernel = "json:dumps"\n'


def test_a_random_mac_is_pinned_once_in_the_config():
    topo = parse_topology(GUEST + 'vif = ["bridge=xb0", "mac=00:16:3e:00:00:07"]\n', "t.toml")
    first, second = topo.domains[0].devices["vif"]
    assert second == "mac=00:16:3e:00:00:07"
    mac = toolstack.parse(first).mac
    assert mac.startswith("00:16:3e:") and toolstack.parse(first).mac_generated is False
    assert toolstack.pinned(first) == first  # pinning is idempotent: the MAC stays across reboots


def test_vif_keys_as_libxl_writes_them():
    spec = toolstack.indexed(toolstack.parse("mac=00:16:3e:01:02:03, bridge=xb1, ip=10.1.2.3/24, "
                                             "script=vif-switch, mtu=9000"), 2)
    dev = toolstack.device(spec, base=None)  # type: ignore[arg-type]
    assert dev.devid == 2 and dev.name == "00:16:3e:01:02:03"
    assert dev.back_keys == {"mac": "00:16:3e:01:02:03", "bridge": "xb1", "script": "vif-switch",
                             "handle": "2", "mtu": "9000", "type": "vif", "ip": "10.1.2.3/24"}
    assert dev.front_keys == {"mac": "00:16:3e:01:02:03", "handle": "2", "mtu": "9000", "ip": "10.1.2.3/24"}
    assert toolstack.indexed(toolstack.parse("mac=00:16:3e:01:02:03, devid=7"), 2).devid == 7


def test_network_list_row_has_xl_columns():
    row = toolstack.list_row(0, {"backend-id": "0", "mac": "00:16:3e:01:02:03", "handle": "0", "state": "4",
                                 "event-channel": "9", "tx-ring-ref": "768", "rx-ring-ref": "769",
                                 "backend": "/local/domain/0/backend/vif/1/0"})
    assert row.split() == ["0", "0", "00:16:3e:01:02:03", "0", "4", "9", "768/769",
                           "/local/domain/0/backend/vif/1/0"]
    assert toolstack.LIST_HEADER.split()[:3] == ["Idx", "BE", "Mac"]


def test_host_bridges_parse():
    topo = parse_topology('[host]\nbridges = { xb0 = "10.9.0.1/24" }\n', "t.toml")
    assert topo.host.bridges == {"xb0": "10.9.0.1/24"}


@pytest.mark.parametrize("value,message", [
    ('{ xb0 = "10.9.0.1" }', "needs its prefix"),
    ('{ xb0 = "nonsense/24" }', "is not an address"),
    ('{ "a b" = "10.9.0.1/24" }', "is not an interface name"),
    ('"xb0"', "expected a table"),
])
def test_host_bridges_refused(value, message):
    with pytest.raises(TopologyError, match=message):
        parse_topology(f"[host]\nbridges = {value}\n", "t.toml")


def test_a_bad_vif_spec_names_the_key():
    with pytest.raises(TopologyError, match="vif.*unknown key 'bridg'"):
        parse_topology(GUEST + 'vif = ["bridg=xb0"]\n', "t.toml")
