"""xl disk specs: tables of spec -> DiskSpec (xl-disk-configuration(5)'s own
examples first), of bad specs -> the message, and vdev numbers as
xen-vbd-interface(7) and libxl__device_disk_dev_number encode them."""

from __future__ import annotations

import pickle

import pytest

from xmp.drivers.blk.spec import DiskSpec, DiskSpecError, parse_diskspec, parse_size, vdev_devid

HDA = DiskSpec("/dev/vg/guest-volume", "raw", "hda", "rw")
HDC_CD = DiskSpec("/root/image.iso", "raw", "hdc", "ro", "cdrom")

GOOD = [
    # xl-disk-configuration(5): "these strings are equivalent"
    ("/dev/vg/guest-volume,,hda", HDA),
    ("/dev/vg/guest-volume,raw,hda,rw", HDA),
    ("format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume", HDA),
    ("raw:/dev/vg/guest-volume,hda,w", HDA),
    # "As are these"
    ("/root/image.iso,,hdc,cdrom", HDC_CD),
    ("/root/image.iso,,hdc,,cdrom", HDC_CD),
    ("/root/image.iso,raw,hdc,devtype=cdrom", HDC_CD),
    ("format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso", HDC_CD),
    ("raw:/root/image.iso,hdc:cdrom,ro", HDC_CD),
    # xend's empty cdrom
    (",hdc:cdrom,r", DiskSpec(None, "raw", "hdc", "ro", "cdrom")),
    ("vdev=xvdc, cdrom", DiskSpec(None, "raw", "xvdc", "ro", "cdrom")),
    # positional forms
    ("/img,qcow2,xvda,ro", DiskSpec("/img", "qcow2", "xvda", "ro")),
    ("/img,,xvda,r", DiskSpec("/img", "raw", "xvda", "ro")),
    ("/img,vhd,xvdb,w", DiskSpec("/img", "vhd", "xvdb", "rw")),
    ("/img,qed,xvdb", DiskSpec("/img", "qed", "xvdb", "rw")),
    ("/img,qcow,xvdb,", DiskSpec("/img", "qcow", "xvdb", "rw")),
    ("format=qcow2,/img,xvda", DiskSpec("/img", "qcow2", "xvda", "rw")),
    ("vdev=xvda,/img", DiskSpec("/img", "raw", "xvda", "rw")),
    ("  /img ,  , xvda ,  rw ", DiskSpec("/img", "raw", "xvda", "rw")),
    ("/img,,xvda,devtype=disk", DiskSpec("/img", "raw", "xvda", "rw")),
    # target= takes the rest, commas included
    ("vdev=xvda, target=/srv/a,b,c.img", DiskSpec("/srv/a,b,c.img", "raw", "xvda", "rw")),
    ("vdev=xvda,target=/srv/x=y, z ", DiskSpec("/srv/x=y, z ", "raw", "xvda", "rw")),
    ("vdev=xvda, target=/img,", DiskSpec("/img", "raw", "xvda", "rw")),
    (",,xvda,,target=/with,comma", DiskSpec("/with,comma", "raw", "xvda", "rw")),
    # keys and flags
    ("/img,,xvda,backend=driverdom,backendtype=qdisk,script=block-iscsi,discard",
     DiskSpec("/img", "raw", "xvda", "rw", backend="driverdom", backendtype="qdisk",
              script="block-iscsi", discard=True)),
    ("/img,,xvda,no-discard", DiskSpec("/img", "raw", "xvda", "rw", discard=False)),
    ("/img,,xvda,backendtype=phy", DiskSpec("/img", "raw", "xvda", "rw", backendtype="phy")),
    ("format=, vdev=xvda, access=, target=/img", DiskSpec("/img", "raw", "xvda", "rw")),
    # deprecated prefixes
    ("phy:/dev/sdb,xvda,w", DiskSpec("/dev/sdb", "raw", "xvda", "rw")),
    ("tap:aio:/img,xvda,r", DiskSpec("/img", "raw", "xvda", "ro")),
    ("qcow2:/img,xvda,w", DiskSpec("/img", "qcow2", "xvda", "rw")),
    ("iscsi:iqn.x,xvda,w", DiskSpec("iqn.x", "raw", "xvda", "rw", script="block-iscsi")),
    # xmp's size=
    ("vdev=xvda, size=64M, target=/img", DiskSpec("/img", "raw", "xvda", "rw", size_bytes=64 << 20)),
    ("vdev=xvda, size=64M", DiskSpec(None, "raw", "xvda", "rw", size_bytes=64 << 20)),
    ("/img,,xvda,size=1g", DiskSpec("/img", "raw", "xvda", "rw", size_bytes=1 << 30)),
    ("/img,,xvda,size=4096", DiskSpec("/img", "raw", "xvda", "rw", size_bytes=4096)),
    ("/img,,xvda,size=2T", DiskSpec("/img", "raw", "xvda", "rw", size_bytes=2 << 40)),
    ("/img,,xvda,size=1K", DiskSpec("/img", "raw", "xvda", "rw", size_bytes=1024)),
]


@pytest.mark.parametrize("spec,expected", GOOD, ids=[g[0] for g in GOOD])
def test_good_specs(spec, expected):
    assert parse_diskspec(spec) == expected


