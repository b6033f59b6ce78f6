"""The virtio-scsi driver core against a device-side ``Virtqueue`` over in-process
memory: request bookkeeping, data paths, timeouts and ABORT TASK, events, and a new
driver object attached to the same memory mid-stream (SYSTEM.md 6)."""

from __future__ import annotations

import struct

import pytest
from guest_device import SMALL, FakeScsiDevice, make_guest, make_lu

from vfdirect.core.guest.layout import GuestLayout, LayoutParams
from vfdirect.core.guest.requests import ReqFlag, ReqState
from vfdirect.core.guest.virtscsi import Completion, TagsExhausted, VirtioScsiDriver
from vfdirect.core.scsi import Target, decode_sense
from vfdirect.core.scsi.cdb import Inquiry, Read16, ReportLuns, Write16, encode_cdb
from vfdirect.core.scsi.luns import decode_lun, parse_report_luns
from vfdirect.core.scsi.opcodes import Status
from vfdirect.core.scsi.sense import SenseKey
from vfdirect.core.virtio import DriverStateError, QueueFullError, RegionMemory
from vfdirect.core.virtio.errors import VirtqueueUsageError
from vfdirect.core.virtio.scsi import (
    CONTROLQ,
    EVENTQ,
    TmfSubtype,
    TransportResetReason,
    VirtioScsiConfig,
    VirtioScsiEvent,
    VirtioScsiResponse,
)

BS = 512


def world(params: LayoutParams = SMALL, **device_kw: object) -> tuple[
        RegionMemory, GuestLayout, VirtioScsiDriver, FakeScsiDevice]:
    memory, _buf, layout = make_guest(params)
    driver = VirtioScsiDriver.create(memory, layout)
    target = Target()
    target.add_lu(0, make_lu(serial="S0", n=0))
    target.add_lu(3, make_lu(serial="S3", n=3))
    device = FakeScsiDevice(memory, layout, {0: target}, **device_kw)  # type: ignore[arg-type]
    assert driver.take_kicks() == [EVENTQ]  # event buffers posted at creation
    return memory, layout, driver, device


def write_cdb(lba: int, blocks: int = 1, fua: bool = False) -> bytes:
    return encode_cdb(Write16(lba=lba, transfer_length=blocks, fua=fua))


def read_cdb(lba: int, blocks: int = 1) -> bytes:
    return encode_cdb(Read16(lba=lba, transfer_length=blocks))


def drain(driver: VirtioScsiDriver, device: FakeScsiDevice) -> list[Completion]:
    device.run()
    out = driver.poll()
    for c in out:
        driver.release(c.tag)
    return out


def test_write_then_read_back_through_the_rings() -> None:
    _, _, driver, device = world()
    data = bytes(range(256)) * 4
    tag = driver.submit(0, 3, write_cdb(7, 2), data_out=data, cookie=41)
    assert driver.take_kicks() == [2]  # first request queue, device asked for kicks
    (c,) = drain(driver, device)
    assert (c.tag, c.cookie, c.good, c.resid, c.data, c.target, c.lun) == (
        tag, 41, True, 0, None, 0, 3)
    driver.submit(0, 3, read_cdb(7, 2), data_in=1024, cookie=42)
    (c,) = drain(driver, device)
    assert c.good and c.data == data and c.cookie == 42
    assert c.cdb == read_cdb(7, 2)
    assert driver.free_tags == SMALL.tags and driver.outstanding == 0


def test_report_luns_and_inquiry_of_an_absent_lun() -> None:
    _, _, driver, device = world()
    driver.submit(0, 0, encode_cdb(ReportLuns(allocation_length=256)), data_in=256)
    (c,) = drain(driver, device)
    assert c.good and c.resid == 256 - 24
    assert [int(decode_lun(x)) for x in parse_report_luns(c.data or b"")] == [0, 3]
    driver.submit(0, 5, encode_cdb(Inquiry(allocation_length=96)), data_in=96)
    (c,) = drain(driver, device)
    assert c.good and c.data is not None and c.data[0] >> 5 == 0b011


