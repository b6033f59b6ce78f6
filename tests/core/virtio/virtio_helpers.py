"""Shared helpers for the virtio core tests: a bytearray guest, a driver/device pair on
it, and hypothesis strategies for chain shapes."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from vfdirect.core.virtio import (
    DriverLayout,
    RegionMemory,
    SplitQueueDriver,
    Virtqueue,
)

GUEST_BASE = 0x10000
GUEST_SIZE = 0x40000
#: Data buffers live above the rings.
DATA_BASE = GUEST_BASE + 0x20000
DATA_SIZE = GUEST_SIZE - 0x20000

DESC = struct.Struct("<QIHH")


def make_memory(size: int = GUEST_SIZE, base: int = GUEST_BASE) -> tuple[RegionMemory,
                                                                          bytearray]:
    buf = bytearray(size)
    return RegionMemory.from_buffers([(base, buf)]), buf


@dataclass
class Pair:
    memory: RegionMemory
    buf: bytearray
    layout: DriverLayout
    driver: SplitQueueDriver
    device: Virtqueue


def make_pair(size: int = 16, *, event_idx: bool = True, max_indirect: int = 8,
              start_idx: int = 0) -> Pair:
    memory, buf = make_memory()
    layout = DriverLayout.plan(GUEST_BASE, size, event_idx=event_idx,
                               max_indirect=max_indirect)
    assert layout.end <= DATA_BASE
    driver = SplitQueueDriver.create(memory, layout, start_idx=start_idx)
    device = Virtqueue(memory, layout.queue_config(), last_avail_idx=start_idx)
    return Pair(memory, buf, layout, driver, device)


def write_desc(memory: RegionMemory, table: int, index: int, addr: int, length: int,
               flags: int, nxt: int) -> None:
    memory.write(table + 16 * index, DESC.pack(addr, length, flags, nxt))


#: A chain shape: lengths of device-readable then device-writable buffers.
shapes = st.tuples(st.lists(st.integers(1, 300), max_size=4),
                   st.lists(st.integers(1, 300), max_size=4)).filter(
                       lambda rw: len(rw[0]) + len(rw[1]) > 0)


def place(shape: tuple[list[int], list[int]], cursor: int) -> tuple[
        list[tuple[int, int]], list[tuple[int, int]], int]:
    """Lay a shape's buffers out in the data area from ``cursor`` (wrapping)."""
    readable, writable = [], []
    for lengths, out in ((shape[0], readable), (shape[1], writable)):
        for length in lengths:
            if cursor + length > DATA_BASE + DATA_SIZE:
                cursor = DATA_BASE
            out.append((cursor, length))
            cursor += (length + 7) & ~7
    return readable, writable, cursor
