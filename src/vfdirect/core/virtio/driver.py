"""The driver side of a split virtqueue (what a guest OS's virtio driver does), pure,
with ALL of its state in guest memory so that a killed guest process resumes exactly.

Rules of this module:

* the driver lays out the descriptor table, available ring and used ring (VIRTIO 1.x
  2.7) plus a **driver state block** in guest memory (layout below). A new
  :class:`SplitQueueDriver` attached to the same memory (:meth:`~SplitQueueDriver.attach`)
  continues where the old one stopped, without losing or repeating a request;
* descriptors are allocated from a free list linked through the descriptors' own
  ``next`` fields (as Linux does): a chain is a prefix of the free list, so allocating
  writes only ``addr``/``len``/``flags`` and the list links stay intact until the chain
  is published;
* every operation has ONE commit point, a single aligned store: ``avail.idx`` for
  :meth:`~SplitQueueDriver.publish` (2.7.13: ring entries first, then the index), and
  the 64-bit *state word* for :meth:`~SplitQueueDriver.pop_used`. Everything written
  before the commit point is invisible to the device and to recovery; everything after
  it is redone by :meth:`~SplitQueueDriver.attach` (roll-forward from ``avail.idx``);
* notifications: the driver writes ``used_event`` (or ``VIRTQ_AVAIL_F_NO_INTERRUPT``) to
  ask for interrupts and honours ``avail_event`` / ``VIRTQ_USED_F_NO_NOTIFY`` in
  :meth:`~SplitQueueDriver.publish`'s "kick needed" answer (2.7.7, 2.7.10, with the
  16-bit wrap of :func:`~vfdirect.core.virtio.layout.need_event`);
* the device is the peer: a used element for a head not in flight or a used index that
  jumps too far raises :class:`~vfdirect.core.virtio.errors.DeviceProtocolError`.

Driver state block (``ctl_addr``, 8-byte aligned, little-endian)::

    +0x00 u32 magic 0x51444656 ("VFDQ")     +0x04 u16 layout version (1)
    +0x06 u16 flags: bit0 EVENT_IDX, bit1 INDIRECT
    +0x08 u32 queue size                    +0x0C u32 max_indirect (entries per table)
    +0x10 u64 desc_addr   +0x18 u64 avail_addr   +0x20 u64 used_addr
    +0x28 u64 indirect_addr (0 when no indirect tables)
    +0x30 u64 STATE WORD = free_head | num_free << 16 | avail_idx << 32 | last_used << 48
    +0x38 u64 reserved (0)
    +0x40 u64 token[size]: the caller's 64-bit token of the chain whose head is i

The state word's ``avail_idx`` is the last *committed* available index, ``last_used``
the next used-ring slot to reap. The interrupt on/off choice is kept in ``avail.flags``
(the device ignores that bit under EVENT_IDX, 2.7.7.2, so it can always hold it).
Indirect tables have a fixed slot per head, ``indirect_addr + head * max_indirect * 16``:
a head owns its slot while in flight, so no allocator state is needed. In-flight heads
are not stored: :meth:`~SplitQueueDriver.attach` rebuilds them from the free list.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vfdirect.core.virtio.errors import (
    DeviceProtocolError,
    DriverStateError,
    GuestMemoryError,
    QueueFullError,
    VirtqueueError,
    VirtqueueUsageError,
)
from vfdirect.core.virtio.layout import (
    DESC_SIZE,
    AvailFlag,
    DescFlag,
    UsedFlag,
    VirtqueueConfig,
    align_up,
    avail_ring_bytes,
    desc_table_bytes,
    need_event,
    used_ring_bytes,
)
from vfdirect.core.virtio.memory import GuestMemory

__all__ = [
    "CTL_HEADER_BYTES",
    "CTL_MAGIC",
    "CTL_VERSION",
    "DriverLayout",
    "SplitQueueDriver",
    "UsedElement",
]

CTL_MAGIC = 0x51444656  # b"VFDQ" in little-endian order
CTL_VERSION = 1
CTL_HEADER_BYTES = 0x40
_CTL_FLAG_EVENT_IDX = 1
_CTL_FLAG_INDIRECT = 2
_STATE_OFFSET = 0x30

_LITTLE = sys.byteorder == "little"
_HEADER = struct.Struct("<IHHII4Q")  # magic .. indirect_addr (0x00-0x2F)
_DESC_HEAD = struct.Struct("<QIH")  # addr, len, flags (next untouched)
_DESC_FULL = struct.Struct("<QIHH")
_NEXT, _WRITE, _INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)


def _le(value: int, size: int) -> int:
    if _LITTLE:
        return value
    return int.from_bytes(value.to_bytes(size, "little"), "big")


def _no_barrier() -> None:
    return None


@dataclass(frozen=True, slots=True)
class DriverLayout:
    """Where one driver-managed virtqueue lives in guest memory."""

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    ctl_addr: int
    indirect_addr: int = 0
    max_indirect: int = 0
    event_idx: bool = True

    def __post_init__(self) -> None:
        try:
            self.queue_config()
        except VirtqueueError as exc:
            raise VirtqueueUsageError(str(exc)) from exc
        if self.ctl_addr % 8:
            raise VirtqueueUsageError("the driver state block must be 8-byte aligned")
        if not 0 <= self.max_indirect <= self.size:
            raise VirtqueueUsageError(f"max_indirect {self.max_indirect} not in 0..size")
        if self.max_indirect and (self.indirect_addr % 16 or self.indirect_addr <= 0):
            raise VirtqueueUsageError("indirect tables need a 16-byte aligned area")

    @classmethod
    def plan(cls, base: int, size: int, *, event_idx: bool = True, max_indirect: int = 0,
             used_align: int = 4) -> DriverLayout:
        """Lay the areas out one after the other from ``base``."""
        desc = align_up(base, 16)
        avail = desc + desc_table_bytes(size)
        used = align_up(avail + avail_ring_bytes(size, True), max(4, used_align))
        ctl = align_up(used + used_ring_bytes(size, True), 64)
        indirect = align_up(ctl + CTL_HEADER_BYTES + 8 * size, 64) if max_indirect else 0
        return cls(size, desc, avail, used, ctl, indirect, max_indirect, event_idx)

    @property
    def ctl_bytes(self) -> int:
        return CTL_HEADER_BYTES + 8 * self.size

    @property
    def indirect_bytes(self) -> int:
        return self.size * self.max_indirect * DESC_SIZE

    @property
    def end(self) -> int:
        """One past the highest byte used by the layout."""
        ends = [self.desc_addr + desc_table_bytes(self.size),
                self.avail_addr + avail_ring_bytes(self.size, True),
                self.used_addr + used_ring_bytes(self.size, True),
                self.ctl_addr + self.ctl_bytes]
        if self.max_indirect:
            ends.append(self.indirect_addr + self.indirect_bytes)
        return max(ends)

    def areas(self) -> list[tuple[str, int, int]]:
        found = [("descriptor table", self.desc_addr, desc_table_bytes(self.size)),
                 ("available ring", self.avail_addr, avail_ring_bytes(self.size, True)),
                 ("used ring", self.used_addr, used_ring_bytes(self.size, True)),
                 ("driver state", self.ctl_addr, self.ctl_bytes)]
        if self.max_indirect:
            found.append(("indirect tables", self.indirect_addr, self.indirect_bytes))
        return found

    def queue_config(self) -> VirtqueueConfig:
        """What the device must be told (vhost-user SET_VRING_NUM/ADDR, features)."""
        return VirtqueueConfig(self.size, self.desc_addr, self.avail_addr, self.used_addr,
                               event_idx=self.event_idx, indirect=self.max_indirect > 0)

    def indirect_slot(self, head: int) -> int:
        return self.indirect_addr + head * self.max_indirect * DESC_SIZE


@dataclass(frozen=True, slots=True)
class UsedElement:
    """A completed chain: its head, the caller's token, and the bytes the device wrote."""

    head: int
    token: int
    written: int


