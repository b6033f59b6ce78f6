"""Virtual disk layouts: where each virtual block of a vdisk lives.

Rules of this module:

* a :class:`VdiskLayout` is a value (SYSTEM.md's first mapping, vdisk -> physical
  regions): the vdisk's geometry and an ordered tuple of :class:`Placement` s, each
  mapping a run of virtual blocks one-to-one onto an :class:`~.extent.Extent`;
* space is handed out in whole chunks (``chunk_blocks`` blocks), so every placement
  starts on a chunk boundary and covers whole chunks; the last chunk of a vdisk whose
  capacity is not a multiple of the chunk size is allocated whole, and the blocks past
  the capacity are simply never addressed;
* a thick layout covers every chunk; a thin one may leave chunks unmapped, which read as
  zeros (holes) and are allocated on first write;
* placements are kept canonical: neighbours that are contiguous both virtually and on the
  same LUN are merged, so equal layouts have equal dumps, whatever order their chunks
  were allocated in;
* :meth:`VdiskLayout.translate` turns a virtual range into the ordered list of pieces an
  IO must touch (a request may span several extents and LUNs), or raises
  :class:`~.errors.VirtualRangeError`.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from vfdirect.core.alloc.errors import LayoutError, VirtualRangeError
from vfdirect.core.alloc.extent import Extent
from vfdirect.core.array import BLOCK_SIZES, LunKey, dump_field
from vfdirect.core.ids import PhysicalLba, VdiskId, VirtualLba

LAYOUT_FORMAT = "vfdirect.vdisk-layout"
LAYOUT_VERSION = 1


@dataclass(frozen=True, order=True, slots=True)
class Placement:
    """Virtual blocks ``[vlba, vlba + extent.count)`` live in ``extent``."""

    vlba: VirtualLba
    extent: Extent

    @property
    def vend(self) -> VirtualLba:
        return VirtualLba(self.vlba + self.extent.count)

    def dump(self) -> dict[str, Any]:
        return {"vlba": int(self.vlba), **self.extent.dump()}

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> Placement:
        return cls(VirtualLba(dump_field(data, "vlba", int, LayoutError)), Extent.load(data))


@dataclass(frozen=True, slots=True)
class MappedSegment:
    """Part of a request that lives in ``extent`` (already cut to the request)."""

    vlba: VirtualLba
    extent: Extent

    @property
    def count(self) -> int:
        return self.extent.count


@dataclass(frozen=True, slots=True)
class Hole:
    """Part of a request that falls on unallocated chunks of a thin vdisk: reads as zeros."""

    vlba: VirtualLba
    count: int


Segment = MappedSegment | Hole


def merge_placements(placements: Iterable[Placement]) -> tuple[Placement, ...]:
    """Sort and merge virtually and physically contiguous neighbours."""
    out: list[Placement] = []
    for p in sorted(placements):
        if out:
            last = out[-1]
            if (
                last.vend == p.vlba
                and last.extent.lun == p.extent.lun
                and last.extent.end == p.extent.start
            ):
                out[-1] = Placement(
                    last.vlba,
                    Extent(last.extent.lun, last.extent.start, last.extent.count + p.extent.count),
                )
                continue
        out.append(p)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class VdiskLayout:
    """The physical placement of one virtual disk."""

    vdisk_id: VdiskId
    block_size: int
    capacity_blocks: int
    chunk_blocks: int
    thin: bool
    placements: tuple[Placement, ...] = ()
    _vstarts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _vends: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.vdisk_id, str) or not self.vdisk_id:
            raise LayoutError(f"vdisk id {self.vdisk_id!r} must be a non-empty string")
        if self.block_size not in BLOCK_SIZES:
            raise LayoutError(f"{self.vdisk_id}: block size {self.block_size}")
        if self.chunk_blocks < 1 or self.capacity_blocks < 1:
            raise LayoutError(f"{self.vdisk_id}: capacity and chunk size must be positive")
        merged = merge_placements(self.placements)
        object.__setattr__(self, "placements", merged)
        limit = self.num_chunks * self.chunk_blocks
        prev_end = 0
        for p in merged:
            if p.vlba % self.chunk_blocks or p.extent.count % self.chunk_blocks:
                raise LayoutError(f"{self.vdisk_id}: placement {p} is not whole chunks")
            if p.vlba < prev_end or p.vend > limit:
                raise LayoutError(f"{self.vdisk_id}: placement {p} overlaps or overruns")
            prev_end = p.vend
        by_phys = sorted(p.extent for p in merged)
        for a, b in pairwise(by_phys):
            if a.overlaps(b):
                raise LayoutError(f"{self.vdisk_id}: extents {a} and {b} overlap")
        if not self.thin and self.allocated_blocks != limit:
            raise LayoutError(f"{self.vdisk_id}: a thick layout must map every chunk")
        object.__setattr__(self, "_vstarts", tuple(p.vlba for p in merged))
        object.__setattr__(self, "_vends", tuple(p.vend for p in merged))

    # -- geometry ----------------------------------------------------------------------

    @property
    def num_chunks(self) -> int:
        return -(-self.capacity_blocks // self.chunk_blocks)

    @property
    def allocated_blocks(self) -> int:
        """Blocks of physical space held (whole chunks)."""
        return sum(p.extent.count for p in self.placements)

    @property
    def allocated_chunks(self) -> int:
        return self.allocated_blocks // self.chunk_blocks

    def extents(self) -> tuple[Extent, ...]:
        """The physical regions, in virtual order."""
        return tuple(p.extent for p in self.placements)

    def luns(self) -> tuple[LunKey, ...]:
        """The physical LUNs the layout touches, sorted."""
        return tuple(sorted({p.extent.lun for p in self.placements}))

    def chunk_range(self, vlba: int, count: int) -> range:
        """Indices of the chunks a virtual range touches."""
        self._check_range(vlba, count)
        if count == 0:
            return range(0)
        return range(vlba // self.chunk_blocks, (vlba + count - 1) // self.chunk_blocks + 1)

    def chunk_extent(self, index: int) -> Extent | None:
        """The physical extent of virtual chunk ``index``, or ``None`` for a hole."""
        if not 0 <= index < self.num_chunks:
            raise VirtualRangeError(f"{self.vdisk_id}: chunk {index} of {self.num_chunks}")
        vlba = index * self.chunk_blocks
        i = bisect_right(self._vstarts, vlba) - 1
        if i < 0 or vlba >= self._vends[i]:
            return None
        p = self.placements[i]
        return Extent(
            p.extent.lun, PhysicalLba(p.extent.start + vlba - p.vlba), self.chunk_blocks
        )

    # -- translation -------------------------------------------------------------------

    def translate(self, vlba: int, count: int) -> tuple[Segment, ...]:
        """Pieces of ``[vlba, vlba + count)``, in order: mapped extents and holes."""
        self._check_range(vlba, count)
        vstarts, vends, placements = self._vstarts, self._vends, self.placements
        n = len(vstarts)
        pos, end = vlba, vlba + count
        out: list[Segment] = []
        # i: the first placement that ends after pos
        i = bisect_right(vstarts, pos) - 1
        if i < 0 or vends[i] <= pos:
            i += 1
        while pos < end:
            if i < n and vstarts[i] <= pos:
                p = placements[i]
                stop = min(end, vends[i])
                piece = Extent(p.extent.lun, PhysicalLba(p.extent.start + pos - p.vlba), stop - pos)
                out.append(MappedSegment(VirtualLba(pos), piece))
                i += 1
            else:
                stop = min(end, vstarts[i]) if i < n else end
                out.append(Hole(VirtualLba(pos), stop - pos))
            pos = stop
        return tuple(out)

    def _check_range(self, vlba: int, count: int) -> None:
        if count < 0 or vlba < 0 or vlba + count > self.capacity_blocks:
            raise VirtualRangeError(
                f"{self.vdisk_id}: blocks [{vlba}, {vlba + count}) are outside its "
                f"{self.capacity_blocks} blocks"
            )

    # -- changes (new values) ----------------------------------------------------------

    def with_placements(self, added: Iterable[Placement]) -> VdiskLayout:
        return VdiskLayout(
            self.vdisk_id, self.block_size, self.capacity_blocks, self.chunk_blocks,
            self.thin, self.placements + tuple(added),
        )

    # -- dump/load ---------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        return {
            "format": LAYOUT_FORMAT,
            "version": LAYOUT_VERSION,
            "vdisk_id": self.vdisk_id,
            "block_size": self.block_size,
            "capacity_blocks": self.capacity_blocks,
            "chunk_blocks": self.chunk_blocks,
            "thin": self.thin,
            "placements": [p.dump() for p in self.placements],
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> VdiskLayout:
        err = LayoutError
        if dump_field(data, "format", str, err) != LAYOUT_FORMAT:
            raise err(f"not a {LAYOUT_FORMAT} dump")
        if dump_field(data, "version", int, err) != LAYOUT_VERSION:
            raise err(f"unsupported {LAYOUT_FORMAT} version {data['version']}")
        placements = []
        for item in dump_field(data, "placements", list, err):
            if not isinstance(item, Mapping):
                raise err(f"placement {item!r} is not an object")
            placements.append(Placement.load(item))
        return cls(
            VdiskId(dump_field(data, "vdisk_id", str, err)),
            dump_field(data, "block_size", int, err),
            dump_field(data, "capacity_blocks", int, err),
            dump_field(data, "chunk_blocks", int, err),
            dump_field(data, "thin", bool, err),
            tuple(placements),
        )