def test_check_condition_carries_decodable_sense() -> None:
    _, _, driver, device = world()
    driver.submit(0, 0, read_cdb(10_000), data_in=BS)  # beyond 256 blocks
    (c,) = drain(driver, device)
    assert c.response == VirtioScsiResponse.OK and c.status == Status.CHECK_CONDITION
    sense = c.sense_data()
    assert sense is not None and sense.sense.key == SenseKey.ILLEGAL_REQUEST
    assert sense == decode_sense(c.sense)


def test_bad_target_is_a_transport_response() -> None:
    _, _, driver, device = world()
    driver.submit(9, 0, encode_cdb(Inquiry()), data_in=36)
    (c,) = drain(driver, device)
    assert c.response == VirtioScsiResponse.BAD_TARGET and not c.good


def test_kicks_only_when_the_device_asks() -> None:
    _, _, driver, device = world()
    driver.submit(0, 0, write_cdb(0), data_out=bytes(BS), vring=2)
    assert driver.take_kicks() == [2]
    # The device has not consumed: avail_event still points at the first entry.
    driver.submit(0, 0, write_cdb(1), data_out=bytes(BS), vring=2)
    assert driver.take_kicks() == []
    device.run()
    driver.submit(0, 0, write_cdb(2), data_out=bytes(BS), vring=2)
    assert driver.take_kicks() == [2]


def test_batched_publish_is_one_kick() -> None:
    _, _, driver, device = world()
    tags = [driver.submit(0, 0, write_cdb(i), data_out=bytes(BS), vring=3, publish=False)
            for i in range(4)]
    assert driver.take_kicks() == [] and device.run() == 0  # nothing visible yet
    driver.publish()
    assert driver.take_kicks() == [3]
    assert sorted(c.tag for c in drain(driver, device)) == sorted(tags)


def test_tags_exhausted_then_free_again() -> None:
    _, _, driver, device = world()
    for i in range(SMALL.tags):
        driver.submit(0, 0, write_cdb(i), data_out=bytes(BS))
    with pytest.raises(TagsExhausted):
        driver.submit(0, 0, write_cdb(0), data_out=bytes(BS))
    assert len(drain(driver, device)) == SMALL.tags
    driver.submit(0, 0, write_cdb(0), data_out=bytes(BS))


def test_usage_errors_are_ours() -> None:
    _, _, driver, _ = world()
    with pytest.raises(VirtqueueUsageError):
        driver.submit(0, 0, write_cdb(0), data_out=bytes(BS), data_in=BS)
    with pytest.raises(VirtqueueUsageError):
        driver.submit(0, 0, read_cdb(0, 100), data_in=SMALL.slot_size + BS)
    with pytest.raises(VirtqueueUsageError):
        driver.submit(0, 0, bytes(40))
    with pytest.raises(VirtqueueUsageError):
        driver.submit(0, 0, write_cdb(0), data_out=bytes(BS), vring=7)
    tag = driver.submit(0, 0, write_cdb(0), data_out=bytes(BS))
    with pytest.raises(VirtqueueUsageError):
        driver.release(tag)  # not DONE yet


def test_without_indirect_descriptors_chains_are_direct() -> None:
    _, _, driver, device = world(indirect=False)
    driver.configure(VirtioScsiConfig(), indirect=False)
    driver.submit(0, 0, write_cdb(1), data_out=b"x" * BS)
    driver.submit(0, 0, read_cdb(1), data_in=BS)
    completions = drain(driver, device)
    assert [c.good for c in completions] == [True, True]
    assert completions[1].data == b"x" * BS


def test_device_config_sense_and_cdb_sizes() -> None:
    _, _, driver, device = world(sense_size=32, cdb_size=16)
    driver.configure(VirtioScsiConfig(sense_size=32, cdb_size=16))
    driver.submit(0, 0, read_cdb(99_999), data_in=BS)
    (c,) = drain(driver, device)
    assert c.status == Status.CHECK_CONDITION and 0 < len(c.sense) <= 32
    with pytest.raises(VirtqueueUsageError):
        driver.submit(0, 0, bytes(17))


