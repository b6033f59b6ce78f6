"""Marking the guest's own writes for live migration (core.guest.marking) and the stall
meter (core.guest.stall): every page the guest runtime changes is marked in the dirty
map, whatever the operation, and each store is bracketed by marks."""

from __future__ import annotations

import random

import pytest
from guest_device import SMALL, FakeScsiDevice, make_guest, make_lu
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.guest.journal import EntryState, Journal
from vfdirect.core.guest.marking import MarkedMemory, byte_map_marker, mark_of
from vfdirect.core.guest.stall import StallMeter
from vfdirect.core.guest.virtscsi import VirtioScsiDriver
from vfdirect.core.migration.dirty import PAGE_SIZE, PageMarks
from vfdirect.core.scsi import Target
from vfdirect.core.scsi.cdb import Read16, Write16, encode_cdb
from vfdirect.core.virtio import QueueFullError, RegionMemory
from vfdirect.core.virtio.scsi import TransportResetReason, VirtioScsiEvent

BS = 512


class Recorder:
    """An inner memory that logs its stores next to the marks, in order."""

    def __init__(self, size: int) -> None:
        self.log: list[tuple[str, int, int]] = []
        self.inner = RegionMemory.from_buffers([(0, bytearray(size))])

    def mark(self, gpa: int, length: int) -> None:
        self.log.append(("mark", gpa, length))


def test_every_store_is_bracketed_by_marks() -> None:
    rec = Recorder(3 * PAGE_SIZE)
    inner = rec.inner
    original_write, original_store = inner.write, inner.store_u32

    class Spy:
        def __getattr__(self, name: str) -> object:
            return getattr(inner, name)

        def write(self, gpa: int, data: bytes) -> None:
            rec.log.append(("store", gpa, len(data)))
            original_write(gpa, data)

        def store_u32(self, gpa: int, value: int) -> None:
            rec.log.append(("store", gpa, 4))
            original_store(gpa, value)

    memory = MarkedMemory(Spy(), rec.mark)  # type: ignore[arg-type]
    memory.write(PAGE_SIZE - 2, b"abcd")
    memory.store_u32(2 * PAGE_SIZE, 7)
    assert rec.log == [("mark", PAGE_SIZE - 2, 4), ("store", PAGE_SIZE - 2, 4),
                       ("mark", PAGE_SIZE - 2, 4), ("mark", 2 * PAGE_SIZE, 4),
                       ("store", 2 * PAGE_SIZE, 4), ("mark", 2 * PAGE_SIZE, 4)]
    assert memory.read(PAGE_SIZE - 2, 4) == b"abcd" and memory.load_u32(2 * PAGE_SIZE) == 7
    assert mark_of(memory) == rec.mark and mark_of(inner) is None


def test_stores_mark_the_pages_they_touch_and_reads_mark_nothing() -> None:
    buf = bytearray(8 * PAGE_SIZE)
    marks = PageMarks(bytearray(8), len(buf))
    memory = MarkedMemory(RegionMemory.from_buffers([(0, buf)]), marks.mark)
    memory.write(PAGE_SIZE - 1, b"xy")  # pages 0 and 1
    memory.store_u64(5 * PAGE_SIZE + 8, 1)
    memory.store_u16(7 * PAGE_SIZE, 1)
    memory.read(3 * PAGE_SIZE, PAGE_SIZE)
    memory.load_u32(4 * PAGE_SIZE)
    assert marks.collect() == [(0, 2), (5, 1), (7, 1)]


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 40 * PAGE_SIZE),
       calls=st.lists(st.tuples(st.integers(-3 * PAGE_SIZE, 45 * PAGE_SIZE),
                                st.integers(-2, 6 * PAGE_SIZE)), max_size=12))
def test_the_fast_marker_stores_what_page_marks_store(
        size: int, calls: list[tuple[int, int]]) -> None:
    pages = PageMarks.size_for(size)
    reference, fast = bytearray(pages), bytearray(pages)
    marks = PageMarks(reference, size)
    mark = byte_map_marker(memoryview(fast), size)
    for gpa, length in calls:
        marks.mark(gpa, length)
        mark(gpa, length)
    assert fast == reference


def test_the_fast_marker_refuses_a_short_map() -> None:
    with pytest.raises(ValueError, match="too small"):
        byte_map_marker(memoryview(bytearray(1)), 2 * PAGE_SIZE)


# -- the whole driver: every page it changes is marked ------------------------------------


