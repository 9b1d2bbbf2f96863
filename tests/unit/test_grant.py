"""Grant table v1: the granting side, the hypervisor's check, and copy."""

from __future__ import annotations

import errno
import struct
import threading
import time

import pytest

from xmp.errors import GrantError, HypercallError, LocalError
from xmp.sharedmem.grant import (
    GNTTAB_COPY,
    GNTTAB_COPY_STATUS,
    GNTTAB_NR_RESERVED_ENTRIES,
    ActiveGrants,
    CopyPtr,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTST_bad_copy_arg,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_page,
    GNTST_permission_denied,
    GrantTable,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    copy_records,
    grant_copy,
    unpack_copy_records,
)

GRANTER, BACKEND, OTHER = 5, 0, 7


@pytest.fixture
def tables():
    buf = bytearray(4096)  # one frame: 512 entries
    ram = bytearray(16 * 4096)
    return GrantTable(buf, GRANTER), ActiveGrants(buf, GRANTER, ram), buf, ram


def test_entry_layout_is_grant_entry_v1(tables):
    gt, _act, buf, _ram = tables
    assert gt.nr_entries == 512
    gt.grant_access(9, BACKEND, 0x12345, readonly=True)
    assert struct.unpack_from("<HHI", buf, 9 * 8) == (GTF_permit_access | GTF_readonly, BACKEND, 0x12345)
    assert gt.entry(9) == (GTF_permit_access | GTF_readonly, BACKEND, 0x12345)


def test_allocation_never_hands_out_reserved_refs(tables):
    gt, *_ = tables
    refs = [gt.grant_foreign_access(BACKEND, i) for i in range(gt.nr_entries - GNTTAB_NR_RESERVED_ENTRIES)]
    assert min(refs) == GNTTAB_NR_RESERVED_ENTRIES and len(set(refs)) == len(refs)
    with pytest.raises(HypercallError) as e:
        gt.grant_foreign_access(BACKEND, 0)
    assert e.value.errno == errno.ENOSPC
    gt.end_foreign_access(refs[3])
    assert gt.grant_foreign_access(BACKEND, 1) == refs[3]


def test_map_sets_in_use_bits_and_unmap_clears_them(tables):
    gt, act, *_ = tables
    ref = gt.grant_foreign_access(BACKEND, 3)
    assert act.map_grant_ref([ref], BACKEND) == [3]
    assert gt.entry(ref)[0] == GTF_permit_access | GTF_reading | GTF_writing
    act.map_grant_ref([ref], BACKEND, readonly=True)
    assert act.pins(ref) == (2, 1)
    act.unmap_grant_ref([ref])  # the writable mapping goes
    assert gt.entry(ref)[0] == GTF_permit_access | GTF_reading
    act.unmap_grant_ref([ref], readonly=True)
    assert gt.entry(ref)[0] == GTF_permit_access and act.pins(ref) == (0, 0)


@pytest.mark.parametrize(
    ("setup", "mapper", "readonly", "status"),
    [
        (lambda gt: None, BACKEND, True, GNTST_permission_denied),                       # never granted
        (lambda gt: gt.grant_access(9, OTHER, 1), BACKEND, True, GNTST_permission_denied),  # someone else's
        (lambda gt: gt.grant_access(9, BACKEND, 1, readonly=True), BACKEND, False, GNTST_permission_denied),
    ],
    ids=["not-granted", "wrong-domid", "readonly-mapped-writable"],
)
def test_map_refusals(tables, setup, mapper, readonly, status):
    gt, act, buf, _ = tables
    setup(gt)
    before = bytes(buf)
    with pytest.raises(GrantError) as e:
        act.map_grant_ref([9], mapper, readonly=readonly)
    assert (e.value.gref, e.value.status, e.value.domid) == (9, status, GRANTER)
    assert "GNTST_permission_denied" in str(e.value)
    assert bytes(buf) == before  # a refused map changes nothing


def test_out_of_range_ref_and_batch_is_all_or_nothing(tables):
    gt, act, *_ = tables
    good = gt.grant_foreign_access(BACKEND, 1)
    with pytest.raises(GrantError) as e:
        act.map_grant_ref([good, 4096], BACKEND)
    assert e.value.status == GNTST_bad_gntref
    assert act.pins(good) == (0, 0) and gt.entry(good)[0] == GTF_permit_access


