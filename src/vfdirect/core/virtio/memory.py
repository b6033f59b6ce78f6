"""Guest-physical memory as a device (or a driver) sees it: a set of regions.

Rules of this module:

* memory is a list of regions, each a guest-physical address range backed by a buffer
  (the shell hands us ``mmap``-backed memoryviews of the VM's memory file; tests hand us
  bytearrays). Nothing here maps, opens or copies memory behind the caller's back;
* every access is bounds-checked: a byte outside the granted regions raises
  :class:`~vfdirect.core.virtio.errors.GuestMemoryError`, never ``IndexError``;
* :meth:`GuestMemory.view` is zero-copy and therefore confined to one region;
  :meth:`GuestMemory.views`, :meth:`~GuestMemory.read` and :meth:`~GuestMemory.write`
  also cross a boundary between two regions that are contiguous in guest-physical space
  (as a device must, VIRTIO 1.x 2.7.5: a buffer is a guest-physical range), but never a
  hole;
* the typed accessors are little-endian (VIRTIO 1.x 1.4: ``le16``/``le32``/``le64``) and,
  for the indices another process reads concurrently (avail.idx, used.idx, event
  fields), each store is ONE aligned store through ``memoryview.cast`` (CPython moves
  the item with a single ``memcpy`` of the item size, which compiles to one move). We do
  not use ``struct.pack_into``, whose byte-wise path may expose a half-written value.
  The accessors therefore require natural alignment;
* vhost-user hands the back end ring addresses as front-end *user* addresses
  (vhost-user.rst "Memory access"); :meth:`RegionMemory.user_to_gpa` translates them
  with the region table's ``userspace_addr`` (regions without one do not take part).
"""

from __future__ import annotations

import itertools
import sys
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias, runtime_checkable

from vfdirect.core.virtio.errors import GuestMemoryError

__all__ = [
    "BytesLike",
    "GuestMemory",
    "GuestRegion",
    "MemoryRegion",
    "RegionMemory",
]

#: What the memory accepts as data (``collections.abc.Buffer`` needs Python 3.12).
BytesLike: TypeAlias = bytes | bytearray | memoryview

_LITTLE = sys.byteorder == "little"
_FORMATS: dict[int, Literal["H", "I", "Q"]] = {2: "H", 4: "I", 8: "Q"}
_U64_LIMIT = 1 << 64


def _swap(value: int, size: int) -> int:
    """Byte-swap ``value`` of ``size`` bytes (only on a big-endian host)."""
    return int.from_bytes(value.to_bytes(size, "little"), "big")


@runtime_checkable
class GuestMemory(Protocol):
    """Guest-physical memory. Addresses are guest-physical (``gpa``)."""

    def contains(self, gpa: int, length: int) -> bool:
        """Whether ``[gpa, gpa+length)`` is granted (possibly across contiguous regions).
        An empty range is contained when ``gpa`` is inside or at the end of a region."""
        ...

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy, writable view of ``[gpa, gpa+length)``, inside ONE region."""
        ...

    def views(self, gpa: int, length: int) -> tuple[memoryview, ...]:
        """Zero-copy views covering ``[gpa, gpa+length)``, split at region boundaries."""
        ...

    def read(self, gpa: int, length: int) -> bytes:
        """A copy of ``[gpa, gpa+length)``."""
        ...

    def write(self, gpa: int, data: BytesLike) -> None:
        """Copy ``data`` to ``gpa``."""
        ...

    def load_u16(self, gpa: int) -> int: ...
    def load_u32(self, gpa: int) -> int: ...
    def load_u64(self, gpa: int) -> int: ...
    def store_u16(self, gpa: int, value: int) -> None: ...
    def store_u32(self, gpa: int, value: int) -> None: ...
    def store_u64(self, gpa: int, value: int) -> None: ...


@dataclass(frozen=True, slots=True)
class GuestRegion:
    """The description of one region (no buffer): what a queue state or a log names."""

    gpa: int
    size: int
    user_addr: int | None = None

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True, slots=True, eq=False)
class MemoryRegion:
    """One granted region: ``size`` bytes at guest-physical ``gpa``, backed by ``buffer``
    (exactly ``size`` bytes). ``user_addr`` is the front end's virtual address of the
    region's first byte (vhost-user ``userspace_addr``), when known."""

    gpa: int
    buffer: memoryview
    user_addr: int | None = None

    @property
    def size(self) -> int:
        return self.buffer.nbytes

    @property
    def end(self) -> int:
        return self.gpa + self.buffer.nbytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "buffer", _as_bytes_view(self.buffer))

    def describe(self) -> GuestRegion:
        return GuestRegion(self.gpa, self.size, self.user_addr)


