"""Shared-memory objects: named only for an instant, reachable by descriptor."""

from __future__ import annotations

import os
import stat

import pytest

from xmp.errors import LocalError
from xmp.sharedmem.shm import PAGE_SIZE, ShmNamespace, ShmObject, leftovers, remove_stale


def test_object_is_unlinked_at_once_and_private():
    ns = ShmNamespace()
    with ShmObject.create(ns, "ram", 8 * PAGE_SIZE) as obj:
        assert not [n for n in leftovers() if n.startswith(ns.prefix)]
        st = os.fstat(obj.fd)
        assert st.st_size == 8 * PAGE_SIZE and stat.S_IMODE(st.st_mode) == 0o600


def test_page_ranges_map_the_same_memory():
    with ShmObject.create(ShmNamespace(), "ram", 4 * PAGE_SIZE) as obj:
        whole = obj.map()
        page2 = obj.map(2, 1)
        page2[:5] = b"hello"
        assert whole[2 * PAGE_SIZE:2 * PAGE_SIZE + 5] == b"hello"
        ro = obj.map(2, 1, writable=False)
        assert ro[:5] == b"hello"
        with pytest.raises(TypeError):
            ro[0] = 1
        with pytest.raises(LocalError, match="outside an object of 4 pages"):
            obj.map(3, 2)


def test_bad_sizes_and_labels_are_refused():
    ns = ShmNamespace()
    with pytest.raises(LocalError, match="multiple of 4096"):
        ShmObject.create(ns, "x", 100)
    with pytest.raises(LocalError, match="label"):
        ShmObject.create(ns, "../etc", PAGE_SIZE)


def test_namespaces_never_collide():
    a, b = ShmNamespace(), ShmNamespace()
    assert a.prefix != b.prefix and a.prefix.startswith(f"xmp.{os.getpid()}.")
    assert a.name("ram") != a.name("ram")


def test_remove_stale_takes_only_dead_owners(tmp_path):
    dead_pid = 2**22 + 12345  # above pid_max's usual range: never alive
    dead = tmp_path / f"xmp.{dead_pid}.0123abcd.ram.ff"
    live = tmp_path / f"xmp.{os.getpid()}.0123abcd.ram.ff"
    other = tmp_path / "not-ours"
    for f in (dead, live, other):
        f.write_bytes(b"")
    assert remove_stale(str(tmp_path)) == [dead.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