def test_one_request_queue_when_the_device_serves_one() -> None:
    _, _, driver, device = world(request_queues=1)
    driver.configure(VirtioScsiConfig(num_queues=1), request_queues=1)
    for i in range(6):
        driver.submit(0, 0, write_cdb(i), data_out=bytes(BS))
    assert len(drain(driver, device)) == 6


# -- timeouts and ABORT TASK ------------------------------------------------------------


def test_timeout_posts_abort_task_and_the_command_ends_aborted() -> None:
    _, _, driver, device = world(hold=lambda h: h.cdb[0] == 0x8A)  # hold WRITE(16)
    driver.command_timeout = 5.0
    tag = driver.submit(0, 3, write_cdb(4), data_out=bytes(BS), now=100.0, cookie=7)
    other = driver.submit(0, 0, read_cdb(4), data_in=BS, now=100.0)
    device.run()
    assert [c.tag for c in drain(driver, device)] == [other]
    assert driver.next_deadline() == 105.0
    driver.take_kicks()
    assert driver.expire(104.9) == []
    assert driver.expire(105.0) == [tag]
    assert driver.take_kicks() == [CONTROLQ]
    assert driver.expire(200.0) == []  # one abort per command
    device.run()
    (tmf,) = device.tmfs
    assert tmf.subtype == TmfSubtype.ABORT_TASK and tmf.address() == (0, 3)
    assert tmf.tag & 0xFFFF == tag
    (c,) = driver.poll()
    assert c.tag == tag and c.timed_out and c.response == VirtioScsiResponse.ABORTED
    (outcome,) = driver.take_aborts()
    assert (outcome.tag, outcome.cookie, outcome.response) == (
        tag, 7, VirtioScsiResponse.FUNCTION_COMPLETE)
    driver.release(tag)
    assert driver.free_tags == SMALL.tags


def test_release_before_the_abort_completes_defers_the_free() -> None:
    _, _, driver, device = world(hold=lambda h: True)
    driver.command_timeout = 1.0
    tag = driver.submit(0, 0, write_cdb(1), data_out=bytes(BS), now=0.0)
    device.run()
    driver.expire(2.0)
    # The command completes on its own before the device looks at the control queue.
    device.release_held()
    (c,) = driver.poll()
    assert c.good and c.timed_out
    driver.release(tag)
    assert driver.free_tags == SMALL.tags - 1  # the TMF still uses the entry
    device.run()
    driver.poll()
    (outcome,) = driver.take_aborts()
    assert outcome.response == VirtioScsiResponse.FUNCTION_SUCCEEDED
    assert driver.free_tags == SMALL.tags


# -- events -------------------------------------------------------------------------------


def test_event_buffers_are_posted_and_recycled() -> None:
    _memory, _layout, driver, device = world()
    device.run()
    assert len(device.event_chains) == SMALL.event_queue_size
    for i in range(SMALL.event_queue_size * 3):
        assert device.post_event(VirtioScsiEvent.transport_reset(
            0, i % 5, TransportResetReason.RESCAN, missed=i == 1))
        driver.poll()
        device.run()
        (event,) = driver.take_events()
        assert (event.target, event.lun, event.reason, event.missed) == (
            0, i % 5, TransportResetReason.RESCAN, i == 1)
    assert EVENTQ in driver.take_kicks() or True


# -- a new driver object on the same memory ----------------------------------------------