def _as_bytes_view(buffer: BytesLike) -> memoryview:
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise GuestMemoryError("a region's buffer must be contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class RegionMemory:
    """:class:`GuestMemory` made of non-overlapping regions (pure: buffers are given)."""

    __slots__ = ("_by_user", "_regions", "_starts", "_user_starts")

    def __init__(self, regions: Iterable[MemoryRegion]) -> None:
        ordered = sorted(regions, key=lambda r: r.gpa)
        for region in ordered:
            if region.size == 0:
                raise GuestMemoryError("empty region", address=region.gpa)
            if region.buffer.readonly:
                raise GuestMemoryError("a region's buffer must be writable", address=region.gpa)
            if region.gpa < 0 or region.end > _U64_LIMIT:
                raise GuestMemoryError("region outside the 64-bit address space",
                                       address=region.gpa, length=region.size)
            if region.user_addr is not None and not (
                    region.user_addr >= 0 and region.user_addr + region.size <= _U64_LIMIT):
                raise GuestMemoryError("region user address outside the 64-bit space",
                                       address=region.user_addr, length=region.size)
        for before, after in itertools.pairwise(ordered):
            if after.gpa < before.end:
                raise GuestMemoryError(
                    f"regions overlap at gpa {after.gpa:#x}", address=after.gpa)
        by_user = sorted((r for r in ordered if r.user_addr is not None),
                         key=lambda r: r.user_addr or 0)
        for before, after in itertools.pairwise(by_user):
            assert before.user_addr is not None and after.user_addr is not None
            if after.user_addr < before.user_addr + before.size:
                raise GuestMemoryError(
                    f"regions overlap at user address {after.user_addr:#x}",
                    address=after.user_addr)
        self._regions: tuple[MemoryRegion, ...] = tuple(ordered)
        self._starts = [r.gpa for r in ordered]
        self._by_user: tuple[MemoryRegion, ...] = tuple(by_user)
        self._user_starts = [r.user_addr or 0 for r in by_user]

    # -- construction helpers -------------------------------------------------------------

    @classmethod
    def from_buffers(cls, regions: Iterable[tuple[int, BytesLike]]) -> RegionMemory:
        """Regions from ``(gpa, buffer)`` pairs (no user addresses)."""
        return cls(MemoryRegion(gpa, _as_bytes_view(buf)) for gpa, buf in regions)

    @classmethod
    def from_table(cls, regions: Iterable[tuple[int, int, BytesLike]]) -> RegionMemory:
        """Regions from ``(gpa, user_addr, buffer)`` triples (a vhost-user memory table,
        once the shell has mapped each region's fd from its ``mmap_offset``)."""
        return cls(MemoryRegion(gpa, _as_bytes_view(buf), user) for gpa, user, buf in regions)

    @property
    def regions(self) -> tuple[GuestRegion, ...]:
        return tuple(r.describe() for r in self._regions)

    # -- lookups --------------------------------------------------------------------------

    def _find(self, gpa: int) -> int:
        """Index of the region containing ``gpa``, or -1."""
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self._regions[i].end:
            return i
        return -1

    def _spans(self, gpa: int, length: int) -> list[tuple[MemoryRegion, int, int]]:
        """(region, offset, count) pieces covering the range, or raise."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad range gpa={gpa:#x} length={length}",
                                   address=gpa, length=length)
        i = self._find(gpa)
        if i < 0:
            if length == 0:
                # An empty range at the very end of a region is granted.
                j = bisect_right(self._starts, gpa) - 1
                if j >= 0 and self._regions[j].end == gpa:
                    region = self._regions[j]
                    return [(region, region.size, 0)]
            raise GuestMemoryError(f"gpa {gpa:#x} is outside guest memory",
                                   address=gpa, length=length)
        pieces: list[tuple[MemoryRegion, int, int]] = []
        cursor, remaining = gpa, length
        while True:
            region = self._regions[i]
            offset = cursor - region.gpa
            count = min(remaining, region.size - offset)
            pieces.append((region, offset, count))
            remaining -= count
            cursor += count
            if remaining == 0:
                return pieces
            i += 1
            if i >= len(self._regions) or self._regions[i].gpa != cursor:
                raise GuestMemoryError(
                    f"range gpa={gpa:#x} length={length} runs past guest memory "
                    f"at {cursor:#x}", address=gpa, length=length)

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._spans(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        pieces = self._spans(gpa, length)
        if len(pieces) != 1:
            raise GuestMemoryError(
                f"range gpa={gpa:#x} length={length} crosses a region boundary; "
                "a zero-copy view cannot span two buffers", address=gpa, length=length)
        region, offset, count = pieces[0]
        return region.buffer[offset:offset + count]

    def views(self, gpa: int, length: int) -> tuple[memoryview, ...]:
        return tuple(region.buffer[offset:offset + count]
                     for region, offset, count in self._spans(gpa, length) if count)

    def read(self, gpa: int, length: int) -> bytes:
        pieces = self._spans(gpa, length)
        if len(pieces) == 1:
            region, offset, count = pieces[0]
            return bytes(region.buffer[offset:offset + count])
        return b"".join(bytes(r.buffer[o:o + c]) for r, o, c in pieces)

    def write(self, gpa: int, data: BytesLike) -> None:
        src = _as_bytes_view(data)
        done = 0
        for region, offset, count in self._spans(gpa, src.nbytes):
            region.buffer[offset:offset + count] = src[done:done + count]
            done += count

    # -- vhost-user user addresses --------------------------------------------------------

    def user_to_gpa(self, user_addr: int, length: int = 1) -> int:
        """Translate a front-end user address (vhost-user SET_VRING_ADDR) to a guest
        address; ``[user_addr, user_addr+length)`` must lie in one region."""
        i = bisect_right(self._user_starts, user_addr) - 1
        if i >= 0:
            region = self._by_user[i]
            base = region.user_addr
            assert base is not None
            if user_addr + length <= base + region.size and length >= 0:
                return region.gpa + (user_addr - base)
        raise GuestMemoryError(
            f"user address {user_addr:#x} (+{length}) is in no region of the memory table",
            address=user_addr, length=length)

    def gpa_to_user(self, gpa: int) -> int:
        """The front-end user address of ``gpa`` (its region must carry one)."""
        i = self._find(gpa)
        if i < 0 or self._regions[i].user_addr is None:
            raise GuestMemoryError(f"gpa {gpa:#x} has no user address", address=gpa)
        region = self._regions[i]
        assert region.user_addr is not None
        return region.user_addr + (gpa - region.gpa)

    # -- typed little-endian accessors ------------------------------------------------------

    def _word(self, gpa: int, size: int) -> memoryview:
        if gpa % size:
            raise GuestMemoryError(f"gpa {gpa:#x} is not {size}-byte aligned",
                                   address=gpa, length=size)
        return self.view(gpa, size).cast(_FORMATS[size])

    def _load(self, gpa: int, size: int) -> int:
        value = int(self._word(gpa, size)[0])
        return value if _LITTLE else _swap(value, size)

    def _store(self, gpa: int, size: int, value: int) -> None:
        if not 0 <= value < (1 << (8 * size)):
            raise GuestMemoryError(f"value {value} does not fit in {size} bytes",
                                   address=gpa, length=size)
        word = self._word(gpa, size)
        word[0] = value if _LITTLE else _swap(value, size)

    def load_u16(self, gpa: int) -> int:
        return self._load(gpa, 2)

    def load_u32(self, gpa: int) -> int:
        return self._load(gpa, 4)

    def load_u64(self, gpa: int) -> int:
        return self._load(gpa, 8)

    def store_u16(self, gpa: int, value: int) -> None:
        self._store(gpa, 2, value)

    def store_u32(self, gpa: int, value: int) -> None:
        self._store(gpa, 4, value)

    def store_u64(self, gpa: int, value: int) -> None:
        self._store(gpa, 8, value)

    def __repr__(self) -> str:
        parts = ", ".join(f"[{r.gpa:#x}+{r.size:#x}]" for r in self._regions)
        return f"RegionMemory({parts})"
