"""A virtual disk as a block device: the data path from virtual LBAs to physical LUNs.

Rules of this module:

* every physical LUN is reached through a :class:`~vfdirect.core.fabric.GuardedLun` for
  the initiator port given at construction (the VF's virtual port), so the fabric's
  login, zoning and masking checks run on every IO whatever the layout says;
* a request is cut at extent boundaries and may span several extents and LUNs; each
  piece moves straight between the caller's buffers and the LUN (slices of the caller's
  memoryviews, no copies); holes of a thin vdisk read as zeros written into the caller's
  buffers, without touching storage;
* the first write to an unallocated chunk of a thin vdisk asks the allocator for the
  chunks the request touches (all or none), then writes; the allocator hands out only
  clean chunks (zero-on-reuse is done when space is freed, see
  :mod:`vfdirect.core.alloc.datastore`), so nothing is zeroed here. No space:
  :class:`~vfdirect.core.alloc.SpaceAllocationFailed`, and nothing was written;
* the hot path is allocation-light: the layout is flattened once into parallel lists
  (virtual starts, virtual ends, physical deltas, guarded devices); a request inside one
  extent costs one bisect and one call to the guarded LUN, and creates no objects;
* not thread-safe: one IO loop drives one device.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Protocol

from vfdirect.core.alloc.datastore import Datastore
from vfdirect.core.alloc.errors import OutOfSpaceError, SpaceAllocationFailed, VirtualRangeError
from vfdirect.core.alloc.layout import VdiskLayout
from vfdirect.core.array import LunKey
from vfdirect.core.block import BlockDevice
from vfdirect.core.fabric.guard import Authorizer, GuardedLun
from vfdirect.core.ids import VdiskId
from vfdirect.core.wwn import Wwn
from vfdirect.storage._posixio import byte_view

_ZEROS = memoryview(bytes(1 << 20))


class ThinAllocator(Protocol):
    """Backs the chunks of a virtual range (a :class:`~vfdirect.core.alloc.Datastore`)."""

    def vdisk_allocate(self, vdisk_id: VdiskId, vlba: int, count: int) -> VdiskLayout: ...


class _Cursor:
    """Walks the caller's buffers, handing out byte slices of them in order."""

    __slots__ = ("_idx", "_off", "_views")

    def __init__(self, bufs: Sequence[memoryview]) -> None:
        self._views = [byte_view(b) for b in bufs]
        self._idx = 0
        self._off = 0

    def take(self, nbytes: int) -> list[memoryview]:
        out: list[memoryview] = []
        views = self._views
        while nbytes:
            view = views[self._idx]
            off = self._off
            avail = view.nbytes - off
            if avail <= nbytes:
                out.append(view[off:] if off else view)
                self._idx += 1
                self._off = 0
                nbytes -= avail
            else:
                out.append(view[off : off + nbytes])
                self._off = off + nbytes
                nbytes = 0
        return out


def _fill_zeros(pieces: Sequence[memoryview]) -> None:
    for piece in pieces:
        pos, n = 0, piece.nbytes
        while pos < n:
            step = min(n - pos, _ZEROS.nbytes)
            piece[pos : pos + step] = _ZEROS[:step]
            pos += step


