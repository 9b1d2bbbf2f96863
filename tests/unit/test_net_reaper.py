"""The network reaper's protocol: what it is told it will remove."""

from __future__ import annotations

import pytest

from xmp.drivers.net.reaper import parse

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
