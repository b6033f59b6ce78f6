"""Split virtqueue layout in guest memory (VIRTIO 1.x 2.7), shared by both sides.

Rules of this module:

* a split virtqueue is three areas (2.7, table "Virtqueue Part"): the descriptor table
  (16 bytes per entry, 16-byte aligned), the available ring (flags, idx, ring[size],
  used_event; 2-byte aligned) and the used ring (flags, idx, ring[size] of {id, len},
  avail_event; 4-byte aligned). All fields are little-endian (1.4);
* the queue size is a power of 2 no larger than 32768 (2.7, "Queue Size");
* :func:`need_event` is THE notification-suppression rule of 2.7.7.2 and 2.7.10
  (``vring_need_event``), with 16-bit wrap-around; both sides use it;
* :class:`VirtqueueConfig` is what the device must be told to serve a queue (vhost-user
  SET_VRING_NUM/ADDR plus the negotiated ring features); it validates itself and raises
  :class:`~vfdirect.core.virtio.errors.VirtqueueError` (``BAD_CONFIG``), because it
  comes from the peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag

from vfdirect.core.virtio.errors import GuestMemoryError, VirtqueueError, VirtqueueFault
from vfdirect.core.virtio.memory import GuestMemory

__all__ = [
    "AVAIL_ALIGN",
    "DESC_ALIGN",
    "DESC_SIZE",
    "MAX_QUEUE_SIZE",
    "USED_ALIGN",
    "USED_ELEM_SIZE",
    "AvailFlag",
    "DescFlag",
    "UsedFlag",
    "VirtqueueConfig",
    "align_up",
    "avail_ring_bytes",
    "desc_table_bytes",
    "is_valid_queue_size",
    "legacy_layout",
    "need_event",
    "used_ring_bytes",
]

DESC_SIZE = 16
USED_ELEM_SIZE = 8
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
MAX_QUEUE_SIZE = 32768


class DescFlag(IntFlag):
    """``struct virtq_desc`` flags (2.7.5)."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4


class AvailFlag(IntFlag):
    """``struct virtq_avail`` flags (2.7.6): the driver asks for no used notifications."""

    NO_INTERRUPT = 1


class UsedFlag(IntFlag):
    """``struct virtq_used`` flags (2.7.8): the device asks for no available notifications."""

    NO_NOTIFY = 1


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def desc_table_bytes(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_bytes(size: int, event_idx: bool = True) -> int:
    """flags + idx + ring[size] (+ used_event with VIRTIO_RING_F_EVENT_IDX)."""
    return 4 + 2 * size + (2 if event_idx else 0)


def used_ring_bytes(size: int, event_idx: bool = True) -> int:
    """flags + idx + ring[size] (+ avail_event with VIRTIO_RING_F_EVENT_IDX)."""
    return 4 + USED_ELEM_SIZE * size + (2 if event_idx else 0)


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """VIRTIO 1.x 2.7.7.2 / 2.7.10: notify when the index moved from ``old_idx`` to
    ``new_idx`` past ``event_idx``, i.e. ``event_idx`` is in ``[old_idx, new_idx)``,
    all modulo 2^16."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def is_valid_queue_size(size: int) -> bool:
    return 1 <= size <= MAX_QUEUE_SIZE and size & (size - 1) == 0


@dataclass(frozen=True, slots=True)
class VirtqueueConfig:
    """Where a split virtqueue lives and which ring features apply to it."""

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    event_idx: bool = False
    indirect: bool = False

    def __post_init__(self) -> None:
        if not is_valid_queue_size(self.size):
            raise VirtqueueError(f"queue size {self.size} is not a power of 2 in 1..32768",
                                 fault=VirtqueueFault.BAD_CONFIG)
        for name, addr, alignment in (("descriptor table", self.desc_addr, DESC_ALIGN),
                                      ("available ring", self.avail_addr, AVAIL_ALIGN),
                                      ("used ring", self.used_addr, USED_ALIGN)):
            if not 0 <= addr < 1 << 64:
                raise VirtqueueError(f"{name} address {addr:#x} out of range",
                                     fault=VirtqueueFault.BAD_CONFIG)
            # 2.7, "Virtqueue Part" alignment column.
            if addr % alignment:
                raise VirtqueueError(f"{name} at {addr:#x} is not {alignment}-byte aligned",
                                     fault=VirtqueueFault.BAD_CONFIG)

    @property
    def desc_bytes(self) -> int:
        return desc_table_bytes(self.size)

    @property
    def avail_bytes(self) -> int:
        return avail_ring_bytes(self.size, self.event_idx)

    @property
    def used_bytes(self) -> int:
        return used_ring_bytes(self.size, self.event_idx)

    def check_memory(self, memory: GuestMemory) -> None:
        """Raise ``BAD_CONFIG`` unless each of the three areas lies in ONE region (the
        device keeps zero-copy views of them) and the used ring does not overlap the
        other two (the device writes it)."""
        areas = (("descriptor table", self.desc_addr, self.desc_bytes),
                 ("available ring", self.avail_addr, self.avail_bytes),
                 ("used ring", self.used_addr, self.used_bytes))
        for name, addr, length in areas:
            try:
                memory.view(addr, length)
            except GuestMemoryError as exc:
                raise VirtqueueError(f"{name} [{addr:#x}+{length:#x}] is not in guest "
                                     f"memory: {exc}", fault=VirtqueueFault.BAD_CONFIG) from exc
        used_end = self.used_addr + self.used_bytes
        for name, addr, length in areas[:2]:
            if addr < used_end and self.used_addr < addr + length:
                raise VirtqueueError(f"used ring overlaps the {name}",
                                     fault=VirtqueueFault.BAD_CONFIG)


def legacy_layout(base: int, size: int, *, align: int = 4096, event_idx: bool = True,
                  indirect: bool = False) -> VirtqueueConfig:
    """The contiguous layout of the legacy interface (2.7.2 / 4.1.5.1 "Legacy Interfaces:
    A Note on Virtqueue Layout"): descriptor table, available ring, then the used ring at
    the next ``align`` boundary."""
    avail = base + desc_table_bytes(size)
    used = align_up(avail + avail_ring_bytes(size, True), align)
    return VirtqueueConfig(size, base, avail, used, event_idx=event_idx, indirect=indirect)