def test_end_access_refused_while_mapped(tables):
    gt, act, *_ = tables
    ref = gt.grant_foreign_access(BACKEND, 2)
    act.map_grant_ref([ref], BACKEND, readonly=True)
    with pytest.raises(HypercallError) as e:
        gt.end_foreign_access(ref)
    assert e.value.errno == errno.EBUSY and "is mapped" in str(e.value)
    act.unmap_grant_ref([ref], readonly=True)
    gt.end_foreign_access(ref)
    assert gt.entry(ref)[0] == 0
    with pytest.raises(GrantError):  # revoked: no new mappings
        act.map_grant_ref([ref], BACKEND, readonly=True)


def test_make_readonly_only_while_not_written(tables):
    gt, act, *_ = tables
    ref = gt.grant_foreign_access(BACKEND, 2)
    act.map_grant_ref([ref], BACKEND)
    with pytest.raises(HypercallError):
        gt.make_readonly(ref)
    act.unmap_grant_ref([ref])
    gt.make_readonly(ref)
    with pytest.raises(GrantError):
        act.map_grant_ref([ref], BACKEND)


def _race_map_and_revoke(gt, act, revoke, seconds: float = 1.0):
    """A mapper and a revoker on one ref; the C calls run without the GIL, so
    they really race.  Every other mapping is held until the revoker has made
    a whole attempt while it is live (so a revoker that ignores the in-use
    bits meets a live mapping every time); the others are dropped at once.
    Returns the violations seen (a revocation while a mapping was live) and
    the counts."""
    ref = 20
    gt.grant_access(ref, BACKEND, 4)
    live = [0]
    attempts = [0]
    stop = threading.Event()
    violations: list[str] = []
    counts = {"mapped": 0, "held": 0, "ended": 0}

    def wait_for_a_whole_attempt():
        # the attempt that ends as seen + 2 began after seen + 1 ended: wholly
        # inside whatever the mapper holds (or does not hold) meanwhile
        seen = attempts[0]
        while attempts[0] < seen + 2 and not stop.is_set():
            time.sleep(0)  # let the revoker run

    def mapper():
        while not stop.is_set():
            try:
                act.map_grant_ref([ref], BACKEND)
            except GrantError:
                continue
            live[0] += 1  # counted only between a successful map and its unmap
            counts["mapped"] += 1
            if counts["mapped"] % 2:
                wait_for_a_whole_attempt()  # a live mapping under the revoker's nose
                counts["held"] += 1
            live[0] -= 1
            act.unmap_grant_ref([ref])
            if counts["mapped"] % 4 == 0:
                wait_for_a_whole_attempt()  # and a window with none, where it may end access

    def revoker():
        while not stop.is_set():
            try:
                revoke(ref)
            except HypercallError:
                attempts[0] += 1
                continue
            if live[0]:
                violations.append("revoked under a live mapping")
            attempts[0] += 1
            counts["ended"] += 1
            gt.grant_access(ref, BACKEND, 4)

    threads = [threading.Thread(target=mapper), threading.Thread(target=revoker)]
    for t in threads:
        t.start()
    deadline = threading.Event()
    deadline.wait(seconds)
    stop.set()
    for t in threads:
        t.join(10)
    return violations, counts, ref


@pytest.mark.timeout(60)
def test_concurrent_map_and_end_access_never_revoke_a_live_mapping(tables):
    """end_foreign_access succeeds only when no mapping is live, whatever the
    interleaving."""
    gt, act, *_ = tables
    violations, counts, ref = _race_map_and_revoke(gt, act, gt.end_foreign_access)
    assert not violations
    assert counts["held"] > 0 and counts["mapped"] > counts["held"] and counts["ended"] > 0
    flags = gt.entry(ref)[0]
    assert not flags & (GTF_reading | GTF_writing) and act.pins(ref) == (0, 0)


@pytest.mark.timeout(60)
def test_the_race_catches_a_revoker_that_ignores_the_in_use_bits(tables):
    """The test above can fail: a revoker that clears the entry without
    looking at GTF_reading/GTF_writing is caught revoking a live mapping."""
    gt, act, buf, _ = tables

    def careless_revoke(ref: int) -> None:
        struct.pack_into("<H", buf, ref * 8, 0)  # flags = 0, mapped or not

    violations, counts, _ = _race_map_and_revoke(gt, act, careless_revoke, seconds=0.5)
    assert violations and counts["held"] > 0


