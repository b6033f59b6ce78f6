"""The auditor's pure parts (issue 8): interval sets against a brute-force model, extent
sets read from a mapping table's raw document, and the ledger's counters."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.adapter.audit import (
    MAX_KEPT,
    AuditError,
    AuditLedger,
    ExtentSet,
    IntervalSet,
    Violation,
    extents_of_mapping,
    regions_of_table,
)
from vfdirect.core.adapter.mapping import MappingTable
from vfdirect.core.alloc import Datastore
from vfdirect.core.array import LunKey, PhysicalLun
from vfdirect.core.ids import LunNumber, VdiskId
from vfdirect.core.wwn import Wwn

SPACE = 64
ranges = st.lists(st.tuples(st.integers(0, SPACE), st.integers(0, 12)), max_size=8)


def _model(spans: list[tuple[int, int]]) -> set[int]:
    return {x for start, length in spans for x in range(start, start + length)}


@settings(max_examples=300, deadline=None)
@given(ranges, st.integers(-2, SPACE + 14), st.integers(-1, 20))
def test_interval_set_covers_exactly_the_members(spans: list[tuple[int, int]], start: int,
                                                 length: int) -> None:
    s = IntervalSet(spans)
    points = _model(spans)
    if start < 0 or length < 0:
        assert not s.covers(start, length)
    elif length == 0:
        # an empty range is granted inside a member or at its very end
        assert s.covers(start, 0) == (start in points or start - 1 in points)
    else:
        assert s.covers(start, length) == all(x in points for x in range(start, start + length))


@settings(max_examples=200, deadline=None)
@given(ranges)
def test_interval_set_is_merged_sorted_and_keeps_the_total(spans: list[tuple[int, int]]) -> None:
    s = IntervalSet(spans)
    merged = s.ranges
    assert all(a[1] < b[0] for a, b in itertools.pairwise(merged))  # gaps only
    assert all(start < end for start, end in merged)
    assert s.total() == len(_model(spans))
    assert bool(s) == bool(_model(spans))


def test_interval_set_refuses_bad_ranges() -> None:
    with pytest.raises(AuditError, match="negative"):
        IntervalSet([(-1, 4)])
    with pytest.raises(AuditError, match="two integers"):
        IntervalSet([(True, 4)])


def test_adjacent_regions_merge_but_a_hole_splits() -> None:
    mem = regions_of_table([(0, 0x1000), (0x1000, 0x1000), (0x3000, 0x1000)])
    assert mem.covers(0x800, 0x1000)          # across two adjacent regions
    assert not mem.covers(0x1800, 0x1000)     # runs into the hole
    assert mem.covers(0x2000, 0)              # the end of a region
    assert not mem.covers(0x2800, 0)          # inside the hole
    assert mem.covers(0x3ff8, 8) and not mem.covers(0x3ff8, 9)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([("a", 0), ("a", 1), ("b", 0)]),
                          st.integers(0, SPACE), st.integers(1, 8)), max_size=8),
       st.sampled_from([("a", 0), ("a", 1), ("b", 0), ("c", 3)]),
       st.integers(0, SPACE + 8), st.integers(1, 8))
def test_extent_set_is_per_lun(extents: list[tuple[tuple[str, int], int, int]],
                               lun: tuple[str, int], start: int, count: int) -> None:
    s = ExtentSet(extents)
    blocks = _model([(b, n) for k, b, n in extents if k == lun])
    assert s.covers(lun, start, count) == all(x in blocks for x in range(start, start + count))
    assert s.has_lun(lun) == any(k == lun for k, _, _ in extents)


def _mapping() -> MappingTable:
    array = Wwn.naa5(0xA11)
    ds = Datastore("ds", 512, chunk_blocks=16)
    for n in (0, 1):
        ds.lun_add(PhysicalLun(LunKey(array, LunNumber(n)), 512, 64), fresh=True)
    a = ds.vdisk_create(VdiskId("vd-a"), 40)
    b = ds.vdisk_create(VdiskId("vd-b"), 80)  # spills onto LUN 1
    entries = []
    for lun, layout in ((0, a), (1, b)):
        entries.append({"target": 0, "lun": lun, "vdisk_id": layout.vdisk_id,
                        "block_size": 512, "capacity_blocks": layout.capacity_blocks,
                        "serial": f"S{lun}", "wwn": Wwn.naa5(0x900 + lun).canonical(),
                        "layout": layout.dump()})
    return MappingTable.load({"format": "vfdirect.vf-mapping", "version": 1,
                              "luns": entries})


def test_extents_of_a_mapping_are_its_placements() -> None:
    table = _mapping()
    extents = extents_of_mapping(table.dump())
    placed = [p.extent for e in table.entries for p in e.layout.placements]
    assert extents.total() == sum(x.count for x in placed)
    for x in placed:
        name = (x.lun.array.canonical().lower(), int(x.lun.lun))
        assert extents.covers(name, x.start, x.count)
        assert not extents.covers(name, x.start, x.count + 200)
    # vd-a takes 48 blocks (3 chunks) of LUN 0, vd-b the 16 left and 64 of LUN 1
    lun0 = (Wwn.naa5(0xA11).canonical().lower(), 0)
    assert extents.blocks(lun0).ranges == ((0, 64),)
    assert extents_of_mapping(None).total() == 0


@pytest.mark.parametrize(("doc", "message"), [
    ({}, "no 'luns'"),
    ({"luns": [{"layout": {"placements": [{"array": "x", "lun": 0, "start": -1,
                                           "count": 1}]}}]}, "negative"),
    ({"luns": [{"layout": {"placements": [{"array": "x", "lun": "0", "start": 0,
                                           "count": 1}]}}]}, "'lun' is not a int"),
    ({"luns": [{"layout": []}]}, "'layout' is not a Mapping"),
])
def test_a_malformed_mapping_document_is_refused(doc: dict[str, object], message: str) -> None:
    with pytest.raises(AuditError, match=message):
        extents_of_mapping(doc)


def test_ledger_counts_in_total_and_per_vf_and_keeps_the_first_violations() -> None:
    ledger = AuditLedger()
    ledger.checked(0, "memory", 3)
    ledger.checked(1, "extent")
    ledger.checked(None, "extent")
    for i in range(MAX_KEPT + 5):
        ledger.violated(Violation(1, "extent", "write", i, 8, "a/0"))
    ledger.violated(Violation(0, "memory", "view", 0x5000, 16))
    dump = ledger.dump()
    assert dump["enabled"] is True
    assert (dump["checks"], dump["memory_checks"], dump["extent_checks"]) == (5, 3, 2)
    assert (dump["extent_violations"], dump["memory_violations"]) == (MAX_KEPT + 5, 1)
    assert len(dump["violations"]) == MAX_KEPT
    assert dump["violations"][0] == {"vf": 1, "kind": "extent", "op": "write", "address": 0,
                                     "length": 8, "lun": "a/0"}
    assert ledger.vf_dump(0)["memory_violations"] == 1
    assert ledger.vf_dump(1)["extent_checks"] == 1
    assert ledger.vf_dump(7) == {"checks": 0, "memory_checks": 0, "extent_checks": 0,
                                 "memory_violations": 0, "extent_violations": 0}
