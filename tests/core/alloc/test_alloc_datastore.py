"""Datastore: thick and thin allocation, zero-on-reuse bookkeeping, errors, dump/load."""

from __future__ import annotations

import json

import pytest

from vfdirect.core.alloc import (
    DEFAULT_CHUNK_BYTES,
    Datastore,
    Extent,
    LayoutError,
    LunConfigError,
    MappedSegment,
    OutOfSpaceError,
    SpaceUsage,
    UnknownVdiskError,
    VdiskExistsError,
    VirtualRangeError,
    ZeroingError,
)
from vfdirect.core.array import LunKey, PhysicalLun
from vfdirect.core.ids import LunNumber, PhysicalLba, VdiskId, VirtualLba
from vfdirect.core.wwn import Wwn

ARRAY = Wwn.naa5(0x1000)
CB = 4  # chunk blocks


def key(n: int) -> LunKey:
    return LunKey(ARRAY, LunNumber(n))


def lun(n: int, blocks: int, block_size: int = 512) -> PhysicalLun:
    return PhysicalLun(key(n), block_size, blocks)


def ext(n: int, start: int, count: int) -> Extent:
    return Extent(key(n), PhysicalLba(start), count)


def vd(name: str) -> VdiskId:
    return VdiskId(name)


@pytest.fixture
def ds() -> Datastore:
    d = Datastore("ds1", 512, chunk_blocks=CB)
    d.lun_add(lun(0, 40), fresh=True)  # 10 chunks
    d.lun_add(lun(1, 42), fresh=True)  # 10 chunks (2-block tail unused)
    return d


def test_defaults_and_usage(ds: Datastore) -> None:
    assert Datastore("x", 512).chunk_blocks == DEFAULT_CHUNK_BYTES // 512
    assert Datastore("x", 4096).chunk_blocks == 256
    assert ds.usage() == SpaceUsage(80, 80, 0, 0)
    assert ds.lun_usage(key(1)) == SpaceUsage(40, 40, 0, 0)
    assert ds.free_extents() == (ext(0, 0, 40), ext(1, 0, 40))
    assert ds.pending_zero() == ()


def test_thick_takes_one_run_when_one_fits(ds: Datastore) -> None:
    a = ds.vdisk_create(vd("a"), 10)  # 3 chunks
    assert a.extents() == (ext(0, 0, 12),)
    assert not a.thin
    b = ds.vdisk_create(vd("b"), 32)  # 8 chunks: LUN 0 has 7 left, LUN 1 has 10
    assert b.extents() == (ext(1, 0, 32),)
    assert ds.usage() == SpaceUsage(80, 36, 44, 0)


def test_thick_spans_luns_when_it_must(ds: Datastore) -> None:
    ds.vdisk_create(vd("a"), 12)  # LUN 0 chunks 0-2
    ds.vdisk_create(vd("b"), 4)  # LUN 0 chunk 3
    ds.vdisk_delete(vd("a"))
    for e in ds.pending_zero():
        ds.mark_zeroed(e)
    # free: LUN0 [0,3) + [4,10) = 9 chunks, LUN1 10 chunks; ask for 15: no single run
    c = ds.vdisk_create(vd("c"), 60)
    assert c.extents() == (ext(0, 0, 12), ext(0, 16, 24), ext(1, 0, 24))
    translated = c.translate(10, 4)
    assert translated == (
        MappedSegment(VirtualLba(10), ext(0, 10, 2)),
        MappedSegment(VirtualLba(12), ext(0, 16, 2)),
    )


def test_out_of_space_changes_nothing(ds: Datastore) -> None:
    ds.vdisk_create(vd("a"), 60)
    before = ds.dump()
    with pytest.raises(OutOfSpaceError) as exc:
        ds.vdisk_create(vd("b"), 24)
    assert (exc.value.needed_blocks, exc.value.free_blocks) == (24, 20)
    assert ds.dump() == before
    t = ds.vdisk_create(vd("t"), 100, thin=True)  # thin may overcommit
    assert t.allocated_blocks == 0
    before = ds.dump()
    with pytest.raises(OutOfSpaceError):
        ds.vdisk_allocate(vd("t"), 0, 24)  # 6 chunks, 5 free: all or nothing
    assert ds.dump() == before


