"""xl vif specs: tables of spec -> VifSpec (xl-network-configuration(5)'s own
examples first), of bad specs -> the message, the random MAC as libxl makes
it, and rates as libxlu_vif.c computes them."""

from __future__ import annotations

import pickle
import random

import pytest

from xmp.drivers.net.spec import (
    VifRate,
    VifSpec,
    VifSpecError,
    parse_rate,
    parse_vifspec,
    random_mac,
)

pytestmark = pytest.mark.timeout(60)


def fixed(octets: bytes):
    """A random source that always answers ``octets``."""
    return lambda n: octets[:n]


M = "00:16:3e:74:3d:76"

GOOD = [
    # xl-network-configuration(5)
    ("mac=00:16:3E:74:3d:76,model=rtl8139,bridge=xenbr0", VifSpec(M, model="rtl8139")),
    ("mac=00:16:3E:74:34:32", VifSpec("00:16:3e:74:34:32")),
    ("mac=00:16:3e:5f:48:e4,bridge=xenbr1", VifSpec("00:16:3e:5f:48:e4", bridge="xenbr1")),
    # the brief's spec, every key
    (f"mac={M}, bridge=xenbr0, ip=10.0.0.2, type=vif, model=e1000, vifname=web0, script=vif-route, "
     "backend=netdom, rate=10Mb/s, mtu=9000",
     VifSpec(M, ip=("10.0.0.2",), model="e1000", vifname="web0", script="vif-route", backend="netdom",
             rate=VifRate(62500, 50000), mtu=9000)),
    # spaces, empty parameters, empty values
    (f"  mac = {M} ,, bridge= br1 ,", VifSpec(M, bridge="br1")),
    (f"mac={M},bridge=,script=", VifSpec(M)),
    # several addresses, v4 and v6, with prefixes
    (f"mac={M},ip=10.0.0.2 10.0.0.3  192.168.1.0/24 fe80::1 2001:db8::/32",
     VifSpec(M, ip=("10.0.0.2", "10.0.0.3", "192.168.1.0/24", "fe80::1", "2001:db8::/32"))),
    # one-digit octets, as xl's strtoul reads them; upper case
    ("mac=0:16:3E:A:b:C", VifSpec("00:16:3e:0a:0b:0c")),
    # a locally administered unicast MAC
    ("mac=02:00:00:00:00:01", VifSpec("02:00:00:00:00:01")),
    (f"mac={M},devid=3,gatewaydev=eth1", VifSpec(M, devid=3, gatewaydev="eth1")),
    (f"mac={M},netdev=eth1", VifSpec(M, gatewaydev="eth1")),
    (f"mac={M},trusted", VifSpec(M, trusted=True)),
    (f"mac={M},untrusted", VifSpec(M, trusted=False)),
    (f"mac={M},mtu=68", VifSpec(M, mtu=68)),
    (f"mac={M},mtu=65535", VifSpec(M, mtu=65535)),
    (f"mac={M},vifname=vif1.0-emu", VifSpec(M, vifname="vif1.0-emu")),
    (f"mac={M},rate=1MB/s@20ms", VifSpec(M, rate=VifRate(20000, 20000))),
]


@pytest.mark.parametrize("spec,expected", GOOD, ids=[g[0] for g in GOOD])
def test_good_specs(spec, expected):
    assert parse_vifspec(spec, randbytes=fixed(b"\xff\xff\xff")) == expected


def test_defaults_as_libxl():
    s = parse_vifspec("", randbytes=fixed(b"\x12\x34\x56"))
    assert s == VifSpec("00:16:3e:12:34:56", mac_generated=True)
    assert (s.bridge, s.type, s.script, s.mtu, s.backend, s.ip, s.rate, s.devid) == \
        ("xenbr0", "vif", "vif-bridge", 1500, None, (), None, None)
    assert s.ifname(5, 0) == "vif5.0" and s.ifname(12, 3) == "vif12.3"
    assert parse_vifspec(f"mac={M},vifname=web0").ifname(5, 0) == "web0"
    assert s.mac_bytes == b"\x00\x16\x3e\x12\x34\x56"


def test_random_mac_clears_the_top_bit_of_the_fourth_octet():
    assert random_mac(fixed(b"\xff\xff\xff")) == "00:16:3e:7f:ff:ff"
    assert random_mac(fixed(b"\x80\x00\x01")) == "00:16:3e:00:00:01"
    rng = random.Random(42)
    macs = {random_mac(rng.randbytes) for _ in range(200)}
    assert len(macs) == 200
    for mac in macs:
        octets = bytes.fromhex(mac.replace(":", ""))
        assert octets[:3] == b"\x00\x16\x3e" and octets[3] < 0x80


def test_seeded_random_source_is_repeatable():
    a = parse_vifspec("bridge=br0", randbytes=random.Random(7).randbytes)
    b = parse_vifspec("bridge=br0", randbytes=random.Random(7).randbytes)
    assert a == b and a.mac_generated and a.mac.startswith("00:16:3e:")


def test_default_source_gives_xen_oui():
    s = parse_vifspec("")
    assert s.mac_generated and s.mac.startswith("00:16:3e:") and int(s.mac[9:11], 16) < 0x80