def test_grant_copy_between_granted_page_and_own_frame(tables):
    gt, act, _buf, ram = tables
    ram[3 * 4096 + 100:3 * 4096 + 200] = bytes(range(100))
    ref = gt.grant_foreign_access(BACKEND, 3, readonly=True)
    mine = bytearray(2 * 4096)
    grant_copy(CopyPtr(None, 100, gref=ref, table=act), CopyPtr(mine, 10, frame=1), 100, BACKEND)
    assert mine[4096 + 10:4096 + 110] == bytes(range(100))
    assert gt.entry(ref)[0] == GTF_permit_access | GTF_readonly  # pinned only for the copy
    # and the other way, into a writable grant
    wref = gt.grant_foreign_access(BACKEND, 4)
    grant_copy(CopyPtr(mine, 10, frame=1), CopyPtr(None, 0, gref=wref, table=act), 100, BACKEND)
    assert ram[4 * 4096:4 * 4096 + 100] == bytes(range(100))


def test_grant_copy_refusals(tables):
    gt, act, _buf, _ram = tables
    ro = gt.grant_foreign_access(BACKEND, 3, readonly=True)
    mine = bytearray(4096)
    with pytest.raises(GrantError) as e:  # crossing a page
        grant_copy(CopyPtr(None, 4000, gref=ro, table=act), CopyPtr(mine, 0, frame=0), 200, BACKEND)
    assert e.value.status == GNTST_bad_copy_arg
    with pytest.raises(GrantError) as e:  # writing into a read-only grant
        grant_copy(CopyPtr(mine, 0, frame=0), CopyPtr(None, 0, gref=ro, table=act), 10, BACKEND)
    assert e.value.status == GNTST_permission_denied
    with pytest.raises(GrantError) as e:  # copying as a domain it was not granted to
        grant_copy(CopyPtr(None, 0, gref=ro, table=act), CopyPtr(mine, 0, frame=0), 10, OTHER)
    assert e.value.status == GNTST_permission_denied
    far = gt.grant_foreign_access(BACKEND, 999)  # frame beyond the granter's memory
    with pytest.raises(GrantError) as e:
        grant_copy(CopyPtr(None, 0, gref=far, table=act), CopyPtr(mine, 0, frame=0), 10, BACKEND)
    assert e.value.status == GNTST_bad_page
    assert act.pins(far) == (0, 0) and act.pins(ro) == (0, 0)


def test_copy_during_a_live_mapping_keeps_its_in_use_bits(tables):
    gt, act, _buf, _ram = tables
    ref = gt.grant_foreign_access(BACKEND, 3)
    act.map_grant_ref([ref], BACKEND, readonly=True)
    grant_copy(CopyPtr(None, 0, gref=ref, table=act), CopyPtr(bytearray(4096), 0, frame=0), 8, BACKEND)
    assert gt.entry(ref)[0] & GTF_reading and act.pins(ref) == (1, 0)


def test_errors_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(GrantError(3, 9, GNTST_permission_denied)))
    assert (err.domid, err.gref, err.status) == (3, 9, GNTST_permission_denied)
    herr = pickle.loads(pickle.dumps(HypercallError(errno.EBUSY, "end_foreign_access", "gref 9")))
    assert herr.errno == errno.EBUSY and str(herr) == "end_foreign_access: EBUSY (gref 9)"


def test_end_access_later_waits_for_the_mapper_to_let_go(tables):
    gt, act, *_ = tables
    ref = gt.grant_foreign_access(BACKEND, 2)
    act.map_grant_ref([ref], BACKEND)
    gt.end_foreign_access_later(ref)  # mapped: kept, not revoked under the mapping
    assert gt.entry(ref)[0] & GTF_permit_access
    act.unmap_grant_ref([ref])
    gt.retry_deferred()
    assert gt.entry(ref)[0] == 0


# -- GNTTABOP_copy's record form: struct gnttab_copy in the caller's memory ----

REC = 6  # the caller's pfn holding the records


def _records(ram, recs) -> None:
    """recs: (src, dst, len, flags) with each side (ref-or-frame, domid, offset)."""
    for i, (src, dst, length, flags) in enumerate(recs):
        GNTTAB_COPY.pack_into(ram, REC * 4096 + i * GNTTAB_COPY.size, *src, *dst, length, flags, 99)


def _statuses(ram, n) -> list[int]:
    return [struct.unpack_from("<h", ram, REC * 4096 + i * GNTTAB_COPY.size + GNTTAB_COPY_STATUS)[0]
            for i in range(n)]


