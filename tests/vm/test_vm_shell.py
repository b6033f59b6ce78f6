"""The VM shell in-process against a vhost-user back end over a real socket: the
front-end handshake, GET_CONFIG, the SCSI host (kicks, busy poll, call eventfds),
discovery, asynchronous block IO with a queue depth, errors, timeouts with ABORT TASK,
rescan events, and reconnecting with base = used.idx."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_backend import FakeVhostBackend
from guest_device import make_lu
from vm_helpers import shm_path, unlink

from vfdirect.core.block import MediumError
from vfdirect.core.guest.fwtable import FirmwareTable, FwDisk
from vfdirect.core.guest.layout import LayoutParams
from vfdirect.core.scsi import LogicalUnit, LuIdentity, Target
from vfdirect.core.scsi.sense import SenseKey
from vfdirect.core.virtio.features import VirtioFeature, has
from vfdirect.core.virtio.scsi import (
    TmfSubtype,
    TransportResetReason,
    VirtioScsiEvent,
)
from vfdirect.core.wwn import Wwn
from vfdirect.storage.memory import MemoryBackend
from vfdirect.vm.block import BlockLayer, CheckConditionError, IoRequest, IoTimeout
from vfdirect.vm.frontend import ConnectError, VhostUserFrontend
from vfdirect.vm.guest import Guest, boot_guest
from vfdirect.vm.scsi import ScsiHost

PARAMS = LayoutParams(memory_size=8 << 20, request_queues=2, queue_size=64, tags=64,
                      slot_size=64 << 10, journal_size=64 << 10)
DEADLINE_S = 10.0


class FlakyDevice(MemoryBackend):
    """Reads of LBA 13 fail (EIO)."""

    def read_blocks(self, lba: int, bufs: list[memoryview]) -> None:  # type: ignore[override]
        if lba <= 13 < lba + sum(len(b) for b in bufs) // self.block_size:
            raise MediumError("bad block 13", write=False)
        super().read_blocks(lba, bufs)


def targets() -> dict[int, Target]:
    t0, t2 = Target(), Target()
    t0.add_lu(0, make_lu(512, serial="SER-A", n=1))
    t0.add_lu(1, make_lu(4096, serial="SER-B", n=2))
    flaky = LuIdentity("VFDIRECT", "VDISK", "0001", "SER-C", Wwn.naa5(0x9009))
    t2.add_lu(5, LogicalUnit(FlakyDevice(512, 64), flaky))
    return {0: t0, 2: t2}


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[FakeVhostBackend]:
    b = FakeVhostBackend(tmp_path / "vf0.sock", targets())
    b.start()
    yield b
    b.stop()
    assert not b.errors, b.errors


@pytest.fixture
def guest() -> Iterator[Guest]:
    path = shm_path("shell")
    g = boot_guest(path, params=PARAMS)
    yield g
    g.close()
    unlink(path)


def fwtable() -> FirmwareTable:
    port = Wwn.naa5(0x6101)
    return FirmwareTable("vm0", "id0", None, (
        FwDisk(port, 0, 0, "vd-a", 512, 512, "SER-A", Wwn.naa5(0x9001)),
        FwDisk(port, 0, 1, "vd-b", 4096, 512, "SER-B", Wwn.naa5(0x9002)),
        FwDisk(port, 2, 5, "vd-c", 64, 512, "SER-C", Wwn.naa5(0x9009))))


def connect(guest: Guest, backend: FakeVhostBackend, **kw: float) -> tuple[
        VhostUserFrontend, ScsiHost, BlockLayer]:
    import time  # noqa: PLC0415

    frontend = VhostUserFrontend(backend.path)
    frontend.connect(guest, deadline=time.monotonic() + DEADLINE_S)
    host = ScsiHost(guest, frontend, **kw)
    layer = BlockLayer(host, fwtable())
    return frontend, host, layer


def test_handshake_negotiates_and_hands_over_memory(guest: Guest,
                                                    backend: FakeVhostBackend) -> None:
    import os  # noqa: PLC0415

    frontend, _, _ = connect(guest, backend)
    try:
        assert backend.connected.wait(DEADLINE_S)
        n = frontend.negotiated
        assert n is not None
        for feature in (VirtioFeature.VERSION_1, VirtioFeature.RING_EVENT_IDX,
                        VirtioFeature.RING_INDIRECT_DESC):
            assert has(n.features, feature)
        assert n.num_queues == 4 and frontend.request_queues == 2
        assert frontend.config is not None and frontend.config.max_target == 15
        assert frontend.bases == {0: 0, 1: 0, 2: 0, 3: 0}
        assert backend.peer_pids == [os.getpid()]
        assert backend.bases == [{0: 0, 1: 0, 2: 0, 3: 0}]
    finally:
        frontend.close()


def test_scan_finds_the_luns_and_skips_absent_ones(guest: Guest,
                                                   backend: FakeVhostBackend) -> None:
    frontend, _, layer = connect(guest, backend)
    try:
        disks = layer.scan()
        assert [(d.name, d.target, d.lun, d.num_blocks, d.block_size, d.serial)
                for d in disks] == [("sda", 0, 0, 512, 512, "SER-A"),
                                    ("sdb", 0, 1, 4096, 512, "SER-B"),
                                    ("sdc", 2, 5, 64, 512, "SER-C")]
        assert disks[0].wwn == Wwn.naa5(0x9001).canonical()
        # without a firmware table: every target up to max_target (15) is probed
        layer.fwtable = None
        assert [d.name for d in layer.scan()] == ["sda", "sdb", "sdc"]
    finally:
        frontend.close()


def test_async_io_with_queue_depth_byte_for_byte(guest: Guest,
                                                 backend: FakeVhostBackend) -> None:
    frontend, host, layer = connect(guest, backend)
    try:
        layer.scan()
        disk = layer.disks["sdb"]
        disk.queue_depth = 16
        peak = [0]
        done: list[IoRequest] = []

        def callback(request: IoRequest) -> None:
            done.append(request)

        payloads = {lba: bytes([lba % 251]) * 512 * 8 for lba in range(0, 40 * 8, 8)}
        backend.set_hold(lambda h: h.cdb[0] == 0x8A)  # let writes pile up in the device
        requests = [disk.submit_write(lba, data, callback=callback)
                    for lba, data in payloads.items()]
        assert len(disk.pending) == 40 - 16 and disk.in_flight == 16
        peak[0] = disk.in_flight
        backend.set_hold(lambda h: False)
        backend.release_held()
        layer.wait(requests, DEADLINE_S)
        assert all(r.error is None for r in requests) and len(done) == 40
        assert peak[0] == 16 and host.outstanding == 0
        reads = [disk.submit_read(lba, 8) for lba in payloads]
        layer.wait(reads, DEADLINE_S)
        assert [r.result() for r in reads] == list(payloads.values())
        # FUA and flush reach the device
        disk.write(5, b"\xa5" * 512 * 3, fua=True)
        disk.flush()
        assert disk.read(5, 3) == b"\xa5" * 512 * 3
        fua = [e for e in backend.device.executed if e.cdb[0] == 0x8A and e.cdb[1] & 0x08]
        assert len(fua) == 1
        assert any(e.cdb[0] == 0x91 for e in backend.device.executed)
        # large transfers are split into slot-sized commands
        big = bytes(range(256)) * 2 * 300  # 300 blocks > 128 per command
        disk.write(1000, big)
        assert disk.read(1000, 300) == big
    finally:
        frontend.close()


def test_check_condition_is_a_typed_error_with_sense(guest: Guest,
                                                     backend: FakeVhostBackend) -> None:
    frontend, _, layer = connect(guest, backend)
    try:
        layer.scan()
        disk = layer.disks["sdc"]
        with pytest.raises(CheckConditionError) as info:
            disk.read(10, 8)
        assert info.value.sense is not None
        assert info.value.sense.sense.key == SenseKey.MEDIUM_ERROR
        assert info.value.disk == "sdc" and info.value.lba == 10
        assert disk.read(20, 2) == bytes(1024)  # the disk still works
    finally:
        frontend.close()


def test_timeout_sends_abort_task(guest: Guest, backend: FakeVhostBackend) -> None:
    frontend, host, layer = connect(guest, backend, command_timeout=0.2)
    try:
        layer.scan()
        disk = layer.disks["sda"]
        backend.set_hold(lambda h: h.cdb[0] == 0x8A)
        request = disk.submit_write(3, bytes(512))
        layer.wait([request], DEADLINE_S)
        assert isinstance(request.error, IoTimeout)
        (tmf,) = backend.device.tmfs
        assert tmf.subtype == TmfSubtype.ABORT_TASK and tmf.address() == (0, 0)
        backend.set_hold(lambda h: False)
        assert host.driver.free_tags == PARAMS.tags
        disk.write(3, b"\x01" * 512)
        assert disk.read(3, 1) == b"\x01" * 512
    finally:
        frontend.close()


def test_rescan_and_removed_events_reach_the_block_layer(guest: Guest,
                                                         backend: FakeVhostBackend) -> None:
    frontend, _, layer = connect(guest, backend)
    try:
        layer.scan()
        t2 = backend.device.targets[2]
        backend.do(lambda: t2.add_lu(6, make_lu(32, serial="SER-D", n=4)))
        assert backend.post_event(VirtioScsiEvent.transport_reset(
            2, 6, TransportResetReason.RESCAN))
        for _ in range(50):
            layer.poll(0.05)
            if "sdd" in layer.disks:
                break
        assert layer.disks["sdd"].address == (2, 6) and layer.disks["sdd"].serial == "SER-D"
        backend.do(lambda: t2.remove_lu(6))
        assert backend.post_event(VirtioScsiEvent.transport_reset(
            2, 6, TransportResetReason.REMOVED))
        for _ in range(50):
            layer.poll(0.05)
            if not layer.disks["sdd"].present:
                break
        assert not layer.disks["sdd"].present
        assert [c["event"] for c in layer.changes] == ["added"] * 4 + ["removed"]
    finally:
        frontend.close()


def test_reconnect_resumes_at_used_idx(guest: Guest, backend: FakeVhostBackend) -> None:
    import time  # noqa: PLC0415

    frontend, host, layer = connect(guest, backend)
    layer.scan()
    disk = layer.disks["sda"]
    for i in range(10):
        disk.write(i, bytes([i]) * 512)
    used = {i: guest.driver.used_index(i) for i in range(4)}
    assert used[2] + used[3] > 10
    frontend.close()
    assert backend.disconnected.wait(DEADLINE_S)
    again = VhostUserFrontend(backend.path)
    again.connect(guest, deadline=time.monotonic() + DEADLINE_S)
    try:
        assert again.bases == used and backend.bases[-1] == used
        host.frontend = again
        for i in range(10):
            assert disk.read(i, 1) == bytes([i]) * 512
    finally:
        again.close()


def test_connect_gives_up_at_the_deadline(guest: Guest, tmp_path: Path) -> None:
    import time  # noqa: PLC0415

    frontend = VhostUserFrontend(tmp_path / "nobody.sock")
    start = time.monotonic()
    with pytest.raises(ConnectError, match="cannot start the VF"):
        frontend.connect(guest, deadline=start + 0.3)
    assert time.monotonic() - start < 2.0


def test_the_host_reconnects_when_the_back_end_drops_us(guest: Guest,
                                                        backend: FakeVhostBackend) -> None:
    import time  # noqa: PLC0415

    frontend, host, layer = connect(guest, backend)
    host.reconnect = lambda: frontend.connect(guest, deadline=time.monotonic() + DEADLINE_S)
    try:
        layer.scan()
        disk = layer.disks["sda"]
        backend.set_hold(lambda h: h.cdb[0] == 0x8A)
        requests = [disk.submit_write(i, bytes([i + 1]) * 512) for i in range(5)]
        while len(backend.device.held) < 5:
            layer.poll(0.01)
        backend.drop_connection()  # completes the held writes, then closes
        layer.wait(requests, DEADLINE_S)
        assert all(r.error is None for r in requests)
        backend.set_hold(lambda h: False)
        # the next command finds the connection gone while it waits, and reconnects
        assert disk.read(0, 5) == b"".join(bytes([i + 1]) * 512 for i in range(5))
        assert host.reconnects == 1 and backend.connections == 2
        writes = [e for e in backend.device.executed if e.cdb[0] == 0x8A]
        assert len(writes) == 5
    finally:
        frontend.close()


def test_sequence_resubmits_only_what_the_device_never_saw(guest: Guest,
                                                           backend: FakeVhostBackend) -> None:
    """Journal entries left PENDING by a killed process: the ones the driver found in
    the device complete (recovered); the others are submitted again, once."""
    from vfdirect.core.guest.journal import (  # noqa: PLC0415
        COOKIE_BASE,
        EntryState,
        make_block,
    )
    from vfdirect.vm.workload import Sequence, settle_orphan  # noqa: PLC0415

    frontend, host, layer = connect(guest, backend)
    try:
        layer.scan()
        journal = guest.journal
        seq = Sequence(layer, journal, vm=1, count=12, depth=4, interval=0.0,
                       in_device={COOKIE_BASE | 1}, should_stop=lambda: False)
        for n in range(3):  # the killed process journaled 0..2, only 1 reached the device
            disk, lba, gen = seq.plan(n)
            crc = zlib.crc32(make_block(1, lba, gen, n, disk.block_size))
            journal.record_pending(n, target=disk.target, lun=disk.lun, lba=lba,
                                   generation=gen, crc=crc)
        host.on_orphan = lambda c: settle_orphan(journal, c)
        journal.settle(1, EntryState.ACKED)  # as its recovered completion would
        result = seq.run()
        assert result["resubmitted_unsent"] == 2 and result["submitted"] == 2 + 9
        assert result["acked"] == 12 and result["verified_blocks"] == 11
        # (entry 1 was settled by hand here: its block was never written, and it shows)
        assert len(result["errors"]) == 1 and result["errors"][0].startswith("seq 1 ")
        writes = [e for e in backend.device.executed if e.cdb[0] == 0x8A]
        assert len(writes) == 11
    finally:
        frontend.close()


def test_verify_workload_checks_every_read_against_the_journal(
        guest: Guest, backend: FakeVhostBackend) -> None:
    """verify: a clean run (with a journal checkpoint), then a block changed behind its
    back and a disk with a bad block: both are reported, and the run is not ok."""
    from vfdirect.core.guest.journal import make_block  # noqa: PLC0415
    from vfdirect.vm.verify import Verify  # noqa: PLC0415

    frontend, _, layer = connect(guest, backend)
    try:
        layer.scan()

        def run(**kw: object) -> dict[str, object]:
            options: dict[str, object] = {"count": 400, "window": 8, "seed": 7, **kw}
            return Verify(layer, guest.journal, vm=1, depth=4, in_device=set(),
                          should_stop=lambda: False, **options).run()  # type: ignore[arg-type]

        # 2400 writes into a 2046-entry journal: compacted at least once, nothing lost
        clean = run(count=3000, read_pct=20)
        assert clean["ok"] and clean["errors"] == 0 and clean["checkpoints"] >= 1, clean
        assert clean["verified"] > 0 and clean["final_checked"] == clean["final_lbas"] == 24
        again = run(read_pct=100)  # a new run on the same journal: same expectations
        assert again["ok"] and again["writes"] == 0 and again["verified"] == 400 + 24
        sda = layer.disks["sda"]
        sda.write(3, make_block(1, 3, 999, 0, sda.block_size))  # not what was acked
        stale = run(count=1, read_pct=100)
        assert not stale["ok"] and stale["mismatches"] >= 1
        assert any("lba 3" in d for d in stale["error_details"])  # type: ignore[attr-defined]
        bad = run(count=200, read_pct=100, window=16)  # sdc's LBA 13 reads fail
        assert not bad["ok"] and bad["io_errors"] >= 1
    finally:
        frontend.close()


def test_load_workload_reports_iops_and_latency(guest: Guest,
                                                backend: FakeVhostBackend) -> None:
    from vfdirect.vm.verify import Load  # noqa: PLC0415

    frontend, _, layer = connect(guest, backend)
    try:
        layer.scan()
        result = Load(layer, depth=6, read_pct=60, bs=4, count=300, seed=3,
                      should_stop=lambda: False).run()
        assert result["ios"] == 300 and result["reads"] + result["writes"] == 300
        assert result["iops"] > 0 and result["latency"]["max_us"] > 0
        # sdc has a bad block: reads there may fail, and it shows
        assert result["ok"] == (result["errors"] == 0)
    finally:
        frontend.close()