def test_reattach_mid_stream_loses_and_repeats_nothing() -> None:
    memory, layout, driver, device = world()
    driver.command_timeout = 10.0
    data = {i: struct.pack("<I", i) * (BS // 4) for i in range(12)}
    tags = {}
    for i in range(6):
        tags[i] = driver.submit(0, 0, write_cdb(i), data_out=data[i], cookie=100 + i)
    device.run()  # device completed 0..5, driver reaped none
    for i in range(6, 9):  # published, not yet seen by the device
        tags[i] = driver.submit(0, 0, write_cdb(i), data_out=data[i], cookie=100 + i)
    first = driver.poll()[:2]  # reaped two, took their completions
    for c in first:
        driver.release(c.tag)
    taken = {c.cookie for c in first}
    # the process dies here; a new one attaches to the same memory
    del driver
    again = VirtioScsiDriver.attach(memory, layout)
    assert again.unsent == []
    assert set(again.recovered.values()) == {100 + i for i in range(9)} - taken
    device.connect()  # the VF restarts its vrings at used.idx
    device.run()
    completions = again.poll()
    assert all(c.recovered and c.good for c in completions)
    assert {c.cookie for c in completions} | taken == {100 + i for i in range(9)}
    assert len(completions) + len(taken) == 9
    for c in completions:
        again.release(c.tag)
    # every write executed exactly once
    writes = [e for e in device.executed if e.cdb[0] == 0x8A]
    assert len(writes) == 9 and len({e.tag for e in writes}) == 9
    # and the data is there
    for i in range(9):
        again.submit(0, 0, read_cdb(i), data_in=BS)
    device.run()
    got = sorted((c.cdb, c.data) for c in again.poll())
    assert got == sorted((read_cdb(i), data[i]) for i in range(9))


def test_reattach_with_a_prepared_but_unpublished_request_reports_it_unsent() -> None:
    memory, layout, driver, device = world()
    tag = driver.submit(0, 0, write_cdb(1), data_out=bytes(BS), cookie=5, publish=False)
    assert driver.table.read(tag).state is ReqState.PREPARED
    del driver
    again = VirtioScsiDriver.attach(memory, layout)
    assert again.unsent == [(tag, 5)] and again.free_tags == SMALL.tags
    assert device.run() == 0


class Killed(Exception):
    pass


class Fuse:
    """Counts the guest's stores to shared memory; the process 'dies' after ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.armed = False

    def tick(self) -> None:
        if self.armed:
            self.count += 1
            if self.count > self.limit:
                raise Killed


class FusedMemory:
    """GuestMemory whose stores go through a :class:`Fuse` (reads pass straight on)."""

    def __init__(self, inner: RegionMemory, fuse: Fuse) -> None:
        self._inner = inner
        self._fuse = fuse

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._inner, name)
        if name == "write" or name.startswith("store_"):
            def fused(*args: object) -> object:
                self._fuse.tick()
                return attr(*args)
            return fused
        return attr


@pytest.mark.parametrize("in_poll", [False, True])
def test_killed_between_any_two_stores_resumes_exactly(in_poll: bool) -> None:
    """Every kill point, exhaustively (the scenario makes about 100 stores)."""
    for kill_at in range(110):
        _killed_at(kill_at, in_poll)


def _killed_at(kill_at: int, in_poll: bool) -> None:
    """Kill the guest between two of its stores to guest memory (ring updates, request
    table, data), attach a new driver: every write the device saw is executed once and
    its completion delivered once; a write the device never saw is reported unsent or
    left no trace; nothing acknowledged to the submitter is lost."""
    memory, _buf, layout = make_guest()
    fuse = Fuse(kill_at)
    driver = VirtioScsiDriver.create(FusedMemory(memory, fuse), layout)  # type: ignore[arg-type]
    target = Target()
    target.add_lu(0, make_lu())
    device = FakeScsiDevice(memory, layout, {0: target})
    completed: list[int] = []
    submitted: set[int] = set()

    def reap(d: VirtioScsiDriver) -> None:
        for c in d.poll():
            assert c.good
            completed.append(c.cookie)
            d.release(c.tag)

    for i in range(4):
        driver.submit(0, 0, write_cdb(i), data_out=bytes(BS), cookie=i)
        submitted.add(i)
    device.run()
    for ring in driver.rings:
        ring.fault_hook = fuse.tick
    fuse.armed = True
    try:
        if in_poll:
            reap(driver)
        for i in range(4, 8):
            driver.submit(0, 0, write_cdb(i), data_out=bytes(BS), cookie=i)
            submitted.add(i)
        device.run()
        reap(driver)
    except Killed:
        pass
    fuse.armed = False
    again = VirtioScsiDriver.attach(memory, layout)
    unsent = {cookie for _, cookie in again.unsent}
    device.connect()
    device.run()
    reap(again)
    writes = [e for e in device.executed if e.cdb[0] == 0x8A]
    executed = [int.from_bytes(e.cdb[2:10], "big") for e in writes]
    assert len(executed) == len(set(executed)), "a write was executed twice"
    # A completion reaches its owner once, or twice when the process died after the
    # owner's callback and before release() committed (the owner's record of it, in
    # guest memory, makes the second delivery a no-op: Journal.settle is idempotent).
    assert set(completed) == set(executed), "completions != executions"
    assert len(completed) - len(set(completed)) <= 1
    assert submitted <= set(executed), "an acknowledged submission was lost"
    assert not set(executed) & unsent
    assert set(executed) <= set(range(8))
    assert again.free_tags == SMALL.tags


def test_attach_refuses_foreign_memory() -> None:
    memory, _, layout = make_guest()
    with pytest.raises(DriverStateError):
        VirtioScsiDriver.attach(memory, layout)


def test_queue_full_without_indirect() -> None:
    params = LayoutParams(memory_size=2 << 20, request_queues=1, queue_size=4,
                          control_queue_size=4, event_queue_size=2, tags=8, slot_size=4096,
                          journal_size=4096, max_indirect=4)
    memory, _buf, layout = make_guest(params)
    driver = VirtioScsiDriver.create(memory, layout)
    driver.configure(VirtioScsiConfig(), indirect=False)
    driver.submit(0, 0, write_cdb(0), data_out=bytes(BS))  # 3 descriptors of 4
    with pytest.raises(QueueFullError):
        driver.submit(0, 0, write_cdb(0), data_out=bytes(BS))
    assert driver.free_tags == 7


def test_flags_record_the_abort_in_memory() -> None:
    _, _, driver, _device = world(hold=lambda h: True)
    driver.command_timeout = 0.5
    tag = driver.submit(0, 0, write_cdb(1), data_out=bytes(BS), now=0.0)
    driver.expire(1.0)
    flags = driver.table.read(tag).flags
    assert flags & ReqFlag.TIMED_OUT and flags & ReqFlag.ABORT_POSTED


def _abort_killed_at(kill_at: int) -> int:
    memory, _buf, layout = make_guest()
    fuse = Fuse(kill_at)
    driver = VirtioScsiDriver.create(FusedMemory(memory, fuse), layout)  # type: ignore[arg-type]
    driver.command_timeout = 1.0
    target = Target()
    target.add_lu(0, make_lu())
    device = FakeScsiDevice(memory, layout, {0: target}, hold=lambda h: True)
    completed: list[int] = []

    def reap(d: VirtioScsiDriver) -> None:
        for c in d.poll():
            completed.append(c.cookie)
            d.release(c.tag)
        d.take_aborts()

    for i in range(2):
        driver.submit(0, 0, write_cdb(i), data_out=bytes(BS), cookie=i, now=0.0)
    device.run()
    for ring in driver.rings:
        ring.fault_hook = fuse.tick
    fuse.armed = True
    killed = False
    try:
        driver.expire(5.0)
        device.run()  # the TMFs abort the held commands
        reap(driver)
    except Killed:
        killed = True
    fuse.armed = False
    again = VirtioScsiDriver.attach(memory, layout)
    again.command_timeout = 1.0
    device.disconnect()
    device.connect()
    device.run()
    for now in (10.0, 20.0):  # arms the recovered commands, then aborts them
        again.expire(now)
        device.run()
        reap(again)
    assert set(completed) == {0, 1}, (kill_at, completed)
    assert len(completed) - len(set(completed)) <= 1
    assert again.free_tags == SMALL.tags and again.outstanding == 0
    writes = [e for e in device.executed if e.cdb[0] == 0x8A]
    assert len(writes) == 2
    return int(killed)


def test_killed_during_abort_handling_resumes_exactly() -> None:
    kills = sum(_abort_killed_at(k) for k in range(45))
    assert 15 < kills < 45  # every store of the abort path, then runs with no kill
