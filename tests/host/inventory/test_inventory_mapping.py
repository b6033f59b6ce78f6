"""Mapping info (claim A2) built from what is stored, and the VF mapping table the
adapter's ``mapping_load`` takes (claim A4's payload)."""

from __future__ import annotations

import json

import pytest
from inventory_helpers import CHUNK, LUN_BLOCKS, add_datastore

from vfdirect.core.adapter.mapping import MappingTable
from vfdirect.core.alloc import VdiskLayout
from vfdirect.host.inventory import Inventory, NotAllocatedError, NotFoundError


def _configured(inv: Inventory) -> list[str]:
    """vm1 with three vdisks (one spanning both LUNs, one thin then inflated) at
    (0,0), (0,1) and (2,5), under an associated vport; vm2 has one more."""
    add_datastore(inv, luns=2)
    inv.host_register("h1")
    inv.vm_create("vm1", memory_bytes=1 << 26, host="h1")
    inv.vm_create("vm2", memory_bytes=1 << 26, host="h1")
    a = inv.vdisk_create("ds0", "a", 300)
    b = inv.vdisk_create("ds0", "b", LUN_BLOCKS + 10)
    c = inv.vdisk_create("ds0", "c", 5 * CHUNK, thin=True)
    d = inv.vdisk_create("ds0", "d", 100)
    inv.vdisk_attach("vm1", a.id)
    inv.vdisk_attach("vm1", b.id)
    inv.vport_create(host="h1", vm="vm1")
    inv.vdisk_attach("vm1", c.id, target=2, lun=5)
    inv.vdisk_attach("vm2", d.id)
    inv.vdisk_inflate(c.id)
    return [a.id, b.id, c.id]


def test_mapping_info_is_the_stored_extents_and_addresses(inventory: Inventory) -> None:
    ids = _configured(inventory)
    info = inventory.mapping_build("vm1")
    vport = inventory.vm_get("vm1").vport
    assert info.vm == "vm1" and info.vport is not None and info.vport.wwpn == vport
    assert [e.vdisk.id for e in info.entries] == ids
    # first mapping: exactly the extent rows of each vdisk
    assert info.first == {i: inventory.vdisk_layout(i) for i in ids}
    # second mapping: exactly the address rows, under the VM's vport
    assert info.second == {i: inventory.vdisk_get(i).address for i in ids}
    assert [(a.vport, a.target, a.lun) for a in info.second.values()] == [
        (vport, 0, 0), (vport, 0, 1), (vport, 2, 5)]
    storage_luns = {k for i in ids for k in inventory.vdisk_layout(i).luns()}
    assert set(info.physical_luns()) == storage_luns and len(storage_luns) == 2


def test_mapping_table_is_what_mapping_load_accepts(inventory: Inventory) -> None:
    ids = _configured(inventory)
    table = inventory.vm_mapping_table("vm1")
    assert json.loads(json.dumps(table)) == table  # plain JSON, as sent over the PF
    loaded = MappingTable.load(table)  # the adapter's own loader
    assert loaded.dump() == table  # canonical: what mapping_get will read back
    assert [e.vdisk_id for e in loaded.entries] == ids
    for entry in loaded.entries:
        vdisk = inventory.vdisk_get(entry.vdisk_id)
        assert vdisk.address is not None
        assert (entry.target, entry.lun) == (vdisk.address.target, vdisk.address.lun)
        assert (entry.serial, entry.wwn) == (vdisk.serial, vdisk.lu_wwn)
        assert (entry.block_size, entry.capacity_blocks) == (
            vdisk.block_size, vdisk.capacity_blocks)
        assert entry.layout == inventory.vdisk_layout(entry.vdisk_id)
    raw = table["luns"][1]["layout"]
    assert VdiskLayout.load(raw) == inventory.vdisk_layout(ids[1])
    assert set(loaded.physical_luns()) == set(inventory.mapping_build("vm1").physical_luns())


def test_a_thin_vdisk_must_be_inflated_before_mapping(inventory: Inventory) -> None:
    add_datastore(inventory)
    inventory.vm_create("vm1", memory_bytes=1 << 26)
    v = inventory.vdisk_create("ds0", "t", 3 * CHUNK, thin=True)
    inventory.vdisk_attach("vm1", v.id)
    with pytest.raises(NotAllocatedError, match=r"'t'\) of VM 'vm1' is thin with 3 unall"):
        inventory.vm_mapping_table("vm1")
    inventory.vdisk_inflate("t")
    assert len(MappingTable.load(inventory.vm_mapping_table("vm1"))) == 1


def test_empty_and_unknown_vms(inventory: Inventory) -> None:
    inventory.vm_create("vm1", memory_bytes=1 << 26)
    assert inventory.vm_mapping_table("vm1") == {
        "format": "vfdirect.vf-mapping", "version": 1, "luns": []}
    assert inventory.mapping_build("vm1").entries == ()
    with pytest.raises(NotFoundError, match="no VM 'nope'"):
        inventory.mapping_build("nope")
