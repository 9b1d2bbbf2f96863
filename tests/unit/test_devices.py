"""Every device class has the same shape (STYLE: one folder, one
registration), and nothing outside its folder names it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import xmp
from xmp import devices
from xmp.devices import DEVICE_CLASSES, MoveState
from xmp.errors import XmpError

ROOT = Path(xmp.__file__).parent
CLASSES = [pytest.param(c, id=c.kind) for c in DEVICE_CLASSES]


@pytest.mark.parametrize("cls", CLASSES)
def test_a_class_is_one_folder_with_the_same_files(cls):
    assert callable(cls.part("frontend").open)
    assert callable(cls.part("backend").backend)
    assert cls.part("protocol").__doc__
    assert isinstance(cls.part("state").STATE, MoveState)
    if cls.config_key:
        ts = cls.part("toolstack")
        for name in ("parse", "device", "devid_of", "name_of", "list_row"):
            assert callable(getattr(ts, name)), name
        assert ts.LIST_HEADER and ts.LIST_KEYS


@pytest.mark.parametrize("cls", CLASSES)
def test_nothing_outside_its_folder_names_a_class(cls):
    """Guests may load a driver (they are its users); the rest of xmp finds
    classes through xmp.devices."""
    pattern = re.compile(rf"drivers[./]{cls.kind}\b|[\"']{cls.devtype}[\"']")
    own = ROOT / "drivers" / cls.kind
    bad = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
           if own not in p.parents and p.parent.name != "guests" and p.name != "devices.py"
           and pattern.search(p.read_text())]
    assert not bad


def test_lookups_and_their_errors():
    assert devices.by_command("block").devtype == "vbd"
    assert devices.by_devtype("vping").kind == "vping"
    assert devices.by_opener("block").kind == "blk"
    assert devices.by_opener("nosuch") is None
    with pytest.raises(XmpError, match="no device class has command 'tape'"):
        devices.by_command("tape")
    assert "xmp.drivers.blk.frontend" in devices.frontend_modules()


def test_vping_spec():
    ts = devices.by_command("vping").part("toolstack")
    assert ts.parse("devid=3, backend=dd") == ts.VpingSpec(3, "dd")
    assert ts.parse("") == ts.VpingSpec(0, None)
    for bad, why in (("devid=x", "devid must be a number"), ("colour=red", "is not devid=N"),
                     ("devid=1, devid=2", "each once"), ("devid=70000", "from 0 to 65535")):
        with pytest.raises(XmpError, match=why):
            ts.parse(bad)
