"""Two hosts on one machine, each a supervisor in its own network namespace,
joined by a veth pair: the migration channel between them, authenticated
with the key both were given out of band."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from netns import NetnsPair, namespaces
from xmphost import ENV, HOST

from xmp.migration.channel import connect, generate_key, load_key

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                 reason="network namespaces need root and iproute2")]

CLIENT = textwrap.dedent("""
    import json, sys
    from xmp.migration.channel import MigrationRefused, connect, load_key
    try:
        with connect(sys.argv[1], load_key(sys.argv[2])) as s:
            print(json.dumps({"answer": json.loads(s.recv()[1:])}))
    except MigrationRefused as exc:
        print(json.dumps({"refused": str(exc)}))
""")


def _topology(name: str, address: str, key) -> str:
    host = f'[host]\nname = "{name}"\nmigrate = "{address}:0"\nmigrate_key = "{key}"\n'
    return HOST.replace("[host]\n", host)


def test_two_hosts_in_two_namespaces_authenticate_each_other(pair, hosts, tmp_path):
    key = tmp_path / "shared.key"
    generate_key(key)
    other = tmp_path / "other.key"
    generate_key(other)
    a = hosts(_topology("alpha", pair.addresses[0], key), "alpha", netns=pair.names[0]).start()
    b = hosts(_topology("beta", pair.addresses[1], key), "beta", netns=pair.names[1]).start()
    where = {}
    for h in (a, b):
        path = h.rundir / "migrate.address"
        where[h] = h.wait(lambda p=path: p.exists() and p.read_text().strip(), 10, "the listener's address")
    assert where[a].startswith(pair.addresses[0] + ":") and where[b].startswith(pair.addresses[1] + ":")
    client = tmp_path / "client.py"
    client.write_text(CLIENT)

    def from_ns(i: int, address: str, keyfile) -> dict:
        out = pair.run(i, sys.executable, str(client), address, str(keyfile), capture_output=True, text=True,
                       timeout=30, env=ENV, check=True)
        return json.loads(out.stdout)

    # each host reaches the other across the veth, and each answers only the key holder
    assert from_ns(1, where[a], key)["answer"]["host"] == "alpha"
    assert from_ns(0, where[b], key)["answer"]["host"] == "beta"
    assert "does not hold our key" in from_ns(1, where[a], other)["refused"]
    # the namespaces are hosts of their own: the machine's namespace cannot reach them
    with pytest.raises(OSError):
        connect(where[a], load_key(key), timeout=2)
    assert a.stop() == 0 and b.stop() == 0
    a.assert_clean()
    b.assert_clean()
    for h, peer in ((a, "10.99.0.2"), (b, "10.99.0.1")):
        log = (h.rundir / "logs" / "hypervisor.log").read_text()
        assert f"migration: {peer}:" in log and "authenticated" in log
        assert f"refused {peer}" in log or h is b


def test_the_fixture_leaves_nothing_behind():
    p = NetnsPair.create()
    assert set(p.names) <= set(namespaces())
    out = p.run(0, "ip", "-o", "addr", "show", capture_output=True, text=True, timeout=10, check=True)
    assert "10.99.0.1/24" in out.stdout
    p.delete()
    assert not set(p.names) & set(namespaces())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10,
                           check=True).stdout
    assert p.names[0][4:] not in links  # the veth went with its namespaces
