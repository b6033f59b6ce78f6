"""VdiskLayout: translation of virtual ranges into segments, checks, dump/load."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfdirect.core.alloc import (
    Extent,
    Hole,
    LayoutError,
    MappedSegment,
    Placement,
    VdiskLayout,
    VirtualRangeError,
)
from vfdirect.core.array import LunKey
from vfdirect.core.block import BlockRangeError
from vfdirect.core.ids import LunNumber, PhysicalLba, VdiskId, VirtualLba
from vfdirect.core.wwn import Wwn

A = LunKey(Wwn.naa5(0x1000), LunNumber(0))
B = LunKey(Wwn.naa5(0x1000), LunNumber(1))
C = LunKey(Wwn.naa5(0x2000), LunNumber(0))


def place(vlba: int, lun: LunKey, start: int, count: int) -> Placement:
    return Placement(VirtualLba(vlba), Extent(lun, PhysicalLba(start), count))


def layout(placements: list[Placement], capacity: int = 40, chunk: int = 4,
           thin: bool = True) -> VdiskLayout:
    return VdiskLayout(VdiskId("vd"), 512, capacity, chunk, thin, tuple(placements))


def test_spanning_request_cut_at_extents_and_holes() -> None:
    lay = layout([place(0, A, 100, 8), place(8, B, 0, 4), place(20, C, 40, 8)])
    segs = lay.translate(6, 20)
    assert segs == (
        MappedSegment(VirtualLba(6), Extent(A, PhysicalLba(106), 2)),
        MappedSegment(VirtualLba(8), Extent(B, PhysicalLba(0), 4)),
        Hole(VirtualLba(12), 8),
        MappedSegment(VirtualLba(20), Extent(C, PhysicalLba(40), 6)),
    )
    assert sum(s.count for s in segs) == 20
    assert lay.translate(30, 10) == (Hole(VirtualLba(30), 10),)
    assert lay.translate(5, 0) == ()


def test_out_of_range() -> None:
    lay = layout([place(0, A, 0, 40)], thin=False)
    for vlba, count in [(40, 1), (39, 2), (-1, 1), (0, 41), (0, -1)]:
        with pytest.raises(VirtualRangeError):
            lay.translate(vlba, count)
    assert issubclass(VirtualRangeError, BlockRangeError)
    assert lay.translate(40, 0) == ()


def test_canonical_merge() -> None:
    split = layout([place(4, A, 104, 4), place(0, A, 100, 4), place(8, A, 0, 4)])
    merged = layout([place(0, A, 100, 8), place(8, A, 0, 4)])
    assert split == merged
    assert split.dump() == merged.dump()
    assert len(split.placements) == 2


def test_chunk_queries() -> None:
    lay = layout([place(0, A, 100, 8), place(20, C, 40, 8)], capacity=30)
    assert lay.num_chunks == 8  # 30 blocks of 4-block chunks, last one partial
    assert lay.chunk_extent(1) == Extent(A, PhysicalLba(104), 4)
    assert lay.chunk_extent(2) is None
    assert lay.chunk_extent(6) == Extent(C, PhysicalLba(44), 4)
    with pytest.raises(VirtualRangeError):
        lay.chunk_extent(8)
    assert lay.chunk_range(3, 6) == range(3)
    assert lay.chunk_range(0, 0) == range(0)
    assert lay.allocated_blocks == 16 and lay.allocated_chunks == 4
    assert lay.luns() == (A, C)
    assert lay.extents() == (Extent(A, PhysicalLba(100), 8), Extent(C, PhysicalLba(40), 8))


@pytest.mark.parametrize(
    ("placements", "thin", "capacity", "message"),
    [
        ([place(2, A, 0, 4)], True, 40, "whole chunks"),
        ([place(0, A, 0, 6)], True, 40, "whole chunks"),
        ([place(0, A, 0, 8), place(4, B, 0, 4)], True, 40, "overlaps"),
        ([place(36, A, 0, 8)], True, 40, "overruns"),
        ([place(0, A, 0, 8), place(8, A, 4, 4)], True, 40, "overlap"),  # physical overlap
        ([place(0, A, 0, 8)], False, 40, "thick"),
        ([], True, 0, "positive"),
    ],
)
def test_malformed_layouts(placements: list[Placement], thin: bool, capacity: int,
                           message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        layout(placements, capacity=capacity, thin=thin)


def test_malformed_basics() -> None:
    with pytest.raises(LayoutError):
        VdiskLayout(VdiskId(""), 512, 8, 4, True)
    with pytest.raises(LayoutError):
        VdiskLayout(VdiskId("x"), 1024, 8, 4, True)
    with pytest.raises(LayoutError):
        Extent(A, PhysicalLba(0), 0)
    with pytest.raises(LayoutError):
        Extent(A, PhysicalLba(-4), 4)


def test_dump_load_round_trip_and_refusals() -> None:
    lay = layout([place(0, A, 100, 8), place(20, C, 40, 8)], capacity=30)
    data = json.loads(json.dumps(lay.dump()))
    assert VdiskLayout.load(data) == lay
    assert VdiskLayout.load(data).dump() == lay.dump()
    for patch in ({"format": "x"}, {"version": 7}, {"thin": 1}, {"placements": [1]},
                  {"placements": [{"vlba": 0, "array": "zz", "lun": 0, "start": 0, "count": 4}]},
                  {"capacity_blocks": "30"}):
        with pytest.raises(LayoutError):
            VdiskLayout.load({**data, **patch})


@st.composite
def layouts(draw: st.DrawFn) -> VdiskLayout:
    chunk = draw(st.integers(1, 5))
    capacity = draw(st.integers(1, 60))
    nchunks = -(-capacity // chunk)
    mapped = draw(st.lists(st.booleans(), min_size=nchunks, max_size=nchunks))
    luns = [A, B, C]
    placements = []
    next_free = dict.fromkeys(luns, 0)
    for i, m in enumerate(mapped):
        if m:
            lun = luns[draw(st.integers(0, 2))]
            gap = draw(st.integers(0, 1)) * chunk
            start = next_free[lun] + gap
            next_free[lun] = start + chunk
            placements.append(place(i * chunk, lun, start, chunk))
    return VdiskLayout(VdiskId("p"), 512, capacity, chunk, True, tuple(placements))


@given(layouts(), st.data())
def test_translate_agrees_with_per_block_lookup(lay: VdiskLayout, data: st.DataObject) -> None:
    vlba = data.draw(st.integers(0, lay.capacity_blocks))
    count = data.draw(st.integers(0, lay.capacity_blocks - vlba))
    # the model: each virtual block looked up on its own
    expect: list[tuple[LunKey, int] | None] = []
    for v in range(vlba, vlba + count):
        ext = lay.chunk_extent(v // lay.chunk_blocks)
        expect.append(None if ext is None else (ext.lun, ext.start + v % lay.chunk_blocks))
    got: list[tuple[LunKey, int] | None] = []
    pos = vlba
    prev_hole = False
    for seg in lay.translate(vlba, count):
        assert seg.vlba == pos and seg.count > 0
        if isinstance(seg, Hole):
            assert not prev_hole  # holes are maximal
            got.extend([None] * seg.count)
        else:
            got.extend((seg.extent.lun, seg.extent.start + i) for i in range(seg.count))
        prev_hole = isinstance(seg, Hole)
        pos += seg.count
    assert got == expect
    assert VdiskLayout.load(lay.dump()) == lay