class VdiskBlockDevice:
    """A :class:`BlockDevice` of ``layout.capacity_blocks`` virtual blocks."""

    def __init__(
        self,
        layout: VdiskLayout,
        *,
        luns: Callable[[LunKey], BlockDevice],
        fabric: Authorizer,
        initiator: Wwn,
        allocator: ThinAllocator | None = None,
    ) -> None:
        self._luns = luns
        self._fabric = fabric
        self._initiator = initiator
        self._allocator = allocator
        self._guards: dict[LunKey, GuardedLun] = {}
        self._block_size = layout.block_size
        self._num_blocks = layout.capacity_blocks
        self._vdisk_id = layout.vdisk_id
        self._layout = layout
        self._vstarts: list[int] = []
        self._vends: list[int] = []
        self._deltas: list[int] = []
        self._devs: list[GuardedLun] = []
        self._lun_devs: tuple[GuardedLun, ...] = ()
        self._complete = True
        self.update_layout(layout)

    # -- configuration -----------------------------------------------------------------

    @property
    def layout(self) -> VdiskLayout:
        return self._layout

    @property
    def initiator(self) -> Wwn:
        return self._initiator

    def update_layout(self, layout: VdiskLayout) -> None:
        """Take a new layout of the same vdisk (after an allocation elsewhere, say)."""
        if (layout.vdisk_id, layout.block_size, layout.capacity_blocks) != (
            self._vdisk_id, self._block_size, self._num_blocks,
        ):
            raise ValueError(f"layout of {layout.vdisk_id!r} does not fit {self._vdisk_id!r}")
        placements = layout.placements
        devs = [self._guard(p.extent.lun) for p in placements]
        self._vstarts = [p.vlba for p in placements]
        self._vends = [p.vend for p in placements]
        self._deltas = [p.extent.start - p.vlba for p in placements]
        self._devs = devs
        self._lun_devs = tuple(self._guards[k] for k in layout.luns())
        self._complete = layout.allocated_blocks >= layout.num_chunks * layout.chunk_blocks
        self._layout = layout

    # -- BlockDevice -------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    def read_blocks(self, lba: int, bufs: Sequence[memoryview]) -> None:
        n = self._count(lba, bufs)
        if n == 0:
            return
        i = bisect_right(self._vstarts, lba) - 1
        if i >= 0 and lba + n <= self._vends[i]:
            self._devs[i].read_blocks(lba + self._deltas[i], bufs)
            return
        self._split(lba, n, bufs, write=False, fua=False)

    def write_blocks(self, lba: int, bufs: Sequence[memoryview], *, fua: bool = False) -> None:
        n = self._count(lba, bufs)
        if n == 0:
            return
        i = bisect_right(self._vstarts, lba) - 1
        if i >= 0 and lba + n <= self._vends[i]:
            self._devs[i].write_blocks(lba + self._deltas[i], bufs, fua=fua)
            return
        if not self._complete and self._has_hole(lba, n):
            self._allocate(lba, n)
        self._split(lba, n, bufs, write=True, fua=fua)

    def flush(self) -> None:
        for dev in self._lun_devs:
            dev.flush()

    # -- internals ---------------------------------------------------------------------

    def _count(self, lba: int, bufs: Sequence[memoryview]) -> int:
        nbytes = bufs[0].nbytes if len(bufs) == 1 else sum(b.nbytes for b in bufs)
        n, rest = divmod(nbytes, self._block_size)
        if rest:
            raise ValueError(
                f"vdisk {self._vdisk_id}: {nbytes} bytes is not whole "
                f"{self._block_size}-byte blocks"
            )
        if lba < 0 or lba + n > self._num_blocks:
            raise VirtualRangeError(
                f"vdisk {self._vdisk_id}: blocks [{lba}, {lba + n}) outside its "
                f"{self._num_blocks} blocks"
            )
        return n

    def _guard(self, key: LunKey) -> GuardedLun:
        guard = self._guards.get(key)
        if guard is None:
            backend = self._luns(key)
            if backend.block_size != self._block_size:
                raise ValueError(
                    f"{key} has {backend.block_size}-byte blocks, vdisk {self._vdisk_id} "
                    f"{self._block_size}"
                )
            guard = self._guards[key] = GuardedLun(self._fabric, self._initiator, key, backend)
        return guard

    def _first_after(self, pos: int) -> int:
        """Index of the first placement that ends after ``pos``."""
        i = bisect_right(self._vstarts, pos) - 1
        if i < 0 or self._vends[i] <= pos:
            i += 1
        return i

    def _has_hole(self, lba: int, n: int) -> bool:
        vstarts, vends = self._vstarts, self._vends
        pos, end = lba, lba + n
        i = self._first_after(pos)
        while pos < end:
            if i >= len(vstarts) or vstarts[i] > pos:
                return True
            pos = vends[i]
            i += 1
        return False

    def _allocate(self, lba: int, n: int) -> None:
        if self._allocator is None:
            raise SpaceAllocationFailed(
                f"vdisk {self._vdisk_id}: write to an unallocated chunk and no allocator"
            )
        try:
            layout = self._allocator.vdisk_allocate(self._vdisk_id, lba, n)
        except OutOfSpaceError as exc:
            raise SpaceAllocationFailed(f"vdisk {self._vdisk_id}: {exc}") from exc
        self.update_layout(layout)

    def _split(
        self, lba: int, n: int, bufs: Sequence[memoryview], *, write: bool, fua: bool
    ) -> None:
        bs = self._block_size
        vstarts, vends, deltas, devs = self._vstarts, self._vends, self._deltas, self._devs
        count = len(vstarts)
        cursor = _Cursor(bufs)
        pos, end = lba, lba + n
        i = self._first_after(pos)
        while pos < end:
            if i < count and vstarts[i] <= pos:
                stop = min(end, vends[i])
                pieces = cursor.take((stop - pos) * bs)
                if write:
                    devs[i].write_blocks(pos + deltas[i], pieces, fua=fua)
                else:
                    devs[i].read_blocks(pos + deltas[i], pieces)
                i += 1
            else:
                stop = min(end, vstarts[i]) if i < count else end
                if write:  # pragma: no cover (holes are allocated before writing)
                    raise AssertionError("write reached a hole after allocation")
                _fill_zeros(cursor.take((stop - pos) * bs))
            pos = stop


def open_vdisk(
    datastore: Datastore,
    vdisk_id: VdiskId,
    *,
    luns: Callable[[LunKey], BlockDevice],
    fabric: Authorizer,
    initiator: Wwn,
) -> VdiskBlockDevice:
    """The vdisk of ``datastore`` as seen by ``initiator``, thin chunks taken from it."""
    return VdiskBlockDevice(
        datastore.vdisk_layout(vdisk_id),
        luns=luns,
        fabric=fabric,
        initiator=initiator,
        allocator=datastore,
    )