def test_out_of_space_says_when_scrubbing_would_help(ds: Datastore) -> None:
    ds.vdisk_create(vd("a"), 80)
    ds.vdisk_delete(vd("a"))
    with pytest.raises(OutOfSpaceError, match="80 freed blocks still wait for zeroing") as exc:
        ds.vdisk_create(vd("b"), 4)
    assert exc.value.dirty_blocks == 80


def test_thin_allocates_on_first_write_and_stays_contiguous(ds: Datastore) -> None:
    t = ds.vdisk_create(vd("t"), 64, thin=True)
    assert t.translate(0, 64)[0].count == 64  # one hole
    t = ds.vdisk_allocate(vd("t"), 5, 1)  # chunk 1
    assert t.extents() == (ext(0, 0, 4),)
    assert t.chunk_extent(1) == ext(0, 0, 4)
    t = ds.vdisk_allocate(vd("t"), 8, 8)  # chunks 2, 3: placed right after chunk 1
    assert t.extents() == (ext(0, 0, 12),)
    assert len(t.placements) == 1  # merged
    assert ds.vdisk_allocate(vd("t"), 4, 12) is t  # nothing missing: unchanged
    assert ds.usage().allocated_blocks == 12


def test_thin_next_chunk_falls_back_to_lowest_free(ds: Datastore) -> None:
    ds.vdisk_create(vd("t"), 64, thin=True)
    ds.vdisk_allocate(vd("t"), 0, 1)  # LUN0 chunk 0
    ds.vdisk_create(vd("a"), 4)  # LUN0 chunk 1
    t = ds.vdisk_allocate(vd("t"), 4, 1)  # after LUN0:0 is taken -> lowest free LUN0:2
    assert t.chunk_extent(1) == ext(0, 8, 4)


def test_allocate_on_thick_is_a_no_op_and_range_checked(ds: Datastore) -> None:
    a = ds.vdisk_create(vd("a"), 10)
    assert ds.vdisk_allocate(vd("a"), 0, 10) is a
    with pytest.raises(VirtualRangeError):
        ds.vdisk_allocate(vd("a"), 8, 3)


def test_delete_makes_space_dirty_until_zeroed(ds: Datastore) -> None:
    ds.vdisk_create(vd("a"), 10)
    ds.vdisk_create(vd("b"), 68)  # the rest: LUN0 chunks 3..9 and LUN1
    freed = ds.vdisk_delete(vd("a"))
    assert freed == (ext(0, 0, 12),)
    assert ds.pending_zero() == (ext(0, 0, 12),)
    assert ds.usage() == SpaceUsage(80, 0, 68, 12)
    with pytest.raises(OutOfSpaceError):
        ds.vdisk_create(vd("c"), 1)  # dirty space is never handed out
    ds.mark_zeroed(ext(0, 4, 4))  # part of it
    assert ds.pending_zero() == (ext(0, 0, 4), ext(0, 8, 4))
    c = ds.vdisk_create(vd("c"), 4)
    assert c.extents() == (ext(0, 4, 4),)  # exactly the zeroed chunk
    with pytest.raises(ZeroingError, match="not waiting"):
        ds.mark_zeroed(ext(0, 4, 4))
    with pytest.raises(ZeroingError, match="whole"):
        ds.mark_zeroed(ext(0, 1, 4))
    with pytest.raises(UnknownVdiskError, match="no vdisk 'a'"):
        ds.vdisk_delete(vd("a"))


def test_block_device_luns_start_dirty() -> None:
    d = Datastore("ds", 512, chunk_blocks=CB)
    d.lun_add(lun(3, 16), fresh=False)
    assert d.pending_zero() == (ext(3, 0, 16),)
    with pytest.raises(OutOfSpaceError):
        d.vdisk_create(vd("a"), 4)
    d.mark_zeroed(ext(3, 0, 16))
    assert d.vdisk_create(vd("a"), 4).extents() == (ext(3, 0, 4),)


def test_lun_membership_rules(ds: Datastore) -> None:
    with pytest.raises(LunConfigError, match="already"):
        ds.lun_add(lun(0, 40), fresh=True)
    with pytest.raises(LunConfigError, match="4096-byte blocks"):
        ds.lun_add(lun(5, 40, 4096), fresh=True)
    with pytest.raises(LunConfigError, match="smaller than one chunk"):
        ds.lun_add(lun(5, 3), fresh=True)
    ds.vdisk_create(vd("a"), 4)
    with pytest.raises(LunConfigError, match="allocated"):
        ds.lun_remove(key(0))
    ds.lun_remove(key(1))
    assert [x.key for x in ds.luns()] == [key(0)]
    with pytest.raises(LunConfigError, match="not in datastore"):
        ds.lun_remove(key(1))


