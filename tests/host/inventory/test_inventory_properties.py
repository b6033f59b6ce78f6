"""Property: whatever sequence of vdisk operations runs, the inventory's rows hold the
very state the pure allocator would be in after the same sequence, refusals included."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inventory_helpers import CHUNK, add_datastore

from vfdirect.core.alloc import Datastore
from vfdirect.core.alloc import OutOfSpaceError as ModelOutOfSpace
from vfdirect.core.ids import VdiskId
from vfdirect.host.inventory import Inventory, OutOfSpaceError

LUN_BLOCKS = 16 * CHUNK  # two LUNs: 32 chunks

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.integers(1, 12 * CHUNK), st.booleans()),
        st.tuples(st.just("allocate"), st.integers(0, 99), st.floats(0, 1)),
        st.tuples(st.just("inflate"), st.integers(0, 99), st.just(0)),
        st.tuples(st.just("delete"), st.integers(0, 99), st.just(0)),
        st.tuples(st.just("zero"), st.integers(0, 99), st.just(0)),
    ),
    max_size=12,
)

_examples = itertools.count()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=OPS)
def test_rows_follow_the_pure_allocator(inventory: Inventory,
                                        ops: list[tuple[str, int, float]]) -> None:
    n = next(_examples)
    name = f"ds{n}"
    storage = add_datastore(inventory, name, array_vsid=0x10000 + n, luns=2, blocks=LUN_BLOCKS)
    model = Datastore(name, 512, CHUNK)
    for key in storage.luns:
        model.lun_add(inventory.lun_get(key).lun, fresh=True)
    live: list[VdiskId] = []
    for i, (op, arg, extra) in enumerate(ops):
        if op == "create":
            thin = bool(extra)
            try:
                v = inventory.vdisk_create(name, f"{name}-v{i}", arg, thin=thin)
            except OutOfSpaceError:
                try:
                    model.vdisk_create(VdiskId(f"refused-{i}"), arg, thin=thin)
                except ModelOutOfSpace:
                    continue
                raise AssertionError("the inventory refused what the allocator grants") from None
            model.vdisk_create(v.id, arg, thin=thin)
            live.append(v.id)
        elif op in ("allocate", "inflate") and live:
            vid = live[arg % len(live)]
            capacity = model.vdisk_layout(vid).capacity_blocks
            vlba, count = ((min(int(extra * capacity), capacity - 1), 1)
                           if op == "allocate" else (0, capacity))
            refused = False
            try:
                inventory.vdisk_allocate(vid, vlba, count)
            except OutOfSpaceError:
                refused = True
            try:
                model.vdisk_allocate(vid, vlba, count)
                assert not refused, "the inventory refused what the allocator grants"
            except ModelOutOfSpace:
                assert refused, "the inventory granted what the allocator refuses"
        elif op == "delete" and live:
            vid = live.pop(arg % len(live))
            assert inventory.vdisk_delete(vid) == model.vdisk_delete(vid)
        elif op == "zero" and model.pending_zero():
            pending = model.pending_zero()
            extent = pending[arg % len(pending)]
            inventory.datastore_mark_zeroed(name, extent)
            model.mark_zeroed(extent)
        assert inventory.datastore_dump(name) == model.dump()
    assert inventory.datastore_get(name).usage == model.usage()
