"""Several host processes share one inventory (an SQLite file, or PostgreSQL): writers
take turns on a datastore, so no block is ever handed out twice."""

from __future__ import annotations

from inventory_helpers import Worker, add_datastore, all_extents, assert_disjoint

from vfdirect.core.alloc import Datastore
from vfdirect.host.inventory import Inventory

ROUNDS = 24


def test_two_processes_allocate_on_one_datastore_without_overlap(db_url: str) -> None:
    with Inventory.open(db_url) as inv:
        # 64 chunks: the two workers ask for more than that, so some requests are
        # refused while the other worker holds space
        add_datastore(inv, luns=2, blocks=2048)
    workers = [Worker(db_url, "ds0", f"w{i}", ROUNDS) for i in range(2)]
    try:
        for w in workers:
            w.go()
        results = [w.result() for w in workers]
    finally:
        for w in workers:
            w.kill()
    kept = [vid for r in results for vid in r["kept"]]  # type: ignore[attr-defined]
    with Inventory.open(db_url) as inv:
        vdisks = {v.id: v for v in inv.vdisk_list(datastore="ds0")}
        assert sorted(vdisks) == sorted(kept)
        assert all(v.fully_allocated for v in vdisks.values())
        extents = all_extents(inv, "ds0")
        assert_disjoint(extents)
        # the rows make a consistent allocator state (it rejects a block claimed twice)
        ds = Datastore.load(inv.datastore_dump("ds0"))
        usage = ds.usage()
        assert usage.allocated_blocks == sum(e.count for e, _ in extents)
        assert usage.free_blocks + usage.allocated_blocks + usage.dirty_blocks == 2 * 2048
        created = inv.event_list(kind="vdisk_create")
        refused = sum(int(r["refused"]) for r in results)  # type: ignore[call-overload]
        scrapped = sum(int(r["scrapped"]) for r in results)  # type: ignore[call-overload]
        assert len(created) + refused == 2 * ROUNDS
        # 72 chunks were asked for, 64 exist: space ran out while both were at work
        assert refused + scrapped > 0
