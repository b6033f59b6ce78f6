"""Each VF as a vhost-user-scsi device, through real processes: the adapter daemon in a
subprocess, the test process as hypervisor (PF client) and as VM (a vhost-user front
end over a shared-memory guest). Claim A10 (IO by virtual disk address, translated by the
VF, bypassing the hypervisor), isolation, the front end's identity, reconnection, the
adaptive doorbell, hot-plug events, and the migration hooks (claims B1-B4, X1)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import ARRAY_WWN, Daemon, make_san
from vf_frontend_helpers import FrontEnd, rw
from vf_test_helpers import (
    VPORT,
    assign_vf0,
    configure,
    lun_bytes,
    mappings,
    mem_path,
    thread_cpu_ticks,
    wait_for,
    wait_state,
)

from vfdirect.adapter.pf_client import PfClient, PfError
from vfdirect.core.rpc import ErrorCode
from vfdirect.core.scsi import Status, decode_sense, parse_report_luns
from vfdirect.core.scsi.sense import (
    ACCESS_DENIED_NO_ACCESS_RIGHTS,
    LBA_OUT_OF_RANGE,
    LOGICAL_UNIT_NOT_SUPPORTED,
)
from vfdirect.core.vhost.messages import ConfigSpace, FrontendRequest, VhostUserMessage
from vfdirect.core.virtio.scsi import (
    EVENTS_MISSED,
    EventType,
    ScsiRequestHeader,
    TmfSubtype,
    TransportResetReason,
    VirtioScsiConfig,
    VirtioScsiResponse,
    encode_lun,
)
from vfdirect.storage import StorageArray

TIMEOUT_S = 10.0
INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])
REPORT_LUNS = bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
READ_CAPACITY_10 = bytes([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0])
_R = VirtioScsiResponse


@pytest.fixture
def san(tmp_path: Path) -> StorageArray:
    return make_san(tmp_path / "san")


#: Events that reveal a bug or a leak; no test may produce one.
BAD_EVENTS = ("vf_internal_error", "pf_internal_error", "vf_unmap_deferred",
              "vf_thread_stuck", "vf_event_failed")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "host1")
    try:
        yield d.wait_ready()
    finally:
        d.stop()
    bad = [e for e in d.events() if e["event"] in BAD_EVENTS]
    assert not bad, bad


@pytest.fixture
def fronts() -> Iterator[list[FrontEnd]]:
    made: list[FrontEnd] = []
    yield made
    for fe in made:
        fe.close()


def connect(fronts: list[FrontEnd], sock: str, tmp: Path, name: str, **kw: object) -> FrontEnd:
    fe = FrontEnd(sock, mem_path(tmp, name), **kw)  # type: ignore[arg-type]
    fronts.append(fe)
    return fe


def sense_of(c: object) -> object:
    return decode_sense(c.sense).sense  # type: ignore[attr-defined]


def verified_io(fe: FrontEnd, target: int, lun: int, lba: int, *, blocks: int = 8,
                queue: int = 2, split: int = 0) -> bytes:
    data = os.urandom(512 * blocks)
    w = fe.scsi(target, lun, rw(0x2A, lba, blocks), data_out=data, queue=queue, split=split)
    assert (w.response, w.status) == (_R.OK, Status.GOOD), w
    r = fe.scsi(target, lun, rw(0x28, lba, blocks), data_in=len(data), queue=queue,
                split=split)
    assert (r.response, r.status, r.resid) == (_R.OK, Status.GOOD, 0), r
    assert r.data == data
    return data


# -- claim A10 --------------------------------------------------------------------------


def test_claim_A10_io_by_virtual_address_bypasses_hypervisor(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    pf = PfClient(daemon.sock, timeout=TIMEOUT_S)
    _, _, lay = configure(pf, san)
    sock = pf.vf_get(0)["socket_path"]
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    fe = connect(fronts, sock, tmp_path, "vm0").setup()
    wait_state(pf, 0, "CONNECTED")
    # discovery by virtual disk address: REPORT LUNS and INQUIRY under target 0
    c = fe.scsi(0, 0, REPORT_LUNS, data_in=256)
    assert (c.response, c.status) == (_R.OK, Status.GOOD)
    luns = parse_report_luns(c.data)
    assert luns == [bytes([0, n, 0, 0, 0, 0, 0, 0]) for n in (0, 1, 2)]
    c = fe.scsi(0, 1, INQUIRY, data_in=96)
    assert c.data[0] == 0 and c.data[8:16] == b"VFDIRECT"
    c = fe.scsi(0, 1, bytes([0x12, 1, 0x80, 0, 64, 0]), data_in=64)  # VPD 80h: serial
    assert b"VFD00000001" in c.data
    c = fe.scsi(0, 0, READ_CAPACITY_10, data_in=8)
    assert (int.from_bytes(c.data[:4], "big"), int.from_bytes(c.data[4:], "big")) == (255, 512)
    # WRITE then READ on vd-b, crossing from LUN 0 to LUN 1, in scattered buffers
    first, second = lay.b.placements[0], lay.b.placements[1]
    lba = first.extent.count - 4
    data = verified_io(fe, 0, 1, lba, blocks=8, split=3)
    # the bytes are in the physical LUN files at the extents the mapping names
    assert lun_bytes(san, int(first.extent.lun.lun), first.extent.start + lba, 4) == data[:2048]
    assert lun_bytes(san, int(second.extent.lun.lun), second.extent.start, 4) == data[2048:]
    # the hypervisor goes away: the direct path carries on (on both request queues)
    pf.close()
    for queue in (2, 3):
        data = verified_io(fe, 0, 0, 17 + queue, queue=queue)
        place = lay.a.placements[0]
        assert lun_bytes(san, int(place.extent.lun.lun), place.extent.start + 17 + queue,
                         8) == data
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf2:
        io = pf2.adapter_get_stats()["vfs"][0]["io"]
    assert io["ios"] >= 9 and io["writes"] == 3 and io["reads"] == 3
    assert io["bytes_out"] == 3 * 4096 and io["errors"]["faults"] == 0
    assert sum(io["latency_us_log2"]) == io["ios"]


def test_frontend_connect_is_the_first_vring_started(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
        configure(pf, san, sentinel=False)
        fe = connect(fronts, pf.vf_get(0)["socket_path"], tmp_path, "vm0")
        fe.setup(vrings=False)  # features and memory table, no ring yet
        reply = fe.request(VhostUserMessage.request_of(
            FrontendRequest.GET_CONFIG, ConfigSpace(0, bytes(36))))
        assert reply is not None and isinstance(reply.payload, ConfigSpace)
        config = VirtioScsiConfig.decode(reply.payload.data)
        assert (config.num_queues, config.sense_size, config.cdb_size, config.max_target,
                config.max_lun, config.seg_max) == (2, 96, 32, 255, 16383, 126)
        time.sleep(0.1)
        assert pf.vf_get(0)["state"] == "ASSIGNED"
        fe.setup()
        wait_state(pf, 0, "CONNECTED")
        verified_io(fe, 0, 0, 0)
        # GET_VRING_BASE stops a ring where the device stands: nothing in flight
        bases = fe.stop()
        assert bases[2] == fe.used_idx(2) == 2 and bases[3] == fe.used_idx(3) == 0
        # RESET_DEVICE (the guest resets the device): rings gone, set up again, served
        fe.setup(events=0)
        assert fe.request(VhostUserMessage.request_of(FrontendRequest.RESET_DEVICE,
                                                      need_reply=True)) is not None
        fe.setup(events=0)
        verified_io(fe, 0, 0, 8)
        assert fe.used_idx(2) == 4
        fe.close()
        wait_state(pf, 0, "ASSIGNED")


# -- isolation --------------------------------------------------------------------------


def test_isolation_addressing_range_and_masking(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
        configure(pf, san, sentinel=False)
        fe = connect(fronts, pf.vf_get(0)["socket_path"], tmp_path, "vm0").setup()
        # a LUN not in the mapping of an existing target: LOGICAL UNIT NOT SUPPORTED
        c = fe.scsi(0, 5, rw(0x28, 0, 1), data_in=512)
        assert (c.response, c.status) == (_R.OK, Status.CHECK_CONDITION)
        assert sense_of(c) == LOGICAL_UNIT_NOT_SUPPORTED
        # a target id the mapping does not have: BAD_TARGET
        c = fe.scsi(3, 0, rw(0x28, 0, 1), data_in=512)
        assert c.response == _R.BAD_TARGET
        # past the end of the vdisk (vd-a: 256 blocks)
        c = fe.scsi(0, 0, rw(0x28, 255, 2), data_in=1024)
        assert c.status == Status.CHECK_CONDITION and sense_of(c) == LBA_OUT_OF_RANGE
        # the mapping names vd-c on LUN 2, never masked to the vport: the fabric refuses
        c = fe.scsi(0, 2, rw(0x28, 0, 1), data_in=512)
        assert c.status == Status.CHECK_CONDITION
        assert sense_of(c) == ACCESS_DENIED_NO_ACCESS_RIGHTS
        c = fe.scsi(0, 2, rw(0x2A, 0, 1), data_out=b"x" * 512)
        assert sense_of(c) == ACCESS_DENIED_NO_ACCESS_RIGHTS
        # a hot revoke stops the very next IO; unbinding the vport hides every target
        verified_io(fe, 0, 1, 0)
        pf.fabric_mask_revoke(VPORT, ARRAY_WWN, [0, 1])
        c = fe.scsi(0, 1, rw(0x28, 0, 1), data_in=512)
        assert sense_of(c) == ACCESS_DENIED_NO_ACCESS_RIGHTS
        pf.vport_unbind(VPORT)
        assert fe.scsi(0, 0, INQUIRY, data_in=96).response == _R.BAD_TARGET
        stats = pf.adapter_get_stats()["vfs"][0]["io"]
    assert stats["errors"]["bad_target"] == 2
    assert stats["errors"]["by_sense_key"]["ILLEGAL_REQUEST"] == 5


def test_a_bad_descriptor_faults_only_that_vf(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
        vm0, _, _ = configure(pf, san)
        fe = connect(fronts, pf.vf_get(0)["socket_path"], tmp_path, "vm0").setup()
        sentinel = connect(fronts, pf.vf_get(1)["socket_path"], tmp_path, "vm1").setup()
        wait_state(pf, 0, "CONNECTED")
        wait_state(pf, 1, "CONNECTED")
        verified_io(fe, 0, 0, 0)
        # a chain whose data-in descriptor points outside the memory table
        driver = fe.drivers[2]
        head = driver.add([(0x100000, 51)], [(0x100100, 108), (0x100200, 512)], 99)
        table = driver.layout.indirect_slot(head)  # an indirect chain: patch its table
        fe.memory.store_u64(table + 16 * 2, 1 << 40)
        driver.publish()
        fe.kick(2)
        vf = wait_state(pf, 0, "ERROR")
        assert "outside guest memory" in vf["error"]
        with pytest.raises((ConnectionError, OSError)):
            fe.request(VhostUserMessage.request_of(FrontendRequest.GET_FEATURES))
        # the sentinel VF keeps serving verified IO
        for lba in range(0, 64, 8):
            verified_io(sentinel, 0, 0, lba)
        assert pf.vf_get(1)["state"] == "CONNECTED"
        # an ERROR VF refuses front ends until it is reset
        refused = connect(fronts, pf.vf_get(0)["socket_path"], tmp_path, "vm0b")
        with pytest.raises((ConnectionError, OSError)):
            refused.setup()
        # vf_reset clears it; assigned again, it serves again
        view = pf.vf_reset(0)
        assert (view["state"], view["error"]) == ("IDLE", None)
        sock = assign_vf0(pf, vm0, os.getpid())
        fe2 = connect(fronts, sock, tmp_path, "vm0c").setup()
        wait_state(pf, 0, "CONNECTED")
        verified_io(fe2, 0, 1, 100)
        io = pf.adapter_get_stats()["vfs"]
    assert io[0]["io"]["errors"]["faults"] == 0  # reset cleared the counters
    assert io[1]["io"]["errors"]["faults"] == 0 and io[1]["io"]["ios"] == 16
    events = [e for e in daemon.events() if e["event"] == "vf_fault"]
    assert len(events) == 1 and events[0]["vf"] == 0


def test_only_the_assigned_vm_process_may_connect(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
        configure(pf, san, sentinel=False)
        sock = pf.vf_get(0)["socket_path"]
        # a child process (another pid) is refused: it reads end-of-stream at once
        code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(5); "
                "s.connect(sys.argv[1]); print('EOF' if s.recv(1) == b'' else 'DATA')")
        child = subprocess.run([sys.executable, "-c", code, sock], capture_output=True,
                               text=True, timeout=30, check=True)
        assert child.stdout.strip() == "EOF"
        refused = [e for e in daemon.events() if e["event"] == "vf_refused"]
        assert refused and "is not the pid" in refused[0]["reason"]
        assert refused[0]["pid"] != os.getpid()
        # the assigned VM connects; a second connection of it is refused meanwhile
        fe = connect(fronts, sock, tmp_path, "vm0").setup()
        wait_state(pf, 0, "CONNECTED")
        second = connect(fronts, sock, tmp_path, "vm0-2")
        with pytest.raises((ConnectionError, OSError)):
            second.setup()
        verified_io(fe, 0, 0, 8)
        # a VF assigned to another process refuses us
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            pf.vf_assign(2, "vm2", sleeper.pid)
            other = connect(fronts, pf.vf_get(2)["socket_path"], tmp_path, "vm2")
            with pytest.raises((ConnectionError, OSError)):
                other.setup()
            assert pf.vf_get(2)["state"] == "ASSIGNED"
        finally:
            sleeper.kill()
            sleeper.wait(TIMEOUT_S)
        pf.vf_unassign(2)
        assert not Path(sock).with_name("vf2.sock").exists()


def test_a_restarted_vm_process_resumes_without_loss_or_repeat(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
        configure(pf, san, sentinel=False)
        sock = pf.vf_get(0)["socket_path"]
        path = mem_path(tmp_path, "vm0")
        fe = FrontEnd(sock, path).setup()
        try:
            # 24 writes published at once, then the VM process "dies" at once
            blocks = {}
            driver = fe.drivers[2]
            for i in range(24):
                data = bytes([i + 1]) * 512
                hdr = 0x100000 + 0x1000 * i
                raw = ScsiRequestHeader.build(0, 0, rw(0x2A, 100 + i, 1)).encode()
                fe.memory.write(hdr, raw)
                fe.memory.write(hdr + 0x100, data)
                driver.add([(hdr, len(raw)), (hdr + 0x100, 512)], [(hdr + 0x400, 108)], i)
                blocks[i] = data
            driver.publish()
            fe.kick(2)
            fe.close(unlink=False)
        except BaseException:
            fe.close()
            raise
        wait_state(pf, 0, "ASSIGNED")
        # a new VM process on the same memory reconnects from the used index
        fe2 = FrontEnd(sock, path, attach=True)
        fronts.append(fe2)
        outstanding = len(fe2.drivers[2].in_flight)
        fe2.setup(events=0)
        wait_state(pf, 0, "CONNECTED")
        fe2.kick(2)
        for _ in range(outstanding):
            _, written = fe2.wait_used(2)
            assert written == 108
        assert not fe2.drivers[2].in_flight
        time.sleep(0.1)
        assert fe2.drivers[2].pop_used() is None  # nothing completed twice
        for i, data in blocks.items():
            r = fe2.scsi(0, 0, rw(0x28, 100 + i, 1), data_in=512)
            assert r.data == data, i
        io = pf.adapter_get_stats()["vfs"][0]["io"]
    assert io["writes"] == 24 and io["reads"] == 24


# -- the doorbell -----------------------------------------------------------------------


def test_an_idle_vf_thread_uses_no_cpu(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
        configure(pf, san, sentinel=False)
        fe = connect(fronts, pf.vf_get(0)["socket_path"], tmp_path, "vm0").setup()
        for lba in range(0, 128, 8):
            verified_io(fe, 0, 0, lba)
        tid = pf.adapter_get_stats()["vfs"][0]["io"]["thread_id"]
        time.sleep(0.2)  # far past the busy-poll budget
        before = thread_cpu_ticks(daemon.proc.pid, tid)
        time.sleep(1.0)
        after = thread_cpu_ticks(daemon.proc.pid, tid)
        assert after - before <= 2, f"idle VF thread used {after - before} ticks in 1 s"
        # and it still wakes up for the next kick
        verified_io(fe, 0, 0, 200)
        io = pf.adapter_get_stats()["vfs"][0]["io"]
    assert io["kicks"] >= 1 and io["notifications"] >= 1


# -- control and event queues -----------------------------------------------------------


def test_control_queue_and_hotplug_events(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
        vm0, _, _ = configure(pf, san, sentinel=False)
        fe = connect(fronts, pf.vf_get(0)["socket_path"], tmp_path, "vm0").setup()
        wait_state(pf, 0, "CONNECTED")
        assert fe.tmf(TmfSubtype.ABORT_TASK, 0, 0, tag=5) == _R.FUNCTION_COMPLETE
        assert fe.tmf(TmfSubtype.LOGICAL_UNIT_RESET, 0, 9) == _R.INCORRECT_LUN
        assert fe.tmf(TmfSubtype.I_T_NEXUS_RESET, 4, 0) == _R.BAD_TARGET
        an = fe.an_query(0, 0, 0x7E)
        assert (an.event_actual, an.response) == (0, _R.OK)
        # the mapping loses (0, 2) and gains (1, 7): REMOVED and RESCAN, per LUN
        changed = dict(vm0)
        moved = dict(vm0["luns"][2], target=1, lun=7)
        changed["luns"] = [*vm0["luns"][:2], moved]
        pf.mapping_load(0, changed)
        events = fe.events(2)
        assert [(e.kind, e.lun, e.reason) for e in events] == [
            (EventType.TRANSPORT_RESET, encode_lun(0, 2), TransportResetReason.REMOVED),
            (EventType.TRANSPORT_RESET, encode_lun(1, 7), TransportResetReason.RESCAN)]
        c = fe.scsi(1, 7, INQUIRY, data_in=96)
        assert (c.response, c.status) == (_R.OK, Status.GOOD)
        # unbinding the vport removes every LUN
        pf.vport_unbind(VPORT)
        assert sorted(e.lun for e in fe.events(3)) == sorted(
            encode_lun(t, n) for t, n in ((0, 0), (0, 1), (1, 7)))
        stats = pf.adapter_get_stats()["vfs"][0]["io"]
    assert stats["tmfs"] == 3 and stats["events_posted"] == 5


def test_events_dropped_without_buffers_are_reported_missed(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
        configure(pf, san, sentinel=False)
        fe = connect(fronts, pf.vf_get(0)["socket_path"], tmp_path, "vm0").setup(events=0)
        wait_state(pf, 0, "CONNECTED")
        pf.mapping_unload(0)
        time.sleep(0.1)
        fe.post_event_buffer()
        fe.kick(1)
        (event,) = fe.events(1)
        assert event.event == EventType.NO_EVENT | EVENTS_MISSED
        stats = pf.adapter_get_stats()["vfs"][0]["io"]
    assert stats["events_missed"] == 3


# -- migration hooks --------------------------------------------------------------------


def test_quiesce_drain_save_revoke_then_restore_resume(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
        configure(pf, san, sentinel=False)
        fe = connect(fronts, pf.vf_get(0)["socket_path"], tmp_path, "vm0").setup()
        wait_state(pf, 0, "CONNECTED")
        first = verified_io(fe, 0, 1, 40)
        assert pf.vf_quiesce(0) == 0  # claim B1
        # the guest keeps submitting: the request waits in the available ring
        data = os.urandom(4096)
        raw = ScsiRequestHeader.build(0, 1, rw(0x2A, 48, 8)).encode()
        fe.memory.write(0x100000, raw)
        fe.memory.write(0x100100, data)
        fe.submit(2, [(0x100000, len(raw)), (0x100100, 4096)], [(0x102000, 108)])
        with pytest.raises(TimeoutError):
            fe.wait_used(2, timeout=0.3)
        assert pf.vf_drain(0, 1000) == (True, [])  # claim B2
        record, fds = pf.vf_state_save(0)  # claims B3, B4
        try:
            assert pf.vf_get(0)["state"] == "SAVED"
            assert record["format"] == "vfdirect.vf-queue-state"
            q2 = next(q for q in record["queues"] if q["index"] == 2)["state"]
            assert (q2["last_avail_idx"], q2["used_idx"], q2["in_flight"]) == (2, 2, [])
            assert len(fds) == 1 + 2 * len(record["queues"])
            # the DMA window is revoked: the adapter no longer maps the guest's memory
            maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
            assert fe.shm.path is not None and str(fe.shm.path) not in maps
            with pytest.raises(PfError) as info:
                pf.vf_resume(0)
            assert info.value.code is ErrorCode.WRONG_STATE
            # claim X1: abort, back to the source VF at the saved positions
            pf.vf_state_restore(0, record, fds)
        finally:
            for fd in fds:
                os.close(fd)
        assert pf.vf_get(0)["state"] == "QUIESCED"
        pf.vf_resume(0)
        assert pf.vf_get(0)["state"] == "CONNECTED"
        _, written = fe.wait_used(2)
        assert written == 108
        r = fe.scsi(0, 1, rw(0x28, 40, 16), data_in=8192)
        assert r.data == first + data
        # a tampered record is refused before anything in it is trusted
        pf.vf_quiesce(0)
        record, fds = pf.vf_state_save(0)
        try:
            record["queues"][0]["index"] = 9
            with pytest.raises(PfError) as info:
                pf.vf_state_restore(0, record, fds)
            assert info.value.code is ErrorCode.INVALID_PARAMS
            assert "checksum" in info.value.message
        finally:
            for fd in fds:
                os.close(fd)
        assert pf.vf_get(0)["state"] == "SAVED"
        # the VM goes away while SAVED; the VF is released by the PF
        fe.close()
        wait_for("the disconnect to be logged", lambda: any(
            e["event"] == "vf_disconnect" for e in daemon.events()))
        pf.vf_unassign(0)
        assert pf.vf_get(0)["state"] == "IDLE"


def test_the_test_layouts_do_not_overlap(san: StorageArray) -> None:
    _, _, lay = mappings(san)
    spans = sorted((p.extent.lun, p.extent.start, p.extent.end)
                   for v in (lay.a, lay.b, lay.c, lay.s) for p in v.placements)
    for (la, _, ea), (lb, sb, _) in itertools.pairwise(spans):
        assert la != lb or ea <= sb


def test_saved_queue_state_resumes_on_another_vf(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    """Claims B3, B7 in one adapter: VF 0's saved queue state (and the VM's memory and
    eventfds) loaded into VF 2, bound to the same vport with the same mapping: the
    request that waited in the ring through the hand-off completes through VF 2, and
    the VM's next requests too, while its front end stays connected to VF 0's socket."""
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
        vm0, _, lay = configure(pf, san, sentinel=False)
        fe = connect(fronts, pf.vf_get(0)["socket_path"], tmp_path, "vm0").setup()
        wait_state(pf, 0, "CONNECTED")
        verified_io(fe, 0, 0, 0)
        pf.vf_quiesce(0)
        data = os.urandom(512)
        raw = ScsiRequestHeader.build(0, 0, rw(0x2A, 30, 1)).encode()
        fe.memory.write(0x100000, raw)
        fe.memory.write(0x100100, data)
        fe.submit(2, [(0x100000, len(raw)), (0x100100, 512)], [(0x102000, 108)])
        assert pf.vf_drain(0, 1000)[0]
        record, fds = pf.vf_state_save(0)
        try:
            # the destination VF: same VM, the vport moves over, the same mapping
            pf.vport_unbind(VPORT)
            pf.vf_assign(2, "vm0", os.getpid())
            pf.vport_bind(VPORT, 2)
            pf.mapping_load(2, vm0)
            assert pf.vf_state_restore(2, record, fds)["state"] == "QUIESCED"
        finally:
            for fd in fds:
                os.close(fd)
        pf.vf_resume(2)
        _, written = fe.wait_used(2)
        assert written == 108
        place = lay.a.placements[0]
        assert lun_bytes(san, int(place.extent.lun.lun), place.extent.start + 30, 1) == data
        verified_io(fe, 0, 1, 64, queue=3)
        stats = pf.adapter_get_stats()["vfs"]
        assert stats[2]["io"]["writes"] == 2 and stats[2]["io"]["reads"] == 1
        pf.vf_unassign(0)  # the source releases its VF (commit)
        verified_io(fe, 0, 0, 31)
        # reset of the destination stops it touching the VM's memory
        pf.vf_reset(2)
        maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
        assert fe.shm.path is not None and str(fe.shm.path) not in maps


def test_adapter_shutdown_disconnects_front_ends_and_removes_sockets(
        tmp_path: Path, san: StorageArray, fronts: list[FrontEnd]) -> None:
    d = Daemon(tmp_path / "host1").wait_ready()
    try:
        with PfClient(d.sock, timeout=TIMEOUT_S) as pf:
            configure(pf, san)
            socks = [Path(pf.vf_get(i)["socket_path"]) for i in (0, 1)]
            fe = connect(fronts, str(socks[0]), tmp_path, "vm0").setup()
            wait_state(pf, 0, "CONNECTED")
            verified_io(fe, 0, 0, 0)
        assert d.stop() == 0
    finally:
        d.stop()
    assert not any(s.exists() for s in socks)
    fe.sock.settimeout(TIMEOUT_S)
    assert fe.sock.recv(1) == b""
    events = [e["event"] for e in d.events()]
    assert events.count("vf_thread_stopped") == 2 and events[-1] != "pf_internal_error"


# -- the guest runtime on the VF ----------------------------------------------------------


class _Vm:
    """``vfdirect vm-run`` started paused; assigned the VF by its pid, then let go."""

    def __init__(self, tmp: Path, mem: Path, sock: str, *args: str) -> None:
        self.log_path = tmp / f"vm-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in finish())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vfdirect.cli.vm_run", "--memory-file", str(mem),
             "--socket", sock, "--paused", "--log-format", "json", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, text=True)
        try:
            wait_for("the VM to boot paused",
                     lambda: "vm_paused" in self.log_path.read_text(), timeout=30)
        except BaseException:
            self.kill()
            raise

    def go(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)

    def finish(self, timeout: float = 120) -> dict[str, object]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            self.kill()
        assert self.proc.returncode == 0, (out, self.log_path.read_text()[-2000:])
        return dict(json.loads(out.strip().splitlines()[-1]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def test_the_guest_runtime_runs_on_the_vf_and_survives_kill_9(
        tmp_path: Path, daemon: Daemon, san: StorageArray) -> None:
    """The VM process of the guest runtime (its own vhost-user front end and virtio-scsi
    driver) on the VF: the selftest, then numbered writes killed with SIGKILL half-way and
    finished by a restarted process on the same memory (every acknowledged block reads
    back; nothing lost or repeated through the reconnection)."""
    mem = mem_path(tmp_path, "guest")
    vms: list[_Vm] = []
    try:
        with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
            vm0, _, _ = configure(pf, san, pid=1, sentinel=False)
            only_masked = dict(vm0, luns=vm0["luns"][:2])
            pf.vf_reset(0)
            sock = str(Path(daemon.sock).with_name("vf0.sock"))

            def start(*args: str) -> _Vm:
                vm = _Vm(tmp_path, mem, sock, *args)
                vms.append(vm)
                assign_vf0(pf, only_masked, vm.proc.pid)
                vm.go()
                return vm

            result = start("--workload", "selftest").finish()
            assert result["ok"] and len(result["disks"]) == 2  # type: ignore[arg-type]
            wait_state(pf, 0, "ASSIGNED")
            pf.vf_unassign(0)
            mem.unlink()
            vm = start("--workload", "sequence", "--count", "2000", "--depth", "8")
            wait_for("writes to flow", lambda: pf.adapter_get_stats()["vfs"][0]["io"]
                     ["writes"] > 300, timeout=30)
            vm.kill()
            wait_state(pf, 0, "ASSIGNED")
            pf.vf_unassign(0)
            result = start("--workload", "sequence", "--count", "2000", "--depth", "8",
                           "--restart").finish()
            assert result["ok"] and result["acked"] == 2000 and result["failed"] == 0
    finally:
        for vm in vms:
            vm.kill()
        mem.unlink(missing_ok=True)
