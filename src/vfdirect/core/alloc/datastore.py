"""The datastore allocator: physical LUNs carved into extents for virtual disks.

Rules of this module:

* a datastore is an ordered set of physical LUNs of one block size; space is counted in
  **chunks** of ``chunk_blocks`` blocks (default 1 MiB worth), chunk ``c`` of a LUN
  being its blocks ``[c * chunk_blocks, (c + 1) * chunk_blocks)``; a LUN's tail shorter
  than a chunk is not used;
* every chunk is in exactly one state: **free** (clean: never handed out, or zeroed since
  it was last freed), **allocated** (in exactly one vdisk's layout), or **dirty** (freed,
  still holding its last owner's data);
* **zero-on-reuse, eagerly on free**: :meth:`Datastore.vdisk_delete` turns the vdisk's
  chunks dirty and returns them; a dirty chunk is never handed out. It becomes free only
  when the shell, having zeroed it, calls :meth:`Datastore.mark_zeroed`. Skipping the
  zeroing therefore cannot leak data, it only leaves the space unusable (and listed by
  :meth:`Datastore.pending_zero`, which survives dump/load, so a restarted shell finishes
  the job). A LUN whose content is unknown (a block device) joins with every chunk dirty;
  a new sparse file joins ``fresh``, all chunks free. Hence: every block of a new
  allocation reads as zeros before its new owner writes it, with no zeroing on the data
  path;
* thick vdisks get all their chunks at creation (possibly on several LUNs); thin vdisks
  get a chunk on the first write to it (:meth:`Datastore.vdisk_allocate`);
* choices are deterministic: thick creation takes the first run (LUN order, then LBA)
  that holds the whole vdisk, else the lowest free chunks in order; a thin chunk goes
  right after the physical chunk of the vdisk's previous virtual chunk when that is free
  (sequential writes stay contiguous), else to the lowest free chunk;
* every refused operation (:class:`~.errors.OutOfSpaceError` and friends) leaves the
  state unchanged;
* :meth:`Datastore.dump` is plain data: the LUNs (in order), the dirty extents and the
  vdisk layouts; free space is what remains, so it cannot disagree with them. ``load``
  checks everything it is given, and ``load(dump(d))`` dumps equal and allocates
  exactly as ``d`` would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from vfdirect.core.alloc.chunkset import ChunkSet
from vfdirect.core.alloc.errors import (
    LayoutError,
    LunConfigError,
    OutOfSpaceError,
    UnknownVdiskError,
    VdiskExistsError,
    ZeroingError,
)
from vfdirect.core.alloc.extent import Extent
from vfdirect.core.alloc.layout import Placement, VdiskLayout
from vfdirect.core.array import BLOCK_SIZES, LunKey, PhysicalLun, dump_field
from vfdirect.core.ids import PhysicalLba, VdiskId, VirtualLba

DATASTORE_FORMAT = "vfdirect.datastore"
DATASTORE_VERSION = 1

#: Default allocation unit, in bytes (VMFS-5 also allocates 1 MiB file blocks).
DEFAULT_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class SpaceUsage:
    """Blocks of a datastore by state; ``free + allocated + dirty == total``."""

    total_blocks: int
    free_blocks: int
    allocated_blocks: int
    dirty_blocks: int


class _LunSpace:
    """Chunk states of one member LUN (allocated = neither free nor dirty)."""

    __slots__ = ("dirty", "free", "lun", "num_chunks")

    def __init__(self, lun: PhysicalLun, chunk_blocks: int) -> None:
        self.lun = lun
        self.num_chunks = lun.num_blocks // chunk_blocks
        self.free = ChunkSet()
        self.dirty = ChunkSet()

    @property
    def allocated_chunks(self) -> int:
        return self.num_chunks - len(self.free) - len(self.dirty)


class Datastore:
    """Physical LUNs, the vdisks carved out of them, and their free and dirty space."""

    def __init__(self, name: str, block_size: int, chunk_blocks: int | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise LunConfigError("a datastore needs a non-empty name")
        if block_size not in BLOCK_SIZES:
            raise LunConfigError(f"block size {block_size} is not one of {BLOCK_SIZES}")
        if chunk_blocks is None:
            chunk_blocks = DEFAULT_CHUNK_BYTES // block_size
        if isinstance(chunk_blocks, bool) or chunk_blocks < 1:
            raise LunConfigError(f"chunk size {chunk_blocks} blocks is not positive")
        self._name = name
        self._block_size = block_size
        self._chunk_blocks = chunk_blocks
        self._luns: dict[LunKey, _LunSpace] = {}  # insertion order = allocation order
        self._vdisks: dict[VdiskId, VdiskLayout] = {}

    @property
    def name(self) -> str:
        return self._name

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def chunk_blocks(self) -> int:
        return self._chunk_blocks

    # -- LUNs --------------------------------------------------------------------------

    def luns(self) -> tuple[PhysicalLun, ...]:
        return tuple(s.lun for s in self._luns.values())

    def lun_add(self, lun: PhysicalLun, *, fresh: bool) -> None:
        """Add a member LUN. ``fresh``: every block reads as zeros (a new sparse file);
        otherwise all its chunks start dirty and must be zeroed before use."""
        if lun.key in self._luns:
            raise LunConfigError(f"{lun.key} is already in datastore {self._name}")
        if lun.block_size != self._block_size:
            raise LunConfigError(
                f"{lun.key} has {lun.block_size}-byte blocks; datastore {self._name} "
                f"uses {self._block_size}"
            )
        space = _LunSpace(lun, self._chunk_blocks)
        if space.num_chunks == 0:
            raise LunConfigError(f"{lun.key} is smaller than one chunk")
        (space.free if fresh else space.dirty).add(0, space.num_chunks)
        self._luns[lun.key] = space

    def lun_remove(self, key: LunKey) -> None:
        """Remove a member LUN that holds no vdisk's data (its dirty chunks, if any,
        leave with it: re-adding it needs ``fresh=False``)."""
        space = self._space(key)
        if space.allocated_chunks:
            raise LunConfigError(
                f"{key} still holds {space.allocated_chunks} allocated chunks"
            )
        del self._luns[key]

    # -- space -------------------------------------------------------------------------

    def usage(self) -> SpaceUsage:
        cb = self._chunk_blocks
        total = sum(s.num_chunks for s in self._luns.values())
        free = sum(len(s.free) for s in self._luns.values())
        dirty = sum(len(s.dirty) for s in self._luns.values())
        return SpaceUsage(total * cb, free * cb, (total - free - dirty) * cb, dirty * cb)

    def lun_usage(self, key: LunKey) -> SpaceUsage:
        s = self._space(key)
        cb = self._chunk_blocks
        return SpaceUsage(
            s.num_chunks * cb, len(s.free) * cb, s.allocated_chunks * cb, len(s.dirty) * cb
        )

    def free_extents(self) -> tuple[Extent, ...]:
        return tuple(self._extents(lambda s: s.free))

    def pending_zero(self) -> tuple[Extent, ...]:
        """Dirty space: extents the shell must zero, then pass to :meth:`mark_zeroed`."""
        return tuple(self._extents(lambda s: s.dirty))

    def mark_zeroed(self, extent: Extent) -> None:
        """The shell zeroed ``extent`` (whole chunks, all dirty): it becomes free."""
        space = self._space(extent.lun)
        first, stop = self._chunks_of(extent)
        if not space.dirty.covers(first, stop):
            raise ZeroingError(f"{extent} is not waiting for zeroing")
        space.dirty.remove(first, stop)
        space.free.add(first, stop)

    # -- vdisks ------------------------------------------------------------------------

    def vdisks(self) -> tuple[VdiskId, ...]:
        return tuple(sorted(self._vdisks))

    def vdisk_layout(self, vdisk_id: VdiskId) -> VdiskLayout:
        layout = self._vdisks.get(vdisk_id)
        if layout is None:
            raise UnknownVdiskError(f"no vdisk {vdisk_id!r} in datastore {self._name}")
        return layout

    def vdisk_create(
        self, vdisk_id: VdiskId, capacity_blocks: int, *, thin: bool = False
    ) -> VdiskLayout:
        """A new vdisk; thick: all its chunks now, possibly spanning LUNs."""
        if vdisk_id in self._vdisks:
            raise VdiskExistsError(f"vdisk {vdisk_id!r} already exists in {self._name}")
        if isinstance(capacity_blocks, bool) or capacity_blocks < 1:
            raise LayoutError(f"vdisk {vdisk_id!r}: capacity must be at least one block")
        # A thin, empty layout first: it validates the id and geometry before any
        # space is taken.
        layout = VdiskLayout(vdisk_id, self._block_size, capacity_blocks, self._chunk_blocks, True)
        if not thin:
            placements = self._take_thick(vdisk_id, layout.num_chunks)
            layout = VdiskLayout(
                vdisk_id, self._block_size, capacity_blocks, self._chunk_blocks, False,
                tuple(placements),
            )
        self._vdisks[vdisk_id] = layout
        return layout

    def vdisk_allocate(self, vdisk_id: VdiskId, vlba: int, count: int) -> VdiskLayout:
        """Back every chunk of virtual range ``[vlba, vlba + count)`` (thin first write).
        All or nothing: on :class:`OutOfSpaceError` no chunk is taken. Already backed
        chunks are left alone, so this is idempotent (and a no-op on a thick vdisk)."""
        layout = self.vdisk_layout(vdisk_id)
        missing = [c for c in layout.chunk_range(vlba, count) if layout.chunk_extent(c) is None]
        if not missing:
            return layout
        self._require_free(len(missing), f"vdisk {vdisk_id!r}: {len(missing)} chunks")
        cb = self._chunk_blocks
        added: list[Placement] = []
        for c in missing:
            key, pchunk = self._pick_thin_chunk(layout, added, c)
            self._luns[key].free.remove(pchunk, pchunk + 1)
            added.append(
                Placement(VirtualLba(c * cb), Extent(key, PhysicalLba(pchunk * cb), cb))
            )
        layout = layout.with_placements(added)
        self._vdisks[vdisk_id] = layout
        return layout

    def vdisk_delete(self, vdisk_id: VdiskId) -> tuple[Extent, ...]:
        """Forget a vdisk; its extents become dirty and are returned: the shell zeroes
        them and calls :meth:`mark_zeroed` (until then they are never reused)."""
        layout = self.vdisk_layout(vdisk_id)
        for extent in layout.extents():
            first, stop = self._chunks_of(extent)
            self._luns[extent.lun].dirty.add(first, stop)
        del self._vdisks[vdisk_id]
        return tuple(sorted(layout.extents(), key=self._extent_order))

    # -- dump/load ---------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        return {
            "format": DATASTORE_FORMAT,
            "version": DATASTORE_VERSION,
            "name": self._name,
            "block_size": self._block_size,
            "chunk_blocks": self._chunk_blocks,
            "luns": [s.lun.dump() for s in self._luns.values()],
            "dirty": [e.dump() for e in self.pending_zero()],
            "vdisks": [self._vdisks[v].dump() for v in sorted(self._vdisks)],
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> Datastore:
        err = LayoutError
        if dump_field(data, "format", str, err) != DATASTORE_FORMAT:
            raise err(f"not a {DATASTORE_FORMAT} dump")
        if dump_field(data, "version", int, err) != DATASTORE_VERSION:
            raise err(f"unsupported {DATASTORE_FORMAT} version {data['version']}")
        try:
            ds = cls(
                dump_field(data, "name", str, err),
                dump_field(data, "block_size", int, err),
                dump_field(data, "chunk_blocks", int, err),
            )
            for item in dump_field(data, "luns", list, err):
                if not isinstance(item, Mapping):
                    raise err(f"LUN entry {item!r} is not an object")
                ds.lun_add(PhysicalLun.load(item), fresh=True)
            # Everything starts free; dirty and allocated chunks are taken out of free,
            # which also proves that no chunk is claimed twice.
            for item in dump_field(data, "dirty", list, err):
                if not isinstance(item, Mapping):
                    raise err(f"dirty entry {item!r} is not an object")
                extent = Extent.load(item)
                ds._claim(extent, "dirty")
                first, stop = ds._chunks_of(extent)
                ds._luns[extent.lun].dirty.add(first, stop)
            for item in dump_field(data, "vdisks", list, err):
                if not isinstance(item, Mapping):
                    raise err(f"vdisk entry {item!r} is not an object")
                layout = VdiskLayout.load(item)
                if layout.vdisk_id in ds._vdisks:
                    raise err(f"vdisk {layout.vdisk_id!r} appears twice")
                if (layout.block_size, layout.chunk_blocks) != (ds.block_size, ds.chunk_blocks):
                    raise err(f"vdisk {layout.vdisk_id!r} has another block or chunk size")
                for extent in layout.extents():
                    ds._claim(extent, f"vdisk {layout.vdisk_id!r}")
                ds._vdisks[layout.vdisk_id] = layout
        except ValueError as exc:
            if isinstance(exc, LayoutError):
                raise
            raise err(f"datastore dump: {exc}") from exc
        return ds

    # -- internals ---------------------------------------------------------------------

    def _space(self, key: LunKey) -> _LunSpace:
        space = self._luns.get(key)
        if space is None:
            raise LunConfigError(f"{key} is not in datastore {self._name}")
        return space

    def _chunks_of(self, extent: Extent) -> tuple[int, int]:
        cb = self._chunk_blocks
        space = self._space(extent.lun)
        if extent.start % cb or extent.count % cb:
            raise ZeroingError(f"{extent} is not whole {cb}-block chunks")
        first, stop = extent.start // cb, extent.end // cb
        if stop > space.num_chunks:
            raise LayoutError(f"{extent} runs past the usable chunks of its LUN")
        return first, stop

    def _claim(self, extent: Extent, owner: str) -> None:
        """Take ``extent`` out of free space while loading (it must be free)."""
        first, stop = self._chunks_of(extent)
        free = self._space(extent.lun).free
        if not free.covers(first, stop):
            raise LayoutError(f"{owner}: {extent} is claimed twice")
        free.remove(first, stop)

    def _extent_order(self, extent: Extent) -> tuple[int, int]:
        order = list(self._luns).index(extent.lun) if extent.lun in self._luns else -1
        return order, extent.start

    def _extents(self, which: Callable[[_LunSpace], ChunkSet]) -> Iterator[Extent]:
        cb = self._chunk_blocks
        for key, space in self._luns.items():
            for first, stop in which(space).iter_runs():
                yield Extent(key, PhysicalLba(first * cb), (stop - first) * cb)

    def _require_free(self, chunks: int, what: str) -> None:
        usage = self.usage()
        if chunks * self._chunk_blocks > usage.free_blocks:
            hint = (
                f"; {usage.dirty_blocks} freed blocks still wait for zeroing"
                if usage.dirty_blocks
                else ""
            )
            raise OutOfSpaceError(
                f"datastore {self._name}: {what} need {chunks * self._chunk_blocks} blocks, "
                f"{usage.free_blocks} free{hint}",
                needed_blocks=chunks * self._chunk_blocks,
                free_blocks=usage.free_blocks,
                dirty_blocks=usage.dirty_blocks,
            )

    def _take_thick(self, vdisk_id: VdiskId, chunks: int) -> list[Placement]:
        self._require_free(chunks, f"thick vdisk {vdisk_id!r}")
        cb = self._chunk_blocks
        # First choice: one run holding the whole vdisk.
        for key, space in self._luns.items():
            start = space.free.first_fit(chunks)
            if start is not None:
                space.free.remove(start, start + chunks)
                return [Placement(VirtualLba(0), Extent(key, PhysicalLba(start * cb), chunks * cb))]
        # Otherwise: the lowest free runs, LUN by LUN.
        taken: list[Placement] = []
        vchunk = 0
        for key, space in self._luns.items():
            for first, stop in space.free.runs():
                n = min(stop - first, chunks - vchunk)
                space.free.remove(first, first + n)
                taken.append(
                    Placement(
                        VirtualLba(vchunk * cb), Extent(key, PhysicalLba(first * cb), n * cb)
                    )
                )
                vchunk += n
                if vchunk == chunks:
                    return taken
        raise AssertionError("free space was counted before taking it")  # pragma: no cover

    def _pick_thin_chunk(
        self, layout: VdiskLayout, added: Iterable[Placement], vchunk: int
    ) -> tuple[LunKey, int]:
        cb = self._chunk_blocks
        if vchunk > 0:
            prev = layout.chunk_extent(vchunk - 1)
            if prev is None:
                prev = next(
                    (p.extent for p in added if p.vlba == (vchunk - 1) * cb), None
                )
            if prev is not None:
                after = prev.end // cb
                if after in self._luns[prev.lun].free:
                    return prev.lun, after
        for key, space in self._luns.items():
            first = space.free.first()
            if first is not None:
                return key, first
        raise AssertionError("free space was counted before taking it")  # pragma: no cover
