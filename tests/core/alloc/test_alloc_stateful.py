"""The datastore allocator against a per-chunk model, driven by hypothesis.

The model knows every chunk's state: never used, clean (zeroed after a free), dirty
(freed, not yet zeroed) or allocated to a vdisk. Checked after every step:

* no two live extents overlap, and each vdisk's layout is exactly its model chunks;
* no leak: free + allocated + dirty == total, and the free and to-zero lists are exactly
  the model's;
* every chunk of a new allocation was never used or zeroed since it was freed: a
  freed chunk is handed out again only after the shell reported it zeroed;
* refused operations (out of space, unknown vdisk, bad zeroing) change nothing;
* at any point, ``load(dump(d))`` dumps equal, and from then on the reloaded twin gives
  the same answers as the original to every operation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vfdirect.core.alloc import (
    AllocError,
    Datastore,
    Extent,
    LunConfigError,
    OutOfSpaceError,
    UnknownVdiskError,
    VdiskExistsError,
    VdiskLayout,
    ZeroingError,
)
from vfdirect.core.array import LunKey, PhysicalLun
from vfdirect.core.ids import LunNumber, PhysicalLba, VdiskId
from vfdirect.core.wwn import Wwn

CB = 4
NEVER, CLEAN, DIRTY = "never", "clean", "dirty"
ARRAYS = (Wwn.naa5(0x1000), Wwn.naa5(0x2000))

lun_keys = st.builds(LunKey, st.sampled_from(ARRAYS), st.integers(0, 2).map(LunNumber))
vdisk_ids = st.sampled_from(["a", "b", "c", "d", "e"]).map(VdiskId)


def _plain(result: object) -> object:
    """A comparable, plain form of an operation's result."""
    if isinstance(result, VdiskLayout):
        return result.dump()
    if isinstance(result, tuple):
        return [_plain(r) for r in result]
    if isinstance(result, Extent):
        return result.dump()
    return result


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ds = Datastore("ds", 512, chunk_blocks=CB)
        self.twin: Datastore | None = None
        #: LUN -> per-chunk state: NEVER / CLEAN / DIRTY / a VdiskId
        self.chunks: dict[LunKey, list[str]] = {}
        self.thin: dict[VdiskId, bool] = {}

    # -- helpers ---------------------------------------------------------------------

    def run(self, op: Callable[[Datastore], Any]) -> tuple[object, AllocError | None]:
        """Apply ``op`` to the datastore (and the reloaded twin, which must agree)."""
        outcomes: list[tuple[object, AllocError | None]] = []
        for d in (self.ds, self.twin):
            if d is None:
                continue
            before = d.dump()
            try:
                outcomes.append((_plain(op(d)), None))
            except AllocError as exc:
                assert d.dump() == before, "a refused operation changed the state"
                outcomes.append((None, exc))
        if len(outcomes) == 2:
            (r1, e1), (r2, e2) = outcomes
            assert r1 == r2
            assert type(e1) is type(e2)
            assert self.twin is not None
            assert self.twin.dump() == self.ds.dump()
        return outcomes[0]

    def count(self, *states: str) -> int:
        return sum(1 for cs in self.chunks.values() for s in cs if s in states)

    def free_chunks(self) -> int:
        return self.count(NEVER, CLEAN)

    def chunks_of(self, extent: Extent) -> range:
        assert extent.start % CB == 0 and extent.count % CB == 0
        return range(extent.start // CB, extent.end // CB)

    def owned(self, vid: VdiskId) -> set[tuple[LunKey, int]]:
        return {(k, i) for k, cs in self.chunks.items() for i, s in enumerate(cs) if s == vid}

    def take(self, vid: VdiskId, extents: list[Extent]) -> None:
        """Newly allocated chunks: each must have been never used or clean."""
        for e in extents:
            for c in self.chunks_of(e):
                assert self.chunks[e.lun][c] in (NEVER, CLEAN), (
                    f"chunk {c} of {e.lun} handed out while {self.chunks[e.lun][c]}"
                )
                self.chunks[e.lun][c] = vid

    # -- rules -----------------------------------------------------------------------

    @rule(key=lun_keys, nchunks=st.integers(1, 8), tail=st.integers(0, CB - 1),
          fresh=st.booleans())
    def add_lun(self, key: LunKey, nchunks: int, tail: int, fresh: bool) -> None:
        lun = PhysicalLun(key, 512, nchunks * CB + tail)
        _, err = self.run(lambda d: d.lun_add(lun, fresh=fresh))
        if key in self.chunks:
            assert isinstance(err, LunConfigError)
        else:
            assert err is None
            self.chunks[key] = [NEVER if fresh else DIRTY] * nchunks

    @rule(key=lun_keys)
    def remove_lun(self, key: LunKey) -> None:
        _, err = self.run(lambda d: d.lun_remove(key))
        if key not in self.chunks or any(
            s not in (NEVER, CLEAN, DIRTY) for s in self.chunks[key]
        ):
            assert isinstance(err, LunConfigError)
        else:
            assert err is None
            del self.chunks[key]

    @rule(vid=vdisk_ids, capacity=st.integers(1, 40), thin=st.booleans())
    def create(self, vid: VdiskId, capacity: int, thin: bool) -> None:
        result, err = self.run(lambda d: d.vdisk_create(vid, capacity, thin=thin))
        need = -(-capacity // CB)
        if vid in self.thin:
            assert isinstance(err, VdiskExistsError)
            return
        if not thin and need > self.free_chunks():
            assert isinstance(err, OutOfSpaceError)
            return
        assert err is None
        layout = VdiskLayout.load(result)  # type: ignore[arg-type]
        assert layout.capacity_blocks == capacity and layout.thin == thin
        assert layout.allocated_chunks == (0 if thin else need)
        self.take(vid, list(layout.extents()))
        self.thin[vid] = thin

    @precondition(lambda self: bool(self.thin))
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        vid = data.draw(st.sampled_from(sorted(self.thin)))
        layout = self.ds.vdisk_layout(vid)
        vlba = data.draw(st.integers(0, layout.capacity_blocks - 1))
        count = data.draw(st.integers(1, layout.capacity_blocks - vlba))
        chunks = layout.chunk_range(vlba, count)
        missing = [c for c in chunks if layout.chunk_extent(c) is None]
        result, err = self.run(lambda d: d.vdisk_allocate(vid, vlba, count))
        if len(missing) > self.free_chunks():
            assert isinstance(err, OutOfSpaceError)
            return
        assert err is None
        after = VdiskLayout.load(result)  # type: ignore[arg-type]
        for c in range(layout.num_chunks):
            old, new = layout.chunk_extent(c), after.chunk_extent(c)
            if c in chunks:
                assert new is not None  # thin allocation on first write
            if old is not None:
                assert new == old  # already backed chunks never move
        self.take(vid, [e for c in missing if (e := after.chunk_extent(c)) is not None])

    @rule(vid=vdisk_ids)
    def delete(self, vid: VdiskId) -> None:
        result, err = self.run(lambda d: d.vdisk_delete(vid))
        if vid not in self.thin:
            assert isinstance(err, UnknownVdiskError)
            return
        assert err is None
        freed = [Extent.load(e) for e in result]  # type: ignore[attr-defined]
        got = {(e.lun, c) for e in freed for c in self.chunks_of(e)}
        assert got == self.owned(vid)
        for k, c in got:
            self.chunks[k][c] = DIRTY
        del self.thin[vid]

    @precondition(lambda self: self.count(DIRTY) > 0)
    @rule(data=st.data())
    def zero(self, data: st.DataObject) -> None:
        """The shell zeroes a part of some pending extent and reports it."""
        pending = self.ds.pending_zero()
        e = data.draw(st.sampled_from(pending))
        n = e.count // CB
        first = data.draw(st.integers(0, n - 1))
        length = data.draw(st.integers(1, n - first))
        part = Extent(e.lun, PhysicalLba(e.start + first * CB), length * CB)
        _, err = self.run(lambda d: d.mark_zeroed(part))
        assert err is None
        for c in self.chunks_of(part):
            assert self.chunks[part.lun][c] == DIRTY
            self.chunks[part.lun][c] = CLEAN

    @precondition(lambda self: bool(self.chunks))
    @rule(data=st.data())
    def zero_what_is_not_dirty(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.chunks)))
        states = self.chunks[key]
        c = data.draw(st.integers(0, len(states) - 1))
        if states[c] == DIRTY:
            return
        _, err = self.run(lambda d: d.mark_zeroed(Extent(key, PhysicalLba(c * CB), CB)))
        assert isinstance(err, ZeroingError)

    @rule()
    def reload(self) -> None:
        data = json.loads(json.dumps(self.ds.dump()))
        twin = Datastore.load(data)
        assert twin.dump() == self.ds.dump()
        self.twin = twin

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def no_overlap_and_layouts_match_model(self) -> None:
        seen: dict[tuple[LunKey, int], VdiskId] = {}
        for vid in self.ds.vdisks():
            for e in self.ds.vdisk_layout(vid).extents():
                for c in self.chunks_of(e):
                    assert (e.lun, c) not in seen, f"{vid} and {seen[(e.lun, c)]} share a chunk"
                    seen[(e.lun, c)] = vid
        assert set(self.ds.vdisks()) == set(self.thin)
        for vid in self.thin:
            assert {k for k, v in seen.items() if v == vid} == self.owned(vid)

    @invariant()
    def no_leak(self) -> None:
        usage = self.ds.usage()
        total = sum(len(cs) for cs in self.chunks.values())
        assert usage.total_blocks == total * CB
        assert usage.free_blocks == self.free_chunks() * CB
        assert usage.dirty_blocks == self.count(DIRTY) * CB
        assert usage.allocated_blocks == (total - self.free_chunks() - self.count(DIRTY)) * CB
        assert (usage.free_blocks + usage.allocated_blocks + usage.dirty_blocks
                == usage.total_blocks)

    @invariant()
    def free_and_pending_lists_match(self) -> None:
        def chunkset(extents: tuple[Extent, ...]) -> set[tuple[LunKey, int]]:
            return {(e.lun, c) for e in extents for c in self.chunks_of(e)}

        def model(*states: str) -> set[tuple[LunKey, int]]:
            return {
                (k, i) for k, cs in self.chunks.items() for i, s in enumerate(cs) if s in states
            }

        assert chunkset(self.ds.pending_zero()) == model(DIRTY)
        assert chunkset(self.ds.free_extents()) == model(NEVER, CLEAN)


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(
    max_examples=150, stateful_step_count=35, deadline=None
)
