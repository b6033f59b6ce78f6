"""The device side of a split virtqueue (VIRTIO 1.x 2.7), pure.

Rules of this module (after QEMU libvhost-user, which keeps three things apart):

* **shared ring memory** (descriptor table, available ring, used ring) lives in guest
  memory and is only reached through zero-copy views taken once, when the queue is
  built; the driver may change it at any time, so
* **everything read from it is copied before it is checked**: a descriptor (16 bytes) is
  read ONCE into private bytes and then validated; an indirect table is copied whole
  before its first entry is looked at; the avail ring entry is read once. A chain the
  device hands on is a frozen :class:`DescriptorChain` of private values;
* **device-private indices** (``last_avail_idx``, ``used_idx``) live in this object, not
  in shared memory; ``used.idx`` is only ever *written* (published) by us;
* **the in-flight record**: heads popped and not yet used, in pop order. It is part of
  :class:`~vfdirect.core.virtio.state.QueueState` (migration hand-off, a reconnecting
  back end);
* every malformed thing in shared memory raises
  :class:`~vfdirect.core.virtio.errors.VirtqueueError` with a fault hint; nothing else
  escapes for peer input. Our own misuse raises
  :class:`~vfdirect.core.virtio.errors.VirtqueueUsageError`;
* publication order (2.7.8, 2.7.13): write the used element, then store ``used.idx``
  with one aligned 16-bit store. A full memory barrier must separate a publication from
  the following read of the peer's suppression field (``used_event``/``flags``): Python
  has no fence, so the caller may pass ``barrier`` (the shell passes a lock round trip,
  a locked instruction on x86); on x86 (TSO) the store order itself is preserved.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn

from vfdirect.core.virtio.errors import (
    GuestMemoryError,
    VirtqueueError,
    VirtqueueFault,
    VirtqueueUsageError,
)
from vfdirect.core.virtio.layout import (
    DESC_SIZE,
    AvailFlag,
    DescFlag,
    UsedFlag,
    VirtqueueConfig,
    need_event,
)
from vfdirect.core.virtio.memory import BytesLike, GuestMemory
from vfdirect.core.virtio.state import QueueState

__all__ = ["DescriptorChain", "Segment", "Virtqueue"]

_DESC = struct.Struct("<QIHH")
_LITTLE = sys.byteorder == "little"
_NEXT, _WRITE, _INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)


def _le(value: int, size: int) -> int:
    """Native <-> little-endian for an item read or written through a cast view."""
    if _LITTLE:
        return value
    return int.from_bytes(value.to_bytes(size, "little"), "big")


def _no_barrier() -> None:
    return None


@dataclass(frozen=True, slots=True)
class Segment:
    """One buffer of a chain: ``length`` bytes at guest-physical ``gpa``."""

    gpa: int
    length: int


def _gather(memory: GuestMemory, segments: tuple[Segment, ...], offset: int,
            length: int) -> bytes:
    out = bytearray()
    for seg in segments:
        if length <= 0:
            break
        if offset >= seg.length:
            offset -= seg.length
            continue
        take = min(seg.length - offset, length)
        out += memory.read(seg.gpa + offset, take)
        length -= take
        offset = 0
    return bytes(out)


@dataclass(frozen=True, slots=True)
class DescriptorChain:
    """A chain popped from the available ring, copied out and validated.

    ``readable`` are the device-readable buffers (driver -> device), ``writable`` the
    device-writable ones (device -> driver), each in chain order; zero-length
    descriptors are dropped. ``avail_idx`` is the free-running available index the head
    was taken from (-1 when re-read after a restore). Every segment lies inside guest
    memory (it was checked against the memory the queue was built on)."""

    head: int
    readable: tuple[Segment, ...]
    writable: tuple[Segment, ...]
    avail_idx: int = 0
    descriptors: int = 1
    indirect: bool = False

    @property
    def readable_length(self) -> int:
        return sum(s.length for s in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(s.length for s in self.writable)

    def readable_views(self, memory: GuestMemory) -> list[memoryview]:
        """Zero-copy views of the readable buffers (one or more per segment)."""
        return [v for s in self.readable for v in memory.views(s.gpa, s.length)]

    def writable_views(self, memory: GuestMemory) -> list[memoryview]:
        """Zero-copy views of the writable buffers (one or more per segment)."""
        return [v for s in self.writable for v in memory.views(s.gpa, s.length)]

    def read(self, memory: GuestMemory, offset: int = 0, length: int | None = None) -> bytes:
        """A COPY of ``length`` bytes of the readable part from ``offset`` (shorter if
        the chain is shorter). Headers must be copied before they are decoded: the
        driver can change them under our feet."""
        total = self.readable_length
        if length is None:
            length = max(0, total - offset)
        return _gather(memory, self.readable, offset, length)

    def write(self, memory: GuestMemory, data: BytesLike, offset: int = 0) -> int:
        """Scatter ``data`` into the writable part from ``offset``; returns the bytes
        written (less than ``len(data)`` when the writable part is too short)."""
        src = memoryview(data).cast("B")
        done = 0
        for seg in self.writable:
            if done >= src.nbytes:
                break
            if offset >= seg.length:
                offset -= seg.length
                continue
            take = min(seg.length - offset, src.nbytes - done)
            memory.write(seg.gpa + offset, src[done:done + take])
            done += take
            offset = 0
        return done


class Virtqueue:
    """Device side of one split virtqueue."""

    def __init__(self, memory: GuestMemory, config: VirtqueueConfig, *,
                 last_avail_idx: int = 0, used_idx: int | None = None,
                 in_flight: Iterable[int] = (),
                 barrier: Callable[[], None] | None = None,
                 on_write: Callable[[int, int], None] | None = None) -> None:
        """``barrier`` is a full memory fence (see the module rules); ``on_write(gpa,
        length)`` is told of every write the queue makes to the used ring (dirty logging
        for migration, vhost-user VHOST_VRING_F_LOG)."""
        config.check_memory(memory)
        self._memory = memory
        self._config = config
        self._size = config.size
        self._barrier = barrier or _no_barrier
        self._on_write = on_write
        self._desc = memory.view(config.desc_addr, config.desc_bytes)
        self._avail16 = memory.view(config.avail_addr, config.avail_bytes).cast("H")
        used = memory.view(config.used_addr, config.used_bytes)
        self._used16 = used.cast("H")
        self._used32 = used[:4 + 8 * config.size].cast("I")
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise VirtqueueUsageError(f"last_avail_idx {last_avail_idx} is not 16-bit")
        self._last_avail = last_avail_idx
        if used_idx is None:
            # A (re)connecting back end takes used.idx from the ring (libvhost-user does
            # the same on SET_VRING_ADDR); only we ever write it.
            used_idx = _le(self._used16[1], 2)
        if not 0 <= used_idx <= 0xFFFF:
            raise VirtqueueUsageError(f"used_idx {used_idx} is not 16-bit")
        self._used_idx = used_idx
        # head -> (avail index it was taken from, writable capacity); both -1 when
        # restored from a state record (unknown until the chain is re-read).
        self._in_flight: dict[int, tuple[int, int]] = {}
        for head in in_flight:
            if not 0 <= head < self._size or head in self._in_flight:
                raise VirtqueueUsageError(f"bad in-flight head {head}")
            self._in_flight[head] = (-1, -1)
        self._signalled_used = used_idx
        self._signalled_valid = False
        self._kicks_enabled = True
        self._broken: VirtqueueError | None = None
        # A device starts with notifications on (QEMU sets them when a queue starts).
        if config.event_idx:
            self._store_avail_event(self._last_avail)
        else:
            self._set_used_flags(clear=UsedFlag.NO_NOTIFY)

    # -- migration / reconnection ---------------------------------------------------------

    @classmethod
    def restore(cls, state: QueueState, memory: GuestMemory, *,
                barrier: Callable[[], None] | None = None,
                on_write: Callable[[int, int], None] | None = None) -> Virtqueue:
        """Rebuild a queue from its state and the memory it lives in (Firecracker style:
        state plus what cannot be serialised). The in-flight heads are still owed a used
        element; :meth:`read_chain` re-reads their chains for resubmission."""
        return cls(memory, state.config, last_avail_idx=state.last_avail_idx,
                   used_idx=state.used_idx, in_flight=state.in_flight, barrier=barrier,
                   on_write=on_write)

    def save(self) -> QueueState:
        c = self._config
        return QueueState(size=c.size, desc_addr=c.desc_addr, avail_addr=c.avail_addr,
                          used_addr=c.used_addr, last_avail_idx=self._last_avail,
                          used_idx=self._used_idx, in_flight=tuple(self._in_flight),
                          event_idx=c.event_idx, indirect=c.indirect)

    # -- observers ------------------------------------------------------------------------

    @property
    def config(self) -> VirtqueueConfig:
        return self._config

    @property
    def size(self) -> int:
        return self._size

    @property
    def last_avail_idx(self) -> int:
        return self._last_avail

    @property
    def used_idx(self) -> int:
        return self._used_idx

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Heads popped and not yet used, oldest first."""
        return tuple(self._in_flight)

    @property
    def broken(self) -> VirtqueueError | None:
        """The error that broke this queue, if any (then :meth:`pop` refuses)."""
        return self._broken

    @property
    def kicks_enabled(self) -> bool:
        return self._kicks_enabled

    def avail_idx(self) -> int:
        """The driver's published available index (a fresh read of shared memory)."""
        return _le(self._avail16[1], 2)

    def pending(self) -> int:
        """How many heads the driver made available that we have not popped."""
        count = (self.avail_idx() - self._last_avail) & 0xFFFF
        if count > self._size:
            # 2.7.13.3: the driver never lets avail run more than a queue ahead.
            self._break(VirtqueueError(
                f"available index moved {count} entries ahead of {self._last_avail} "
                f"(queue size {self._size})", fault=VirtqueueFault.BAD_AVAIL_IDX))
        return count

    def _break(self, error: VirtqueueError) -> NoReturn:
        self._broken = error
        raise error

    # -- popping --------------------------------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or ``None`` when the ring is empty.

        Raises :class:`VirtqueueError` for a malformed chain; the queue is then broken
        (indices unchanged) and the VF enters its error state."""
        if self._broken is not None:
            raise self._broken
        if self.pending() == 0:
            return None
        slot = self._last_avail & (self._size - 1)
        head = _le(self._avail16[2 + slot], 2)  # read once
        try:
            chain = self._parse(head, self._last_avail)
        except VirtqueueError as exc:
            self._break(exc)
        if head in self._in_flight:
            self._break(VirtqueueError(f"head {head} made available while in flight",
                                       fault=VirtqueueFault.DUPLICATE_HEAD, head=head))
        self._in_flight[head] = (self._last_avail, chain.writable_length)
        self._last_avail = (self._last_avail + 1) & 0xFFFF
        if self._config.event_idx and self._kicks_enabled:
            # 2.7.10: ask for a kick once the driver publishes past what we consumed.
            self._store_avail_event(self._last_avail)
        return chain

    def read_chain(self, head: int) -> DescriptorChain:
        """Re-read the chain of an in-flight head (after :meth:`restore`, to resubmit
        it); indices are not touched. Same checks as :meth:`pop`. After a restore the
        record's ``avail_idx`` is -1 (the state does not keep it)."""
        if head not in self._in_flight:
            raise VirtqueueUsageError(f"head {head} is not in flight")
        avail_idx = self._in_flight[head][0]
        chain = self._parse(head, avail_idx)
        self._in_flight[head] = (avail_idx, chain.writable_length)
        return chain

    def _parse(self, head: int, avail_idx: int) -> DescriptorChain:
        size = self._size
        if not 0 <= head < size:
            raise VirtqueueError(f"head {head} out of range (size {size})",
                                 fault=VirtqueueFault.BAD_HEAD, head=head)
        readable: list[Segment] = []
        writable: list[Segment] = []
        table: bytes | memoryview = self._desc
        table_len = size
        in_indirect = False
        used_indirect = False
        visited: set[int] = set()
        seen_writable = False
        count = 0
        index = head
        memory = self._memory
        while True:
            if index in visited:
                raise VirtqueueError(f"descriptor chain from head {head} loops at {index}",
                                     fault=VirtqueueFault.LOOP, head=head)
            visited.add(index)
            raw = bytes(table[DESC_SIZE * index:DESC_SIZE * (index + 1)])  # copied once
            addr, length, flags, nxt = _DESC.unpack(raw)
            if flags & _INDIRECT:
                # 2.7.5.3.1: no nesting, never with NEXT, only when negotiated; the table
                # length is a non-zero multiple of 16. WRITE is ignored here (2.7.5.3.2).
                if in_indirect:
                    raise VirtqueueError("indirect descriptor inside an indirect table",
                                         fault=VirtqueueFault.NESTED_INDIRECT, head=head)
                if not self._config.indirect:
                    raise VirtqueueError("indirect descriptor but INDIRECT_DESC not "
                                         "negotiated",
                                         fault=VirtqueueFault.INDIRECT_NOT_NEGOTIATED,
                                         head=head)
                if flags & _NEXT:
                    raise VirtqueueError("indirect descriptor with NEXT set",
                                         fault=VirtqueueFault.INDIRECT_WITH_NEXT, head=head)
                if length == 0 or length % DESC_SIZE:
                    raise VirtqueueError(f"indirect table length {length} is not a "
                                         "non-zero multiple of 16",
                                         fault=VirtqueueFault.BAD_INDIRECT_LEN, head=head)
                entries = length // DESC_SIZE
                if entries > size:
                    raise VirtqueueError(f"indirect table of {entries} entries exceeds the "
                                         f"queue size {size}",
                                         fault=VirtqueueFault.CHAIN_TOO_LONG, head=head)
                try:
                    table = memory.read(addr, length)  # the whole table, copied once
                except GuestMemoryError as exc:
                    raise VirtqueueError(f"indirect table [{addr:#x}+{length:#x}] is "
                                         "outside guest memory",
                                         fault=VirtqueueFault.OUT_OF_BOUNDS,
                                         head=head) from exc
                table_len = entries
                in_indirect = used_indirect = True
                visited = set()
                index = 0
                continue
            count += 1
            if count > size:
                raise VirtqueueError(f"chain from head {head} is longer than the queue "
                                     f"size {size}", fault=VirtqueueFault.CHAIN_TOO_LONG,
                                     head=head)
            if flags & _WRITE:
                seen_writable = True
                if length:
                    if not memory.contains(addr, length):
                        raise VirtqueueError(f"writable buffer [{addr:#x}+{length:#x}] is "
                                             "outside guest memory",
                                             fault=VirtqueueFault.OUT_OF_BOUNDS, head=head)
                    writable.append(Segment(addr, length))
            else:
                # 2.7.4.2: device-readable descriptors come before device-writable ones.
                if seen_writable:
                    raise VirtqueueError("device-readable descriptor after a "
                                         "device-writable one",
                                         fault=VirtqueueFault.READABLE_AFTER_WRITABLE,
                                         head=head)
                if length:
                    if not memory.contains(addr, length):
                        raise VirtqueueError(f"readable buffer [{addr:#x}+{length:#x}] is "
                                             "outside guest memory",
                                             fault=VirtqueueFault.OUT_OF_BOUNDS, head=head)
                    readable.append(Segment(addr, length))
            if not flags & _NEXT:
                break
            if nxt >= table_len:
                raise VirtqueueError(f"next index {nxt} out of range ({table_len})",
                                     fault=VirtqueueFault.BAD_NEXT, head=head)
            index = nxt
        return DescriptorChain(head=head, readable=tuple(readable), writable=tuple(writable),
                               avail_idx=avail_idx, descriptors=count,
                               indirect=used_indirect)

    # -- completing -----------------------------------------------------------------------

    def push_used(self, head: int, written: int) -> None:
        """Return ``head`` to the driver with ``written`` bytes written to its writable
        part, and publish it (2.7.8): element first, then ``used.idx``."""
        self.push_used_batch(((head, written),))

    def push_used_batch(self, elements: Iterable[tuple[int, int]]) -> None:
        """Return several heads and publish them with ONE store of ``used.idx``."""
        items = list(elements)
        seen: set[int] = set()
        for head, written in items:
            if head not in self._in_flight or head in seen:
                raise VirtqueueUsageError(f"head {head} is not in flight")
            seen.add(head)
            capacity = self._in_flight[head][1]
            if not 0 <= written <= 0xFFFFFFFF or (capacity >= 0 and written > capacity):
                raise VirtqueueUsageError(f"written length {written} for head {head} "
                                          f"exceeds its writable capacity {capacity}")
        idx = self._used_idx
        mask = self._size - 1
        for head, written in items:
            slot = idx & mask
            self._used32[1 + 2 * slot] = _le(head, 4)
            self._used32[2 + 2 * slot] = _le(written, 4)
            idx = (idx + 1) & 0xFFFF
            del self._in_flight[head]
        # One aligned 16-bit store publishes the whole batch.
        self._used16[1] = _le(idx, 2)
        if self._on_write is not None:
            first = self._used_idx
            for k in range(len(items)):
                self._logged(4 + 8 * ((first + k) & mask), 8)
            self._logged(2, 2)
        self._used_idx = idx

    # -- notifications --------------------------------------------------------------------

    def should_notify(self) -> bool:
        """Whether to send a used buffer notification (call eventfd) for what was
        published since the last call (2.7.7.2). Call once after a batch of pushes."""
        new = self._used_idx
        old = self._signalled_used
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if valid and new == old:
            return False
        self._barrier()  # used.idx store before the used_event / flags load
        if self._config.event_idx:
            used_event = _le(self._avail16[2 + self._size], 2)
            return not valid or need_event(used_event, new, old)
        return not _le(self._avail16[0], 2) & AvailFlag.NO_INTERRUPT

    def enable_kicks(self) -> bool:
        """Ask the driver for available buffer notifications again (2.7.10) and return
        whether buffers are already pending (then poll instead of sleeping)."""
        self._kicks_enabled = True
        if self._config.event_idx:
            self._store_avail_event(self.avail_idx())
        else:
            self._set_used_flags(clear=UsedFlag.NO_NOTIFY)
        self._barrier()
        return self.pending() > 0

    def disable_kicks(self) -> None:
        """Tell the driver we are polling. With EVENT_IDX there is no flag (the driver
        ignores it): ``avail_event`` is simply left behind, so at most one kick comes."""
        self._kicks_enabled = False
        if not self._config.event_idx:
            self._set_used_flags(set_=UsedFlag.NO_NOTIFY)

    def _store_avail_event(self, value: int) -> None:
        self._used16[2 + 4 * self._size] = _le(value, 2)
        self._logged(4 + 8 * self._size, 2)

    def _set_used_flags(self, *, set_: int = 0, clear: int = 0) -> None:
        flags = _le(self._used16[0], 2)
        self._used16[0] = _le((flags | int(set_)) & ~int(clear) & 0xFFFF, 2)
        self._logged(0, 2)

    def _logged(self, offset: int, length: int) -> None:
        if self._on_write is not None:
            self._on_write(self._config.used_addr + offset, length)
