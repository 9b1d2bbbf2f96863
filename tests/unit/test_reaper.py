"""The reaper's protocol: what it is told it will remove (links, cgroups)."""

from __future__ import annotations

import pytest

from xmp.reaper import parse, remove_cgroups

pytestmark = pytest.mark.timeout(10)


def test_made_then_removed_is_forgotten_and_a_namesake_is_not():
    links: dict[int, str] = {}
    for line in ("+7 xtbr0", "+9 xtbr1", "-7 xtbr0", "-9 other"):
        parse(line, links)
    assert links == {9: "xtbr1"}  # 7 removed by the supervisor; 9 not "removed" under another name


@pytest.mark.parametrize("line", ["", "+", "+x name", "+7", "*7 a", "+7 ", "7 a"])
def test_garbage_lines_change_nothing(line):
    links = {1: "a"}
    parse(line, links)
    assert links == {1: "a"}


def test_cgroup_lines_outside_the_cgroup_tree_are_ignored():
    links: dict[int, str] = {}
    groups: set[str] = set()
    for line in ("+cg /sys/fs/cgroup/cpu/xmp-7", "+cg /etc", "+cg /sys/fs/cgroup/../../etc",
                 "+cg /sys/fs/cgroup/cpu/xmp-8", "-cg /sys/fs/cgroup/cpu/xmp-8"):
        parse(line, links, groups)
    assert groups == {"/sys/fs/cgroup/cpu/xmp-7"} and links == {}


def test_a_group_that_is_gone_already_counts_as_removed(tmp_path):
    assert remove_cgroups({str(tmp_path / "never-made")}, patience=0) == [str(tmp_path / "never-made")]