def test_vdisk_errors(ds: Datastore) -> None:
    ds.vdisk_create(vd("a"), 4)
    with pytest.raises(VdiskExistsError):
        ds.vdisk_create(vd("a"), 4)
    with pytest.raises(LayoutError):
        ds.vdisk_create(vd("z"), 0)
    with pytest.raises(LayoutError):
        ds.vdisk_create(vd(""), 4)
    with pytest.raises(UnknownVdiskError):
        ds.vdisk_layout(vd("nope"))
    assert ds.vdisks() == (vd("a"),)
    with pytest.raises(LunConfigError):
        Datastore("", 512)
    with pytest.raises(LunConfigError):
        Datastore("x", 513)
    with pytest.raises(LunConfigError):
        Datastore("x", 512, chunk_blocks=0)


def test_dump_load_round_trip(ds: Datastore) -> None:
    ds.vdisk_create(vd("a"), 10)
    ds.vdisk_create(vd("t"), 64, thin=True)
    ds.vdisk_allocate(vd("t"), 30, 9)
    ds.vdisk_create(vd("b"), 7)
    ds.vdisk_delete(vd("a"))
    data = json.loads(json.dumps(ds.dump()))
    again = Datastore.load(data)
    assert again.dump() == ds.dump()
    assert again.usage() == ds.usage()
    # equal future behaviour
    for d in (ds, again):
        d.mark_zeroed(ext(0, 4, 4))
        d.vdisk_allocate(vd("t"), 0, 20)
        d.vdisk_create(vd("c"), 9)
    assert again.dump() == ds.dump()


def _dump_with(ds: Datastore, **patch: object) -> dict[str, object]:
    return {**json.loads(json.dumps(ds.dump())), **patch}


def test_load_refuses_inconsistent_dumps(ds: Datastore) -> None:
    ds.vdisk_create(vd("a"), 10)
    data = ds.dump()
    layout_a = data["vdisks"][0]
    bad = [
        _dump_with(ds, format="nope"),
        _dump_with(ds, version=2),
        _dump_with(ds, block_size=4096),
        _dump_with(ds, dirty=[ext(0, 0, 4).dump()]),  # dirty and allocated at once
        _dump_with(ds, dirty=[ext(0, 2, 4).dump()]),  # not whole chunks
        _dump_with(ds, dirty=[ext(0, 36, 8).dump()]),  # past the LUN
        _dump_with(ds, dirty=[ext(7, 0, 4).dump()]),  # unknown LUN
        _dump_with(ds, vdisks=[layout_a, layout_a]),  # twice
        _dump_with(ds, vdisks=[{**layout_a, "vdisk_id": "b"}, layout_a]),  # same extents
        _dump_with(ds, vdisks=[{**layout_a, "chunk_blocks": 2}]),
        _dump_with(ds, luns=[lun(0, 40).dump(), lun(0, 40).dump()]),
        _dump_with(ds, luns="x"),
        _dump_with(ds, luns=[{"array": "naa.50af1de000001000", "lun": 0}]),
    ]
    for data in bad:
        with pytest.raises(LayoutError):
            Datastore.load(data)


def test_thin_never_continues_into_a_dirty_chunk(ds: Datastore) -> None:
    """The "stay contiguous" preference yields to zero-on-reuse."""
    ds.vdisk_create(vd("t"), 64, thin=True)
    ds.vdisk_allocate(vd("t"), 0, 1)  # LUN0 chunk 0
    ds.vdisk_create(vd("b"), 4)  # LUN0 chunk 1
    ds.vdisk_delete(vd("b"))  # chunk 1 dirty
    t = ds.vdisk_allocate(vd("t"), 4, 1)
    assert t.chunk_extent(1) == ext(0, 8, 4)  # not the dirty chunk 1
    ds.mark_zeroed(ext(0, 4, 4))
    ds.vdisk_create(vd("u"), 64, thin=True)
    u = ds.vdisk_allocate(vd("u"), 0, 1)
    assert u.chunk_extent(0) == ext(0, 4, 4)  # zeroed: usable again
