"""Arrays, LUNs, datastores and vdisks in the inventory: the pure allocator decides,
the rows remember (claim A1, first mapping of claim A2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from inventory_helpers import (
    CHUNK,
    LUN_BLOCKS,
    add_datastore,
    add_storage,
    all_extents,
    assert_disjoint,
)

from vfdirect.core.alloc import Datastore, Extent
from vfdirect.core.array import LunKey
from vfdirect.core.ids import LunNumber, PhysicalLba
from vfdirect.core.wwn import Wwn
from vfdirect.host.inventory import (
    BackingKind,
    ConflictError,
    DuplicateWwnError,
    InvalidArgumentError,
    Inventory,
    NotFoundError,
    OutOfSpaceError,
)
from vfdirect.storage import StorageArray


def test_register_array_and_luns(inventory: Inventory) -> None:
    storage = add_storage(inventory, luns=3)
    view = inventory.array_get(storage.array)
    assert view.wwn == storage.array
    assert [lv.key for lv in view.luns] == list(storage.luns)
    assert all(lv.backing is BackingKind.FILE and lv.datastore is None for lv in view.luns)
    assert inventory.lun_get(storage.luns[1]).lun.num_blocks == LUN_BLOCKS
    assert [lv.key for lv in inventory.lun_list(storage.array)] == list(storage.luns)
    with pytest.raises(ConflictError, match="already has LUN 1"):
        inventory.lun_register(storage.array, 1, block_size=512, num_blocks=8, path="x")
    with pytest.raises(DuplicateWwnError, match="storage array"):
        inventory.array_register(storage.array, "/elsewhere")
    with pytest.raises(NotFoundError, match="no storage array"):
        inventory.lun_register(Wwn.naa5(0x9999), 0, block_size=512, num_blocks=8, path="x")
    with pytest.raises(InvalidArgumentError, match="block size"):
        inventory.lun_register(storage.array, 7, block_size=1024, num_blocks=8, path="x")


def test_array_import_from_the_storage_shell(inventory: Inventory, tmp_path: Path) -> None:
    array = StorageArray.create(tmp_path / "array0", Wwn.naa5(0x2000))
    array.lun_create(1024)
    array.lun_create(2048, block_size=4096)
    view = inventory.array_import(array)
    assert view.target_ports == array.target_ports
    assert [lv.lun for lv in view.luns] == list(array.lun_list())
    assert view.luns[0].path == "lun-00000.img"
    array.lun_create(512)
    again = inventory.array_import(array)  # idempotent, picks up the new LUN
    assert len(again.luns) == 3
    assert inventory.event_list(kind="array_import")[-1].detail["luns_added"] == [2]


def test_datastore_create_and_list(inventory: Inventory) -> None:
    storage = add_datastore(inventory, "ds0", luns=2)
    other = add_storage(inventory, array_vsid=0x3000, luns=1)
    ds = inventory.datastore_get("ds0")
    assert ds.luns == tuple(inventory.lun_get(k).lun for k in storage.luns)
    assert (ds.block_size, ds.chunk_blocks) == (512, CHUNK)
    assert ds.usage.total_blocks == ds.usage.free_blocks == 2 * LUN_BLOCKS
    grown = inventory.datastore_lun_add("ds0", other.luns[0])
    assert grown.usage.total_blocks == 3 * LUN_BLOCKS
    assert inventory.lun_get(other.luns[0]).datastore == "ds0"
    assert [d.name for d in inventory.datastore_list()] == ["ds0"]
    with pytest.raises(ConflictError, match="already in datastore 'ds0'"):
        inventory.datastore_create("ds1", luns=[storage.luns[0]])
    assert [d.name for d in inventory.datastore_list()] == ["ds0"]  # nothing half-made
    with pytest.raises(ConflictError, match="already exists"):
        inventory.datastore_create("ds0")
    with pytest.raises(NotFoundError, match="no physical LUN"):
        inventory.datastore_create("ds2", luns=[LunKey(storage.array, LunNumber(9))])
    with pytest.raises(InvalidArgumentError, match="datastore name"):
        inventory.datastore_create("bad name")


def test_a_lun_of_unknown_content_joins_dirty(inventory: Inventory) -> None:
    storage = add_storage(inventory, luns=1)
    ds = inventory.datastore_create("ds0", chunk_blocks=CHUNK, luns=storage.luns, fresh=False)
    assert ds.usage.dirty_blocks == LUN_BLOCKS and ds.usage.free_blocks == 0
    with pytest.raises(OutOfSpaceError, match="wait for zeroing") as err:
        inventory.vdisk_create("ds0", "d", 10)
    assert err.value.dirty_blocks == LUN_BLOCKS
    (pending,) = inventory.datastore_pending_zero("ds0")
    inventory.datastore_mark_zeroed("ds0", pending)
    assert inventory.datastore_get("ds0").usage.free_blocks == LUN_BLOCKS
    inventory.vdisk_create("ds0", "d", 10)


def test_thick_vdisks_across_luns(inventory: Inventory) -> None:
    """Claim A1: thick vdisks get every chunk at once; one too big for a LUN spans two."""
    storage = add_datastore(inventory, luns=2)
    small = inventory.vdisk_create("ds0", "small", 200)
    big = inventory.vdisk_create("ds0", "big", LUN_BLOCKS + 100)
    assert small.allocated_blocks == 4 * CHUNK and small.fully_allocated
    layout = inventory.vdisk_layout("big")
    assert layout.capacity_blocks == LUN_BLOCKS + 100 and not layout.thin
    assert layout.luns() == storage.luns
    assert big.allocated_blocks == layout.allocated_blocks == layout.num_chunks * CHUNK
    assert_disjoint(all_extents(inventory))
    event = inventory.event_list(kind="vdisk_create")[-1]
    assert (event.claim, event.vdisk) == ("A1", big.id)
    assert event.detail["extents"] == [p.extent.dump() for p in layout.placements]


def test_the_rows_allocate_as_the_pure_allocator_does(inventory: Inventory) -> None:
    """The same requests on a pure Datastore give the same layouts (the inventory runs
    that allocator over its rows)."""
    storage = add_datastore(inventory, luns=2)
    model = Datastore("ds0", 512, CHUNK)
    for key in storage.luns:
        model.lun_add(inventory.lun_get(key).lun, fresh=True)
    for i, (blocks, thin) in enumerate([(100, False), (3000, True), (2500, False), (64, True)]):
        v = inventory.vdisk_create("ds0", f"d{i}", blocks, thin=thin)
        assert inventory.vdisk_layout(v.id) == model.vdisk_create(v.id, blocks, thin=thin)
        if thin:
            layout = inventory.vdisk_allocate(v.id, blocks // 2, 1)
            assert layout == model.vdisk_allocate(v.id, blocks // 2, 1)
    assert inventory.datastore_dump("ds0") == model.dump()


def test_thin_vdisk_allocates_on_demand_and_inflates(inventory: Inventory) -> None:
    add_datastore(inventory, luns=2)
    v = inventory.vdisk_create("ds0", "thin", 10 * CHUNK, thin=True)
    assert v.thin and v.allocated_blocks == 0 and not v.fully_allocated
    layout = inventory.vdisk_allocate(v.id, 3 * CHUNK + 5, CHUNK)  # touches chunks 3, 4
    assert layout.allocated_chunks == 2 and layout.chunk_extent(0) is None
    assert inventory.vdisk_allocate(v.id, 3 * CHUNK, 1) == layout  # idempotent
    with pytest.raises(InvalidArgumentError, match="outside its 640 blocks"):
        inventory.vdisk_allocate(v.id, 10 * CHUNK, 1)
    inflated = inventory.vdisk_inflate("thin")
    assert inflated.fully_allocated and inflated.thin
    assert inventory.vdisk_layout("thin").allocated_chunks == 10
    events = [e.kind for e in inventory.event_list(vm=None) if e.vdisk == v.id]
    assert events == ["vdisk_create", "vdisk_allocate", "vdisk_inflate"]


def test_out_of_space_changes_nothing(inventory: Inventory) -> None:
    add_datastore(inventory, luns=2)
    inventory.vdisk_create("ds0", "a", LUN_BLOCKS)
    thin = inventory.vdisk_create("ds0", "t", 2 * LUN_BLOCKS, thin=True)
    before = inventory.datastore_dump("ds0"), inventory.vdisk_list(), inventory.event_list()
    with pytest.raises(OutOfSpaceError, match=r"vdisk 'b'.*datastore ds0") as err:
        inventory.vdisk_create("ds0", "b", LUN_BLOCKS + 1)
    assert (err.value.needed_blocks, err.value.free_blocks) == (LUN_BLOCKS + CHUNK, LUN_BLOCKS)
    with pytest.raises(OutOfSpaceError, match="inflating vdisk"):
        inventory.vdisk_inflate(thin.id)
    with pytest.raises(OutOfSpaceError):
        inventory.vdisk_allocate(thin.id, 0, LUN_BLOCKS + 1)
    assert (inventory.datastore_dump("ds0"), inventory.vdisk_list(),
            inventory.event_list()) == before
    with pytest.raises(NotFoundError):
        inventory.vdisk_get("b")


def test_delete_makes_dirty_ranges_never_reused_before_zeroing(inventory: Inventory) -> None:
    storage = add_datastore(inventory, luns=1)
    a = inventory.vdisk_create("ds0", "a", 2 * CHUNK)
    b = inventory.vdisk_create("ds0", "b", LUN_BLOCKS - 2 * CHUNK)
    freed = inventory.vdisk_delete("a")
    assert freed == (Extent(storage.luns[0], PhysicalLba(0), 2 * CHUNK),)
    assert inventory.datastore_pending_zero("ds0") == freed
    assert inventory.datastore_get("ds0").usage.dirty_blocks == 2 * CHUNK
    with pytest.raises(OutOfSpaceError, match="wait for zeroing"):
        inventory.vdisk_create("ds0", "c", CHUNK)
    with pytest.raises(NotFoundError):
        inventory.vdisk_get(a.id)
    # a vdisk id (its LU name) is never reused
    with pytest.raises(InvalidArgumentError, match="not waiting for zeroing"):
        inventory.datastore_mark_zeroed("ds0", Extent(storage.luns[0], PhysicalLba(2 * CHUNK),
                                                      CHUNK))
    inventory.datastore_mark_zeroed("ds0", Extent(storage.luns[0], PhysicalLba(CHUNK), CHUNK))
    assert inventory.datastore_pending_zero("ds0") == (
        Extent(storage.luns[0], PhysicalLba(0), CHUNK),)
    c = inventory.vdisk_create("ds0", "c", CHUNK)
    assert inventory.vdisk_layout(c.id).extents() == (
        Extent(storage.luns[0], PhysicalLba(CHUNK), CHUNK),)
    assert c.id not in (a.id, b.id)
    assert inventory.event_list(kind="vdisk_delete")[0].detail["dirty"] == [freed[0].dump()]


def test_vdisk_names_and_lookups(inventory: Inventory) -> None:
    add_datastore(inventory)
    v = inventory.vdisk_create("ds0", "disk-1", 100)
    assert v.id.startswith("vd-") and len(v.id) == 11 and v.serial == v.id
    assert v.lu_wwn.naa_type == 5 and v.lu_wwn.vendor_specific >> 32 == 0xD
    assert v.lu_wwn.vendor_specific & 0xFFFF_FFFF == int(v.id[3:], 16)
    assert inventory.vdisk_get("disk-1") == inventory.vdisk_get(v.id) == v
    assert v.size_bytes == 100 * 512 and v.datastore == "ds0" and v.address is None
    with pytest.raises(ConflictError, match="vdisk 'disk-1' already exists"):
        inventory.vdisk_create("ds0", "disk-1", 100)
    with pytest.raises(NotFoundError, match="no datastore 'nope'"):
        inventory.vdisk_create("nope", "x", 100)
    with pytest.raises(InvalidArgumentError, match="capacity"):
        inventory.vdisk_create("ds0", "x", 0)
    assert [x.name for x in inventory.vdisk_list(datastore="ds0")] == ["disk-1"]
