"""The dirty log: the bitmap layout of vhost-user.rst and the ring's write hook."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.vhost.log import DirtyLog, DirtyLogError, log_bytes_for
from vfdirect.core.virtio import DriverLayout, RegionMemory, SplitQueueDriver, Virtqueue


def test_bit_layout() -> None:
    raw = bytearray(4)
    log = DirtyLog(memoryview(raw))
    log.mark(0x1000, 1)  # page 1 -> byte 0 bit 1
    log.mark(0x9FFF, 2)  # pages 9 and 10 -> byte 1 bits 1 and 2
    assert raw == bytearray([0b10, 0b110, 0, 0])
    assert list(log.dirty_pages()) == [1, 9, 10]
    assert log.is_dirty(9) and not log.is_dirty(8) and not log.is_dirty(1000)
    log.mark(0, 0)  # nothing
    with pytest.raises(DirtyLogError):
        log.mark(32 * 0x1000, 1)
    with pytest.raises(DirtyLogError):
        DirtyLog(memoryview(bytes(4)))
    assert log_bytes_for(0x10000) == 2 and log_bytes_for(0x10001) == 3


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x3F000), st.integers(0, 0x9000)), max_size=10))
def test_marks_match_a_page_model(writes: list[tuple[int, int]]) -> None:
    log = DirtyLog(memoryview(bytearray(log_bytes_for(0x50000))))
    expected: set[int] = set()
    for gpa, length in writes:
        log.mark(gpa, length)
        if length:
            expected |= set(range(gpa // 0x1000, (gpa + length - 1) // 0x1000 + 1))
    assert list(log.dirty_pages()) == sorted(expected)


def test_virtqueue_reports_its_used_ring_writes() -> None:
    memory = RegionMemory.from_buffers([(0, bytearray(0x20000))])
    layout = DriverLayout.plan(0x3000, 256)  # used ring spans two pages
    driver = SplitQueueDriver.create(memory, layout)
    log = DirtyLog(memoryview(bytearray(log_bytes_for(0x20000))))
    device = Virtqueue(memory, layout.queue_config(), on_write=log.mark)
    for token in range(3):
        driver.submit([(0x10000, 8)], [(0x11000, 8)], token)
    chains = [device.pop() for _ in range(3)]
    device.push_used_batch([(c.head, 0) for c in chains if c])
    used_pages = {layout.used_addr // 0x1000,
                  (layout.used_addr + 4 + 8 * 256 + 1) // 0x1000}
    assert set(log.dirty_pages()) == used_pages  # elements, idx and avail_event
