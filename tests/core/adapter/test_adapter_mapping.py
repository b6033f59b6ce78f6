"""A VF's mapping table (claim A4): wire form, checks, canonical dump."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
from adapter_fakes import ARRAY_WWN, datastore, entry, mapping, standard_mapping
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.adapter.mapping import MappingError, MappingTable
from vfdirect.core.alloc import Extent, Placement, VdiskLayout
from vfdirect.core.array import LunKey
from vfdirect.core.ids import LunNumber, PhysicalLba, VdiskId, VirtualLba


def test_round_trip_and_lookup() -> None:
    doc, _ = standard_mapping()
    table = MappingTable.load(doc)
    assert table.dump() == doc
    assert MappingTable.load(table.dump()) == table
    assert len(table) == 3
    assert table.targets() == (0, 1)
    e = table.lookup(1, 0)
    assert e is not None and e.vdisk_id == "vd-c"
    assert table.lookup(1, 1) is None
    assert table.physical_luns() == (LunKey(ARRAY_WWN, LunNumber(0)),
                                     LunKey(ARRAY_WWN, LunNumber(1)))


def test_entries_are_sorted_so_the_dump_is_canonical() -> None:
    doc, _ = standard_mapping()
    shuffled = {**doc, "luns": list(reversed(doc["luns"]))}
    assert MappingTable.load(shuffled).dump() == doc


def test_thin_vdisk_with_holes_is_refused_and_inflated_one_accepted() -> None:
    ds = datastore()
    thin = ds.vdisk_create(VdiskId("thin"), 256, thin=True)
    ds.vdisk_allocate(VdiskId("thin"), 0, 64)
    with pytest.raises(MappingError, match=r"thin with 3 unallocated chunk\(s\); a VF maps "
                                           r"only fully allocated vdisks \(inflate it first\)"):
        MappingTable.load(mapping(entry(0, 0, ds.vdisk_layout(VdiskId("thin")))))
    inflated = ds.vdisk_allocate(VdiskId("thin"), 0, 256)
    assert inflated.thin
    table = MappingTable.load(mapping(entry(0, 0, inflated)))
    assert table.entries[0].layout == inflated
    del thin


def _bad(mutate: Any) -> str:
    doc, _ = standard_mapping()
    doc = copy.deepcopy(doc)
    mutate(doc)
    with pytest.raises(MappingError) as info:
        MappingTable.load(doc)
    return str(info.value)


@pytest.mark.parametrize(("mutate", "text"), [
    (lambda d: d.update(format="x"), 'must be "vfdirect.vf-mapping"'),
    (lambda d: d.update(version=2), "unsupported vfdirect.vf-mapping version 2"),
    (lambda d: d.update(extra=1), "unknown fields: extra"),
    (lambda d: d["luns"][0].update(capacity_blocks=201), "but its layout is of"),
    (lambda d: d["luns"][0].update(block_size=4096), "but its layout is of"),
    (lambda d: d["luns"][0].update(target=256), "target must be in 0..255"),
    (lambda d: d["luns"][0].update(lun=16384), "lun must be in 0..16383"),
    (lambda d: d["luns"][0].update(serial="caf\u00e9"), "outside ASCII 20h-7Eh"),
    (lambda d: d["luns"][0].update(serial=""), "serial must be 1..64"),
    (lambda d: d["luns"][0].update(wwn="naa.1"), "luns[0]: wwn"),
    (lambda d: d["luns"][0].pop("layout"), "lacks field 'layout'"),
    (lambda d: d["luns"][0]["layout"].update(format="x"), "luns[0]: layout: not a"),
    (lambda d: d["luns"][1].update(lun=0), "target 0 lun 0 is mapped twice"),
    (lambda d: d["luns"][1].update(wwn=d["luns"][0]["wwn"]), "is given to two LUNs"),
    (lambda d: d["luns"].append({**d["luns"][0], "lun": 9}), "is mapped at two addresses"),
    (lambda d: d["luns"].__setitem__(0, 5), "luns[0] must be an object"),
])
def test_malformed_tables_are_refused_with_the_reason(mutate: Any, text: str) -> None:
    assert text in _bad(mutate)


def test_two_vdisks_on_the_same_blocks_are_refused() -> None:
    ds = datastore()
    a = ds.vdisk_create(VdiskId("a"), 64)
    ext = a.placements[0].extent
    b = VdiskLayout(VdiskId("b"), 512, 64, 64, False,
                    (Placement(VirtualLba(0), Extent(ext.lun, PhysicalLba(ext.start), 64)),))
    with pytest.raises(MappingError, match="share physical blocks"):
        MappingTable.load(mapping(entry(0, 0, a), entry(0, 1, b)))


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["format", "version", "luns", "target", "lun", "layout", "serial",
                         "wwn", "vdisk_id", "block_size", "capacity_blocks", "placements"]),
        inner, max_size=6),
    max_leaves=20))
def test_loading_garbage_raises_only_mapping_error(data: Any) -> None:
    doc, _ = standard_mapping()
    for candidate in (data, {**doc, "luns": [data]},
                      {**doc, "luns": [{**doc["luns"][0], "layout": data}]}):
        if not isinstance(candidate, dict):
            continue
        with contextlib.suppress(MappingError):
            MappingTable.load(candidate)