def _changed_pages(before: bytes, after: bytearray) -> set[int]:
    return {p for p in range(len(after) // PAGE_SIZE)
            if before[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] !=
            after[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]}


class Checker:
    """Snapshots guest memory around each GUEST operation (device work is not the
    guest's: the hypervisor tracks it) and asserts the changed pages were marked."""

    def __init__(self, buf: bytearray, marks: PageMarks) -> None:
        self.buf = buf
        self.marks = marks
        self.ops = 0
        self.changed = 0

    def __call__(self, op: object, *args: object, **kw: object) -> object:
        assert callable(op)
        self.marks.clear_all()
        before = bytes(self.buf)
        result = op(*args, **kw)
        changed = _changed_pages(before, self.buf)
        missed = sorted(p for p in changed if not self.marks.is_marked(p))
        assert not missed, f"{getattr(op, '__name__', op)} changed unmarked pages {missed}"
        self.ops += 1
        self.changed += len(changed)
        return result


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_driver_operations_mark_every_page_they_change(seed: int) -> None:
    rng = random.Random(seed)
    raw, buf, layout = make_guest(SMALL)
    marks = PageMarks(bytearray(PageMarks.size_for(len(buf))), len(buf))
    memory = MarkedMemory(raw, marks.mark)
    check = Checker(buf, marks)
    driver = check(VirtioScsiDriver.create, memory, layout)
    assert isinstance(driver, VirtioScsiDriver)
    journal = check(Journal.format, memory, layout.journal_addr, layout.params.journal_size, 9)
    assert isinstance(journal, Journal)
    target = Target()
    target.add_lu(0, make_lu(serial="S0", n=0))
    held = rng.random() < 0.5
    device = FakeScsiDevice(raw, layout, {0: target},
                            hold=lambda h: held and h.cdb[0] == 0x8A and rng.random() < 0.2)
    driver.command_timeout = 5.0
    now = 0.0
    seq = 0
    for _step in range(60):
        now += rng.random()
        action = rng.random()
        if action < 0.45:
            lba = rng.randrange(64)
            try:
                if rng.random() < 0.5:
                    check(journal.record_pending, seq, target=0, lun=0, lba=lba,
                          generation=1, crc=0)
                    check(driver.submit, 0, 0, encode_cdb(Write16(lba=lba, transfer_length=1)),
                          data_out=rng.randbytes(BS), now=now, cookie=seq,
                          publish=rng.random() < 0.7)
                    seq += 1
                else:
                    check(driver.submit, 0, 0, encode_cdb(Read16(lba=lba, transfer_length=1)),
                          data_in=BS, now=now, publish=rng.random() < 0.7)
            except QueueFullError:
                pass
        elif action < 0.55:
            check(driver.publish)
        elif action < 0.65:
            check(driver.expire, now)
        elif action < 0.72:
            device.post_event(VirtioScsiEvent.transport_reset(
                0, 0, TransportResetReason.RESCAN))
        elif action < 0.8:
            device.release_held()
        elif action < 0.85:
            # a restarted process attaches to the same memory (the device completed
            # what it took before the connection dropped)
            device.disconnect()
            driver = check(VirtioScsiDriver.attach, memory, layout)
            assert isinstance(driver, VirtioScsiDriver)
            driver.command_timeout = 5.0
            device.connect()
            device.run()
        check(driver.publish)  # the driver reaps only with nothing staged
        device.run()
        completions = check(driver.poll)
        assert isinstance(completions, list)
        for completion in completions:
            if completion.cookie < seq and completion.cdb[0] == 0x8A:
                check(journal.settle, completion.cookie,
                      EntryState.ACKED if completion.good else EntryState.FAILED)
            check(driver.release, completion.tag)
    assert check.changed > 0


def test_unmarked_driver_costs_no_marks() -> None:
    raw, _buf, layout = make_guest(SMALL)
    driver = VirtioScsiDriver.create(raw, layout)
    assert driver._mark is None


# -- the stall meter --------------------------------------------------------------------------


def test_stall_is_the_longest_gap_with_io_outstanding() -> None:
    meter = StallMeter()
    meter.submitted(1_000, 0)
    assert meter.completed(1_500, 1) is None  # 500
    assert meter.completed(3_500, 0) is None  # 2000
    meter.submitted(10_000, 0)  # idle time between is not a stall
    meter.completed(10_100, 0)
    assert meter.max_ns == 2_000 and meter.restart_stall_ns is None
    meter.submitted(20_000, 0)
    assert meter.worst_ns(25_000) == 5_000 and meter.worst_ns() == 2_000


def test_stall_across_a_restart_starts_at_the_clock_in_memory() -> None:
    meter = StallMeter(resumed_from_ns=1_000_000)
    meter.submitted(4_000_000, 3)  # recovered commands were in flight
    assert meter.completed(7_000_000, 2) == 6_000_000
    assert meter.restart_stall_ns == 6_000_000 and meter.max_ns == 6_000_000
    assert meter.completed(7_000_500, 1) is None
    assert StallMeter.ms(meter.restart_stall_ns) == 6.0


@pytest.mark.parametrize("clock", [0, -5])
def test_a_fresh_guest_has_no_restart_stall(clock: int) -> None:
    meter = StallMeter(resumed_from_ns=clock)
    meter.submitted(100, 0)
    assert meter.completed(150, 0) is None and meter.max_ns == 50