class SplitQueueDriver:
    """Driver side of one split virtqueue whose state lives in guest memory."""

    def __init__(self, memory: GuestMemory, layout: DriverLayout,
                 barrier: Callable[[], None] | None, *, _token: object = None) -> None:
        if _token is not _CONSTRUCT:
            raise VirtqueueUsageError("use SplitQueueDriver.create() or .attach()")
        for name, addr, length in layout.areas():
            if not memory.contains(addr, length):
                raise DriverStateError(f"{name} [{addr:#x}+{length:#x}] is not in memory")
        self._memory = memory
        self._layout = layout
        self._size = layout.size
        self._barrier = barrier or _no_barrier
        try:
            self._desc = memory.view(layout.desc_addr, desc_table_bytes(layout.size))
            self._avail16 = memory.view(layout.avail_addr,
                                        avail_ring_bytes(layout.size, True)).cast("H")
            used = memory.view(layout.used_addr, used_ring_bytes(layout.size, True))
            self._ctl = memory.view(layout.ctl_addr, layout.ctl_bytes)
        except GuestMemoryError as exc:
            raise DriverStateError(f"a queue area crosses a region boundary: {exc}") from exc
        self._used16 = used.cast("H")
        self._used32 = used[:4 + 8 * layout.size].cast("I")
        self._ctl64 = self._ctl.cast("Q")
        self._in_flight: dict[int, int] = {}
        self._staged: list[tuple[int, int]] = []
        #: Called before every store to shared memory; tests replace it to simulate the
        #: process being killed between two stores (crash-consistency tests).
        self.fault_hook: Callable[[], None] = _no_barrier
        free_head, num_free, avail_idx, _ = self._load_state()
        self._stage_free_head = free_head
        self._stage_num_free = num_free
        self._stage_avail = avail_idx

    # -- creation and attachment ----------------------------------------------------------

    @classmethod
    def create(cls, memory: GuestMemory, layout: DriverLayout, *, start_idx: int = 0,
               barrier: Callable[[], None] | None = None) -> SplitQueueDriver:
        """Initialise a fresh queue in guest memory (the device must not be running on
        it). The magic is written last, so a crash during creation leaves no block.
        ``start_idx`` starts avail.idx and used.idx there instead of 0 (the indices are
        free-running; tests use it to cross the 16-bit wrap quickly)."""
        if not 0 <= start_idx <= 0xFFFF:
            raise VirtqueueUsageError(f"start_idx {start_idx} is not 16-bit")
        for name, addr, length in layout.areas():
            if not memory.contains(addr, length):
                raise VirtqueueUsageError(f"{name} [{addr:#x}+{length:#x}] is not in memory")
        areas = layout.areas()
        for i, (name_a, addr_a, len_a) in enumerate(areas):
            for name_b, addr_b, len_b in areas[i + 1:]:
                if addr_a < addr_b + len_b and addr_b < addr_a + len_a:
                    raise VirtqueueUsageError(f"{name_a} overlaps {name_b}")
        size = layout.size
        memory.store_u32(layout.ctl_addr, 0)  # no magic while we build
        for _, addr, length in areas[:4]:
            memory.write(addr, bytes(length))
        table = bytearray(desc_table_bytes(size))
        for i in range(size):
            _DESC_FULL.pack_into(table, DESC_SIZE * i, 0, 0, 0, (i + 1) % size)
        memory.write(layout.desc_addr, table)
        flags = (_CTL_FLAG_EVENT_IDX if layout.event_idx else 0) | (
            _CTL_FLAG_INDIRECT if layout.max_indirect else 0)
        header = bytearray(CTL_HEADER_BYTES)
        _HEADER.pack_into(header, 0, 0, CTL_VERSION, flags, size, layout.max_indirect,
                          layout.desc_addr, layout.avail_addr, layout.used_addr,
                          layout.indirect_addr)
        struct.pack_into("<Q", header, _STATE_OFFSET,
                         _pack_state(0, size, start_idx, start_idx))
        memory.write(layout.ctl_addr, header)
        memory.store_u16(layout.avail_addr + 2, start_idx)
        memory.store_u16(layout.used_addr + 2, start_idx)
        if layout.event_idx:
            memory.store_u16(layout.avail_addr + 4 + 2 * size, start_idx)  # used_event
            memory.store_u16(layout.used_addr + 4 + 8 * size, start_idx)  # avail_event
        memory.store_u32(layout.ctl_addr, CTL_MAGIC)
        return cls(memory, layout, barrier, _token=_CONSTRUCT)

    @classmethod
    def attach(cls, memory: GuestMemory, ctl_addr: int, *,
               barrier: Callable[[], None] | None = None) -> SplitQueueDriver:
        """Attach to a queue created earlier (by this or a killed process): read the state
        block, roll an interrupted publish forward, and rebuild the in-flight heads."""
        try:
            raw = memory.read(ctl_addr, CTL_HEADER_BYTES)
        except GuestMemoryError as exc:
            raise DriverStateError(f"no driver state block at {ctl_addr:#x}") from exc
        magic, version, flags, size, max_ind, desc, avail, used, ind = _HEADER.unpack_from(raw)
        if magic != CTL_MAGIC:
            raise DriverStateError(f"no driver state block at {ctl_addr:#x} "
                                   f"(magic {magic:#x})")
        if version != CTL_VERSION:
            raise DriverStateError(f"driver state block version {version} is not "
                                   f"{CTL_VERSION}")
        try:
            layout = DriverLayout(size, desc, avail, used, ctl_addr, ind, max_ind,
                                  bool(flags & _CTL_FLAG_EVENT_IDX))
        except VirtqueueUsageError as exc:
            raise DriverStateError(f"driver state block is inconsistent: {exc}") from exc
        if bool(flags & _CTL_FLAG_INDIRECT) != (max_ind > 0):
            raise DriverStateError("driver state block flags disagree with max_indirect")
        driver = cls(memory, layout, barrier, _token=_CONSTRUCT)
        driver._recover()
        return driver

    # -- state word -----------------------------------------------------------------------

    def _load_state(self) -> tuple[int, int, int, int]:
        word = _le(self._ctl64[_STATE_OFFSET // 8], 8)
        return word & 0xFFFF, word >> 16 & 0xFFFF, word >> 32 & 0xFFFF, word >> 48

    def _commit_state(self, free_head: int, num_free: int, avail_idx: int,
                      last_used: int) -> None:
        # THE commit point of pop_used: one aligned 64-bit store.
        self.fault_hook()
        self._ctl64[_STATE_OFFSET // 8] = _le(
            _pack_state(free_head, num_free, avail_idx, last_used), 8)

    def _desc_flags_next(self, index: int) -> tuple[int, int]:
        base = DESC_SIZE * index
        raw = bytes(self._desc[base + 12:base + 16])
        return raw[0] | raw[1] << 8, raw[2] | raw[3] << 8

    def _chain_extent(self, head: int) -> tuple[int, int]:
        """(descriptor count, last index) of the direct chain starting at ``head``."""
        count, index = 1, head
        flags, nxt = self._desc_flags_next(index)
        while flags & _NEXT and not flags & _INDIRECT:
            if count >= self._size or nxt >= self._size:
                raise DriverStateError(f"chain from head {head} is corrupt")
            index = nxt
            count += 1
            flags, nxt = self._desc_flags_next(index)
        return count, index

    def _recover(self) -> None:
        size = self._size
        free_head, num_free, avail_c, last_used = self._load_state()
        if num_free > size or (num_free and free_head >= size):
            raise DriverStateError(f"state word is corrupt (free_head {free_head}, "
                                   f"num_free {num_free})")
        avail_mem = _le(self._avail16[1], 2)
        delta = (avail_mem - avail_c) & 0xFFFF
        if delta > size:
            raise DriverStateError(f"avail.idx {avail_mem} is {delta} ahead of the committed "
                                   f"index {avail_c}")
        # Roll forward a publish whose avail.idx store happened but whose state word
        # store did not: the published chains are the next prefixes of the free list.
        for j in range(delta):
            head = _le(self._avail16[2 + ((avail_c + j) & (size - 1))], 2)
            if num_free == 0 or head != free_head:
                raise DriverStateError(f"published head {head} is not the free-list head "
                                       f"{free_head}")
            count, last = self._chain_extent(head)
            if count > num_free:
                raise DriverStateError(f"published chain at {head} exceeds the free count")
            num_free -= count
            free_head = self._desc_flags_next(last)[1] if num_free else 0
        if delta:
            self._commit_state(free_head, num_free, avail_mem, last_used)
        # Rebuild the in-flight heads: descriptors off the free list form the chains.
        free = bytearray(size)
        index = free_head
        for _ in range(num_free):
            if index >= size or free[index]:
                raise DriverStateError("free list is corrupt")
            free[index] = 1
            index = self._desc_flags_next(index)[1]
        linked = bytearray(size)
        for i in range(size):
            if not free[i]:
                flags, nxt = self._desc_flags_next(i)
                if flags & _NEXT and not flags & _INDIRECT:
                    if nxt >= size or free[nxt]:
                        raise DriverStateError(f"in-flight descriptor {i} links to {nxt}")
                    linked[nxt] = 1
        total = 0
        for i in range(size):
            if not free[i] and not linked[i]:
                total += self._chain_extent(i)[0]
                self._in_flight[i] = _le(self._ctl64[CTL_HEADER_BYTES // 8 + i], 8)
        if total != size - num_free:
            raise DriverStateError(f"in-flight chains hold {total} descriptors, the state "
                                   f"word says {size - num_free}")
        self._stage_free_head = free_head
        self._stage_num_free = num_free
        self._stage_avail = avail_mem

    # -- observers ------------------------------------------------------------------------

    @property
    def layout(self) -> DriverLayout:
        return self._layout

    @property
    def size(self) -> int:
        return self._size

    @property
    def num_free(self) -> int:
        """Free descriptors, counting staged (not yet published) chains as taken."""
        return self._stage_num_free

    @property
    def in_flight(self) -> dict[int, int]:
        """Published heads not yet reaped -> their tokens (in publication order for this
        object; in head order right after :meth:`attach`)."""
        return dict(self._in_flight)

    @property
    def avail_idx(self) -> int:
        return self._load_state()[2]

    @property
    def last_used_idx(self) -> int:
        return self._load_state()[3]

    def pending_used(self) -> int:
        """Used elements the device published that we have not reaped."""
        return (_le(self._used16[1], 2) - self.last_used_idx) & 0xFFFF

    # -- submitting -----------------------------------------------------------------------

    def add(self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]],
            token: int, *, indirect: bool | None = None) -> int:
        """Stage a chain: device-readable buffers then device-writable ones, each
        ``(gpa, length)``. Nothing is visible to the device before :meth:`publish`.
        ``indirect=None`` uses an indirect table whenever there is more than one buffer
        and the layout has tables. Returns the head index."""
        buffers = [(a, n, 0) for a, n in readable] + [(a, n, _WRITE) for a, n in writable]
        total = len(buffers)
        if total == 0:
            raise VirtqueueUsageError("a chain needs at least one buffer")
        if not 0 <= token < 1 << 64:
            raise VirtqueueUsageError(f"token {token} is not a 64-bit value")
        for addr, length, _ in buffers:
            if not 0 < length <= 0xFFFFFFFF or not self._memory.contains(addr, length):
                raise VirtqueueUsageError(f"buffer [{addr:#x}+{length:#x}] is not in memory")
        max_ind = self._layout.max_indirect
        use_indirect = (max_ind > 0 and total > 1) if indirect is None else indirect
        if use_indirect and total > max_ind:
            if indirect:
                raise VirtqueueUsageError(f"{total} buffers exceed max_indirect {max_ind}")
            use_indirect = False
        need = 1 if use_indirect else total
        if need > self._size:
            raise VirtqueueUsageError(f"{total} buffers exceed the queue size {self._size}")
        if need > self._stage_num_free:
            raise QueueFullError(f"{need} descriptors needed, {self._stage_num_free} free")
        head = self._stage_free_head
        if use_indirect:
            table_addr = self._layout.indirect_slot(head)
            table = bytearray(DESC_SIZE * total)
            for i, (addr, length, flags) in enumerate(buffers):
                more = _NEXT if i < total - 1 else 0
                _DESC_FULL.pack_into(table, DESC_SIZE * i, addr, length, flags | more, i + 1)
            self.fault_hook()
            self._memory.write(table_addr, table)
            self.fault_hook()
            _DESC_HEAD.pack_into(self._desc, DESC_SIZE * head, table_addr, len(table),
                                 _INDIRECT)
            last = head
        else:
            index = last = head
            for i, (addr, length, flags) in enumerate(buffers):
                last = index
                more = _NEXT if i < total - 1 else 0
                # ``next`` is left alone: it already links to the next free descriptor.
                self.fault_hook()
                _DESC_HEAD.pack_into(self._desc, DESC_SIZE * index, addr, length,
                                     flags | more)
                index = self._desc_flags_next(index)[1]
        self._stage_num_free -= need
        self._stage_free_head = self._desc_flags_next(last)[1] if self._stage_num_free else 0
        self.fault_hook()
        self._ctl64[CTL_HEADER_BYTES // 8 + head] = _le(token, 8)
        slot = self._stage_avail & (self._size - 1)
        self.fault_hook()
        self._avail16[2 + slot] = _le(head, 2)
        self._stage_avail = (self._stage_avail + 1) & 0xFFFF
        self._staged.append((head, token))
        return head

    def publish(self) -> bool:
        """Make every staged chain available with ONE store of ``avail.idx`` (the commit
        point), then record it in the state word. Returns whether the device wants a
        kick (available buffer notification, 2.7.10)."""
        if not self._staged:
            return False
        _, _, old, last_used = self._load_state()
        new = self._stage_avail
        self.fault_hook()
        self._avail16[1] = _le(new, 2)  # commit: the device may consume from here on
        self._commit_state(self._stage_free_head, self._stage_num_free, new, last_used)
        for head, token in self._staged:
            self._in_flight[head] = token
        self._staged.clear()
        self._barrier()  # avail.idx store before the avail_event / flags load
        return self.kick_needed(old, new)

    def submit(self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]],
               token: int, *, indirect: bool | None = None) -> tuple[int, bool]:
        """:meth:`add` then :meth:`publish`: ``(head, kick_needed)``."""
        head = self.add(readable, writable, token, indirect=indirect)
        return head, self.publish()

    def kick_needed(self, old_idx: int, new_idx: int) -> bool:
        """Whether moving avail.idx from ``old_idx`` to ``new_idx`` needs a kick."""
        if self._layout.event_idx:
            avail_event = _le(self._used16[2 + 4 * self._size], 2)
            return need_event(avail_event, new_idx, old_idx)
        return not _le(self._used16[0], 2) & UsedFlag.NO_NOTIFY

    # -- reaping --------------------------------------------------------------------------

    def _next_used(self) -> tuple[int, int] | None:
        _, _, _, last_used = self._load_state()
        used_idx = _le(self._used16[1], 2)
        outstanding = (used_idx - last_used) & 0xFFFF
        if outstanding == 0:
            return None
        if outstanding > len(self._in_flight):
            raise DeviceProtocolError(f"used.idx {used_idx} is {outstanding} ahead of "
                                      f"{last_used} with {len(self._in_flight)} in flight")
        slot = last_used & (self._size - 1)
        head = _le(self._used32[1 + 2 * slot], 4)
        written = _le(self._used32[2 + 2 * slot], 4)
        if head not in self._in_flight:
            raise DeviceProtocolError(f"device used head {head}, which is not in flight")
        return head, written

    def peek_used(self) -> UsedElement | None:
        """The next completion without consuming it (to record it in a journal first)."""
        found = self._next_used()
        if found is None:
            return None
        head, written = found
        return UsedElement(head, self._in_flight[head], written)

    def pop_used(self) -> UsedElement | None:
        """Reap the next completion and free its descriptors; the state word store is the
        commit point (a crash before it reaps the same element again)."""
        if self._staged:
            raise VirtqueueUsageError("publish() staged chains before reaping")
        found = self._next_used()
        if found is None:
            return None
        head, written = found
        free_head, num_free, avail_idx, last_used = self._load_state()
        count, last = self._chain_extent(head)
        # Link the chain in front of the free list (idempotent if redone after a crash).
        self.fault_hook()
        struct.pack_into("<H", self._desc, DESC_SIZE * last + 14, free_head)
        last_used = (last_used + 1) & 0xFFFF
        self._commit_state(head, num_free + count, avail_idx, last_used)
        token = self._in_flight.pop(head)
        self._stage_free_head = head
        self._stage_num_free = num_free + count
        if self._layout.event_idx and self.interrupts_enabled:
            # 2.7.10: interrupt us when the device uses the next entry.
            self.fault_hook()
            self._avail16[2 + self._size] = _le(last_used, 2)
        return UsedElement(head, token, written)

    # -- interrupt suppression ------------------------------------------------------------

    @property
    def interrupts_enabled(self) -> bool:
        return not _le(self._avail16[0], 2) & AvailFlag.NO_INTERRUPT

    def enable_interrupts(self) -> bool:
        """Ask for used buffer notifications; returns True when completions are already
        waiting (reap them instead of sleeping)."""
        self._avail16[0] = _le(_le(self._avail16[0], 2) & ~int(AvailFlag.NO_INTERRUPT) & 0xFFFF,
                               2)
        if self._layout.event_idx:
            self._avail16[2 + self._size] = _le(self.last_used_idx, 2)
        self._barrier()
        return self.pending_used() > 0

    def disable_interrupts(self) -> None:
        """Ask for no used buffer notifications (the device honours the flag only
        without EVENT_IDX; with it, ``used_event`` is left behind, 2.7.7)."""
        self._avail16[0] = _le(_le(self._avail16[0], 2) | AvailFlag.NO_INTERRUPT, 2)


_CONSTRUCT = object()


def _pack_state(free_head: int, num_free: int, avail_idx: int, last_used: int) -> int:
    return free_head | num_free << 16 | avail_idx << 32 | last_used << 48