def test_all_zero_mac_means_generate_one_as_libxl():
    s = parse_vifspec("mac=00:00:00:00:00:00", randbytes=fixed(b"\x01\x02\x03"))
    assert s.mac == "00:16:3e:01:02:03" and s.mac_generated


BAD = [
    ("mac=00:16:3e:74:3d", "bad mac '00:16:3e:74:3d' (want six hex octets separated by colons"),
    ("mac=00:16:3e:74:3d:76:01", "bad mac"),
    ("mac=00-16-3e-74-3d-76", "bad mac"),
    ("mac=00:16:3e:74:3d:7g", "bad mac"),
    ("mac=00:16:3e:74:3d:100", "bad mac"),
    ("mac=01:00:5e:00:00:01", "mac '01:00:5e:00:00:01' is a multicast address"),
    ("mac=ff:ff:ff:ff:ff:ff", "is a multicast address"),
    ("bridge=br0,brige=br1", "unknown key 'brige' (did you mean 'bridge'?)"),
    ("bridge=br0,zzz=1", "unknown key 'zzz'"),
    ("bridge=br0,bridge=br1", "bridge specified twice ('br0', then 'br1')"),
    ("netdev=eth0,gatewaydev=eth1", "gatewaydev specified twice"),
    ("trusted,untrusted", "both trusted and untrusted"),
    ("trusted,trusted", "trusted specified twice"),
    ("xenbr0", "bad parameter 'xenbr0' (want key=value"),
    ("Mac=00:16:3e:00:00:01", "bad parameter"),
    ("type=ioemu", "type 'ioemu' is an emulated NIC, which only HVM guests have"),
    ("type=tap", "unknown type 'tap'"),
    ("ip=10.0.0.300", "bad ip '10.0.0.300'"),
    ("ip=10.0.0.2,10.0.0.3", "bad parameter '10.0.0.3'"),
    ("ip=10.0.0.2 host.example", "bad ip 'host.example'"),
    ("mtu=1500b", "mtu '1500b' is not a number from 68 to 65535"),
    ("mtu=67", "mtu '67' is not a number"),
    ("mtu=65536", "mtu '65536' is not a number"),
    ("mtu=-1", "mtu '-1'"),
    ("devid=x", "devid 'x' is not a number"),
    ("vifname=a/b", "vifname 'a/b' is not an interface name"),
    ("vifname=averyveryverylongname", "is not an interface name"),
    ("vifname=a b", "is not an interface name"),
    ("rate=10Mb", "invalid rate '10Mb'"),
    ("rate=10Tb/s", "invalid rate"),
    ("rate=0MB/s", "rate '0MB/s' is zero or overflows"),
    ("rate=5000000000B/s", "overflows"),
    ("rate=@20ms", "no rate"),
    ("rate=1MB/s@20ks", "invalid replenishment interval '20ks'"),
    ("rate=1MB/s@0ms", "replenishment interval '0ms' is zero"),
    ("rate=1MB/s@5000s", "replenishment interval '5000s' overflows"),
    ("accel=x", "xl option 'accel' is not supported by xmp"),
    ("vlan=10", "xl option 'vlan' is not supported by xmp"),
    ("colo_sock_mirror_id=1", "xl option 'colo_sock_mirror_id' is not supported"),
]


@pytest.mark.parametrize("spec,message", BAD, ids=[b[0] for b in BAD])
def test_bad_specs(spec, message):
    with pytest.raises(VifSpecError) as info:
        parse_vifspec(spec)
    text = str(info.value)
    assert message in text
    assert text.startswith(f"vif spec {spec!r}: ")


def test_error_message_whole():
    with pytest.raises(VifSpecError) as info:
        parse_vifspec("mac=00:16:3e:00:00:01, brige=xenbr1")
    assert str(info.value) == ("vif spec 'mac=00:16:3e:00:00:01, brige=xenbr1': "
                               "unknown key 'brige' (did you mean 'bridge'?)")


def test_error_pickles():
    e = VifSpecError("x", "why")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.spec, e2.reason, str(e2)) == ("x", "why", str(e))


RATES = [
    # xl-network-configuration(5)'s examples
    ("10Mb/s", VifRate(62500, 50000)),            # 10e6 bits = 1.25e6 B/s, per 50 ms
    ("250KB/s", VifRate(12500, 50000)),
    ("1MB/s@20ms", VifRate(20000, 20000)),        # "20,000 bytes in every 20 millisecond period"
    ("100B/s", VifRate(5, 50000)),
    ("800b/s", VifRate(5, 50000)),
    ("1GB/s@1s", VifRate(10**9, 10**6)),
    ("1GB/s@1", VifRate(10**9, 10**6)),           # no unit: seconds
    ("8Kb/s@250us", VifRate(0, 250)),             # 1000 B/s * 250 us rounds down to 0
    ("8Kb/s@250u", VifRate(0, 250)),
    ("1MB/s@5m", VifRate(5000, 5000)),
]


@pytest.mark.parametrize("text,rate", RATES, ids=[r[0] for r in RATES])
def test_rates(text, rate):
    assert parse_rate(text) == rate


def test_rate_xenstore_node():
    assert parse_rate("1MB/s@20ms").xenstore() == "20000,20000"