def test_gnttab_copy_struct_is_xens_layout():
    # grant_table.h on x86_64: two 16-byte gnttab_copy_ptr (u64 union, u16 domid,
    # u16 offset, padding), u16 len, u16 flags, s16 status: 40 bytes, status at 36
    assert GNTTAB_COPY.size == 40 and GNTTAB_COPY_STATUS == 36
    rec = GNTTAB_COPY.pack(0x11223344, 5, 7, 0x55, 0x7FF0, 9, 4096, GNTCOPY_source_gref, -8)
    assert rec[:16] == struct.pack("<QHH4x", 0x11223344, 5, 7)
    assert struct.unpack_from("<h", rec, GNTTAB_COPY_STATUS)[0] == -8
    assert unpack_copy_records(rec) == [{"source": {"ref": 0x11223344, "domid": 5, "offset": 7},
                                         "dest": {"frame": 0x55, "domid": 0x7FF0, "offset": 9}, "len": 4096}]


def test_copy_records_copy_what_is_granted_and_answer_each_record(tables):
    gt, act, _buf, ram = tables
    own_ram = bytearray(8 * 4096)
    own = ActiveGrants(bytearray(4096), BACKEND, own_ram)
    ram[3 * 4096:4 * 4096] = bytes(i % 251 for i in range(4096))
    rw, ro = gt.grant_foreign_access(BACKEND, 3), gt.grant_foreign_access(BACKEND, 4, readonly=True)
    other = gt.grant_foreign_access(OTHER, 5)
    self_ = 0x7FF0
    src, dst = GNTCOPY_source_gref, GNTCOPY_dest_gref
    recs = [
        ((rw, GRANTER, 100), (1, self_, 0), 200, src),           # 0: in, okay
        ((2, self_, 8), (rw, GRANTER, 3000), 16, dst),           # 1: out, okay
        ((ro, GRANTER, 0), (1, BACKEND, 300), 4, src),           # 2: read a read-only grant: okay
        ((2, self_, 0), (ro, GRANTER, 0), 4, dst),               # 3: write it: denied
        ((other, GRANTER, 0), (1, self_, 0), 4, src),            # 4: granted to someone else
        ((rw, 42, 0), (1, self_, 0), 4, src),                    # 5: no such domain
        ((3, GRANTER, 0), (1, self_, 0), 4, 0),                  # 6: a frame of another's memory
        ((rw, GRANTER, 4000), (1, self_, 0), 200, src),          # 7: crosses the page
        ((rw, GRANTER, 0), (1, self_, 0), 4097, src),            # 8: longer than a page
        ((rw, GRANTER, 4096), (1, self_, 0), 1, src),            # 9: offset outside the page
        ((rw, GRANTER, 0), (8, self_, 0), 4, src),               # 10: own frame beyond its memory
        ((rw, GRANTER, 0), (1, self_, 0), 4, src | 4),           # 11: an unknown flag
        ((4096, GRANTER, 0), (1, self_, 0), 4, src),             # 12: ref outside the table
    ]
    _records(own_ram, recs)
    own_ram[2 * 4096 + 8:2 * 4096 + 24] = b"from the backend"
    before = bytes(ram)
    copy_records(own, BACKEND, REC * 4096, len(recs), {GRANTER: act}.get)
    assert _statuses(own_ram, len(recs)) == [
        0, 0, 0, GNTST_permission_denied, GNTST_permission_denied, GNTST_bad_domain,
        GNTST_permission_denied, GNTST_bad_copy_arg, GNTST_bad_copy_arg, GNTST_bad_copy_arg,
        GNTST_bad_copy_arg, GNTST_bad_copy_arg, GNTST_bad_gntref]
    assert own_ram[4096:4096 + 200] == before[3 * 4096 + 100:3 * 4096 + 300]
    assert own_ram[4096 + 300:4096 + 304] == before[4 * 4096:4 * 4096 + 4]
    # only record 1 wrote into the granter, where it was told to
    assert ram[3 * 4096 + 3000:3 * 4096 + 3016] == b"from the backend"
    ram[3 * 4096 + 3000:3 * 4096 + 3016] = before[3 * 4096 + 3000:3 * 4096 + 3016]
    assert bytes(ram) == before
    # every pin was dropped, and the records are as they were but for the statuses
    assert all(act.pins(r) == (0, 0) for r in (rw, ro, other))
    assert unpack_copy_records(own_ram[REC * 4096:REC * 4096 + len(recs) * 40])[0]["source"] == \
        {"ref": rw, "domid": GRANTER, "offset": 100}


def test_copy_records_refuse_a_range_outside_the_callers_memory(tables):
    own = ActiveGrants(bytearray(4096), BACKEND, bytearray(2 * 4096))
    with pytest.raises(LocalError):
        copy_records(own, BACKEND, 4096, 103, {}.get)  # 103 records do not fit in one page
    with pytest.raises(LocalError):
        copy_records(own, BACKEND, -40, 1, {}.get)