BAD = [
    ("format=raw, vdev=xvda, acess=rw", "unknown key 'acess' (did you mean 'access'?)"),
    ("/img,raw", "no vdev"),
    ("", "no vdev"),
    ("/img,,vda", "bad vdev 'vda'"),
    ("/img,,xvdA", "bad vdev 'xvdA'"),
    ("/img,,xvda01", "bad vdev 'xvda01'"),
    ("/img,,xvda256", "bad vdev 'xvda256'"),
    ("/img,,hde", "bad vdev 'hde'"),
    ("/img,,hda64", "bad vdev 'hda64'"),
    ("/img,,sdq", "bad vdev 'sdq'"),
    ("/img,,sda16", "bad vdev 'sda16'"),
    ("/img,,xvdbzzzz", "bad vdev"),
    ("/img,vmdk,xvda", "unknown format 'vmdk'"),
    ("/img,,xvda,rx", "unknown access 'rx'"),
    ("/img,,xvda,rw,extra", "too many positional parameters at 'extra'"),
    ("/img,,xvda,devtype=floppy", "unknown devtype 'floppy'"),
    ("/img,,xvda,backendtype=nbd", "unknown backendtype 'nbd'"),
    ("/img,,xvda,vdev=xvdb", "vdev specified twice"),
    ("/img,,xvda,target=/other", "target specified twice"),
    ("/img,raw,xvda,format=qcow2", "format specified twice"),
    ("/img,,xvda,discard,no-discard", "both discard and no-discard"),
    ("/img,,xvda,cdrom,devtype=disk", "devtype specified twice"),
    ("/img,,xvda,cdrom,rw", "a cdrom cannot be read-write"),
    ("vdev=xvda", "no target"),
    ("/img,,xvda,size=0", "size '0'"),
    ("/img,,xvda,size=100", "not a positive multiple of 512"),
    ("/img,,xvda,size=64X", "not a number"),
    ("/img,,xvda,size=-1M", "not a number"),
    ("/img,,xvda,trusted", "xl flag 'trusted' is not supported by xmp"),
    ("/img,,xvda,specification=virtio", "xl option 'specification' is not supported"),
    ("foo:/img,xvda", "unknown deprecated disk prefix 'foo:'"),
    ("/img,,xvda,Bad=1", "bad parameter 'Bad=1'"),
    ("/img,,xvda,vdv=xvdb", "did you mean 'vdev'?"),
]


@pytest.mark.parametrize("spec,message", BAD, ids=[b[0] for b in BAD])
def test_bad_specs(spec, message):
    with pytest.raises(DiskSpecError) as info:
        parse_diskspec(spec)
    text = str(info.value)
    assert message in text
    assert text.startswith(f"disk spec {spec!r}: ")


def test_error_message_of_the_brief():
    with pytest.raises(DiskSpecError) as info:
        parse_diskspec("format=raw, vdev=xvda, acess=rw")
    assert str(info.value) == ("disk spec 'format=raw, vdev=xvda, acess=rw': "
                               "unknown key 'acess' (did you mean 'access'?)")


def test_error_pickles():
    e = DiskSpecError("x", "why")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.spec, e2.reason, str(e2)) == ("x", "why", str(e))


DEVIDS = [
    ("xvda", 51712),                       # 202 << 8
    ("xvdb", 51728),
    ("xvda1", 51713),
    ("xvdp15", (202 << 8) | (15 << 4) | 15),
    ("xvdq", (1 << 28) | (16 << 8)),       # disk 16: the extended form
    ("xvda16", (1 << 28) | 16),            # partition 16 too
    ("xvdz", (1 << 28) | (25 << 8)),
    ("xvdaa", (1 << 28) | (26 << 8)),      # bijective base 26: aa = 26
    ("xvdtq37", (1 << 28) | (536 << 8) | 37),  # xen-vbd-interface(7): disk 536 partition 37
    ("d0p0", 51712),
    ("d1p2", 51730),
    ("d536p37", (1 << 28) | (536 << 8) | 37),
    ("hda", 3 << 8),
    ("hdb", (3 << 8) | (1 << 6)),
    ("hdc", 22 << 8),
    ("hdc2", (22 << 8) | 2),               # "IDE disk 2 partition 2"
    ("hdd63", (22 << 8) | (1 << 6) | 63),
    ("sda", 8 << 8),
    ("sdb3", (8 << 8) | (1 << 4) | 3),     # "SCSI disk 1 partition 3"
    ("sdp15", (8 << 8) | (15 << 4) | 15),
]


@pytest.mark.parametrize("vdev,devid", DEVIDS, ids=[d[0] for d in DEVIDS])
def test_devid(vdev, devid):
    assert vdev_devid(vdev) == devid
    assert parse_diskspec(f"/img,,{vdev}").devid == devid


def test_devid_rejects_non_vdevs():
    for vdev in ("vda", "xvd", "hde", "sdq", "xvda0x", "d1p256", "d1048576p0"):
        with pytest.raises(ValueError):
            vdev_devid(vdev)


def test_properties():
    cd = parse_diskspec("/root/image.iso,,hdc,cdrom")
    assert cd.is_cdrom and cd.readonly
    disk = parse_diskspec("/img,,xvda")
    assert not disk.is_cdrom and not disk.readonly


def test_parse_size():
    assert parse_size("512") == 512
    assert parse_size("64M") == 64 * 1024 * 1024
    assert parse_size("3G") == 3 * 1024**3
    with pytest.raises(ValueError):
        parse_size("1.5G")


def test_issue_style_size_and_backend_after_target():
    """The issue's own example writes size= and backend= after target=: they
    are read as keys, the path keeps its commas otherwise."""
    spec = parse_diskspec("format=raw, vdev=xvda, access=rw, target=images/a.img, size=64M, backend=stor")
    assert (spec.target, spec.size_bytes, spec.backend) == ("images/a.img", 64 << 20, "stor")
    assert parse_diskspec("vdev=xvda, target=/x/a, b.img").target == "/x/a, b.img"
