"""Topology mistakes that used to pass the checker and fail after dom0 had
started: each is one located error now, and checking creates nothing."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from xmp import limits, topology
from xmp.topology import DomainConfig, TopologyError, load_topology, parse_topology

GUEST = '[[domain]]\nname = "{name}"\nkernel = "json:dumps"\nmemory = 1\n'


@pytest.fixture(autouse=True)
def fixed_host_memory(monkeypatch):
    monkeypatch.setattr(topology, "_available_mib", lambda: 1 << 20)


def _error(path: Path, text: str) -> TopologyError:
    path.write_text(text)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    return info.value


def test_a_driver_domain_is_not_its_own_backend(tmp_path):
    text = '[[domain]]\nname = "store"\ndriver_domain = true\ndisk = ["vdev=xvda, size=1M, target=a.img, ' \
           'backend=store"]\n'
    err = _error(tmp_path / "t.toml", text)
    assert str(err) == (f"{tmp_path / 't.toml'}:4: [[domain]] 'store': disk: backend 'store' is this domain "
                        "itself; a device is served by another domain: Domain-0 (no backend=) or a driver "
                        "domain above")


def test_a_backend_must_be_a_driver_domain(tmp_path):
    text = GUEST.format(name="plain") + GUEST.format(name="web") \
        + 'disk = ["vdev=xvda, target=a.img, backend=plain"]\n'
    err = _error(tmp_path / "t.toml", text)
    assert err.line == 9 and err.key == "disk" and "backend 'plain' is not a driver domain" in str(err)


def test_an_image_larger_than_its_filesystem_is_refused_naming_both_sizes(tmp_path):
    text = GUEST.format(name="web") + 'disk = ["vdev=xvda, size=99999T, target=big/a.img"]\n'
    err = _error(tmp_path / "t.toml", text)
    st = os.statvfs(tmp_path)
    whole = st.f_blocks * st.f_frsize
    assert err.line == 5 and err.table == "[[domain]] 'web'" and err.key == "disk"
    assert f"disk: size 99999.0 TiB ({99999 << 40} bytes) is larger than the whole filesystem that would " \
           f"hold {tmp_path / 'big' / 'a.img'}: " in str(err)
    assert f"({whole} bytes) at {tmp_path}; give a smaller size= or another target" in str(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.toml"]  # the checker created nothing


def test_an_image_that_exists_keeps_its_own_size(tmp_path):
    (tmp_path / "a.img").write_bytes(b"")
    text = GUEST.format(name="web") + 'disk = ["vdev=xvda, size=99999T, target=a.img"]\n'
    (tmp_path / "t.toml").write_text(text)
    assert load_topology(tmp_path / "t.toml").domains[0].devices["disk"]


def test_a_relative_target_may_not_leave_the_topologys_folder(tmp_path):
    folder = tmp_path / "lab"
    folder.mkdir()
    text = GUEST.format(name="web") + 'disk = ["vdev=xvda, size=1M, target=../../../../etc/x.img"]\n'
    err = _error(folder / "t.toml", text)
    landed = os.path.normpath(folder / "../../../../etc/x.img")
    assert str(err).startswith(f"{folder / 't.toml'}:5: [[domain]] 'web': disk: target "
                               f"'../../../../etc/x.img' resolves to {landed}, outside {folder}, "
                               "the folder the target is relative to")
    assert "or give an absolute path" in str(err)
    assert not Path(landed).exists()
    # inside the folder and absolute paths stay allowed, as xl takes them
    (folder / "t.toml").write_text(GUEST.format(name="web")
                                   + f'disk = ["vdev=xvda, size=1M, target=d/../a.img", '
                                     f'"vdev=xvdb, size=1M, target={tmp_path / "b.img"}"]\n')
    assert len(load_topology(folder / "t.toml").domains[0].devices["disk"]) == 2


def test_a_config_sent_to_the_supervisor_is_checked_against_its_own_folder(tmp_path):
    cfg = {"name": "web", "kernel": "json:dumps", "disk": ["vdev=xvda, size=1M, target=../x.img"],
           "source": f"{tmp_path / 'sub' / 'web.toml'}:3"}
    with pytest.raises(TopologyError, match=rf"resolves to {tmp_path / 'x.img'}, outside {tmp_path / 'sub'}"):
        DomainConfig.from_dict(cfg)


def test_hvm_is_refused_until_it_exists():
    with pytest.raises(TopologyError) as info:
        parse_topology(GUEST.format(name="w") + 'type = "hvm"\n', "t.toml")
    assert str(info.value) == \
        "t.toml:5: [[domain]] 'w': type: hvm guests are not supported yet; use pv or pvh"


def test_more_domains_than_descriptors_allow(monkeypatch):
    monkeypatch.setattr(limits, "nofile_limits", lambda: (256, 256))
    text = "".join(GUEST.format(name=f"g{i}") for i in range(40))
    with pytest.raises(TopologyError) as info:
        parse_topology(text, "t.toml")
    # 16 fit: dom0 and g0..g14; g15 is the 17th domain, at line 15 * 4 + 1
    assert str(info.value) == (
        "t.toml:61: [[domain]] 'g15': this host can hold 16 domains (RLIMIT_NOFILE 256, hard limit 256; "
        "the supervisor keeps 12 descriptors a domain, dom0 11 and 2 a device), and this is domain number 17 "
        "(dom0 first); run fewer domains or raise the hard limit (ulimit -Hn) first")
    assert len(parse_topology(text[:len(GUEST.format(name="g0")) * 10], "t.toml").domains) == 10


def test_more_domains_than_xen_has_ids(monkeypatch):
    monkeypatch.setattr(limits, "MAX_DOMID", 5)
    monkeypatch.setattr(limits, "nofile_limits", lambda: (1 << 20, 1 << 20))
    with pytest.raises(TopologyError, match=r"t.toml:21: \[\[domain\]\] 'g5': domain number 6 is past Xen's "
                                            r"last domain id \(5\)"):
        parse_topology("".join(GUEST.format(name=f"g{i}") for i in range(8)), "t.toml")


@pytest.mark.timeout(60)
def test_xmp_run_refuses_5000_domains_before_anything_starts(tmp_path):
    topo = tmp_path / "many.toml"
    topo.write_text("[host]\nmemory = 8000\n[dom0]\nmemory = 64\n"
                    + "".join(GUEST.format(name=f"g{i}") for i in range(5000)))
    rundir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "xmp.cli", "run", "--rundir", str(rundir), str(topo)],
                         capture_output=True, text=True, timeout=60, check=False,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)))
    assert out.returncode == 1
    assert out.stderr.startswith(f"xmp: {topo}:321: [[domain]] 'g79': this host can hold 80 domains "
                                 "(RLIMIT_NOFILE 1024, hard limit 1024"), out.stderr
    assert not rundir.exists()


def test_an_image_path_xenstore_cannot_hold(tmp_path):
    deep = "/".join(["d" * 200] * 20)
    text = GUEST.format(name="web") + f'disk = ["vdev=xvda, size=1M, target={deep}/a.img"]\n'
    err = _error(tmp_path / "t.toml", text)
    assert err.line == 5 and "a disk's xenstore params hold at most 3968: use a shorter path" in str(err)


def test_more_domains_than_dom0_has_event_channels_for(monkeypatch):
    """1,000 idle guests ran dom0 out of ports at ~510 (xl's 1023 was dom0's
    too): dom0 now has the ABI's 4096, and the file may not ask for more."""
    monkeypatch.setattr(limits, "nofile_limits", lambda: (1 << 20, 1 << 20))
    assert parse_topology("", "t.toml").dom0.max_event_channels == 4096
    text = "".join(GUEST.format(name=f"g{i}") for i in range(2040))
    with pytest.raises(TopologyError, match=r"t.toml:8125: \[\[domain\]\] 'g2031': this host can hold 2032 "
                                            r"domains \(dom0's 4096 event channels"):
        parse_topology(text, "t.toml")
