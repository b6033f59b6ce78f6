"""The hypervisor's mediated IO path, end to end with real processes: an adapter daemon,
a VM process running the ``verify`` workload on VF 0, and this test as the hypervisor
(claims B1, B3, B4, B5, B6, X5, X1).

Every test ends the same way: the mediated path is stopped, its record goes back into
the VF (``vf_state_restore``, ``vf_resume``), the VM is stopped with SIGTERM and its
verifier must report no error and no mismatch."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

_TESTS = Path(__file__).resolve().parents[1]
for _sub in ("adapter", "vm"):
    if str(_TESTS / _sub) not in sys.path:
        sys.path.insert(0, str(_TESTS / _sub))

from daemon_helpers import ARRAY_WWN, Daemon, make_san, vm_mapping  # noqa: E402
from vf_frontend_helpers import FrontEnd  # noqa: E402
from vf_test_helpers import VPORT as VPORT_VF  # noqa: E402
from vf_test_helpers import configure, mem_path, wait_state  # noqa: E402
from vm_helpers import VmProc, shm_path, unlink  # noqa: E402

from vfdirect.adapter.pf_client import PfClient  # noqa: E402
from vfdirect.core.adapter.vf_state import VfQueueRecord  # noqa: E402
from vfdirect.core.guest.fwtable import FirmwareTable, FwDisk  # noqa: E402
from vfdirect.core.guest.layout import HEADER_ADDR, GuestLayout  # noqa: E402
from vfdirect.core.virtio import RegionMemory  # noqa: E402
from vfdirect.core.virtio.scsi import (  # noqa: E402
    ScsiRequestHeader,
    TmfSubtype,
    VirtioScsiResponse,
)
from vfdirect.core.wwn import Wwn  # noqa: E402
from vfdirect.host.mediated import MediatedError, MediatedPath  # noqa: E402
from vfdirect.storage import StorageArray  # noqa: E402
from vfdirect.transport.shm import SharedMemory  # noqa: E402

pytestmark = pytest.mark.timeout(180)

VPORT = Wwn.naa5(0x6401)
VPORT_NN = Wwn.naa5(0x6402)
TIMEOUT_S = 20.0
PAGE = 4096


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def array(tmp_path: Path) -> StorageArray:
    return make_san(tmp_path / "san")


@pytest.fixture
def adapter(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "host1")
    try:
        yield d.wait_ready()
    finally:
        d.stop()


@pytest.fixture
def memfile(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = shm_path("med-" + request.node.name[:32])
    yield path
    unlink(path)


class Rig:
    """The hypervisor's side: its PF connection, the VM, the guest memory it reads."""

    def __init__(self, adapter: Daemon, pf: PfClient, vm: VmProc, memfile: Path) -> None:
        self.adapter = adapter
        self.pf = pf
        self.vm = vm
        self.memfile = memfile
        self.mediated: MediatedPath | None = None
        self.mediated_pf: PfClient | None = None

    # -- guest memory, read as the hypervisor may ----------------------------------------

    def rings(self) -> list[tuple[int, int, int]]:
        """(vring index, avail.idx, used.idx) of every request queue, from guest memory."""
        shm = SharedMemory.open(self.memfile)
        try:
            memory = RegionMemory.from_buffers([(0, shm.buffer)])
            layout = GuestLayout.decode_header(memory.read(HEADER_ADDR, 0x40), shm.size)
            out = [(i, memory.load_u16(q.avail_addr + 2), memory.load_u16(q.used_addr + 2))
                   for i, q in enumerate(layout.queues) if i >= 2]
            del memory
        finally:
            shm.close()
        return out

    def layout(self) -> GuestLayout:
        shm = SharedMemory.open(self.memfile)
        try:
            memory = RegionMemory.from_buffers([(0, shm.buffer)])
            layout = GuestLayout.decode_header(memory.read(HEADER_ADDR, 0x40), shm.size)
            del memory
        finally:
            shm.close()
        return layout

    # -- the adapter ---------------------------------------------------------------------

    def vf_io(self) -> dict[str, Any]:
        return dict(self.pf.adapter_get_stats()["vfs"][0]["io"] or {})

    def pf_io(self) -> dict[str, Any]:
        return dict(self.pf.adapter_get_stats()["pf_io"])

    def wait_vf_io(self, at_least: int) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            io = self.vf_io()
            if io.get("reads", 0) + io.get("writes", 0) >= at_least:
                return
            assert time.monotonic() < deadline, f"the VF did only {io}"
            assert self.vm.proc.poll() is None, self.vm.err_path.read_text()
            time.sleep(0.02)

    def hand_off(self) -> tuple[dict[str, Any], list[int]]:
        """Claims B1-B4: quiesce, drain, save."""
        self.pf.vf_quiesce(0)
        drained, heads = self.pf.vf_drain(0, 5000)
        assert drained and heads == []
        return self.pf.vf_state_save(0)

    def mediate(self, record: dict[str, Any], fds: list[int]) -> MediatedPath:
        self.mediated_pf = PfClient(self.adapter.sock, timeout=TIMEOUT_S)
        self.mediated = MediatedPath(record, fds, self.mediated_pf, wwpn=VPORT.canonical())
        self.mediated.start()
        return self.mediated

    def wait_mediated(self, requests: int) -> None:
        assert self.mediated is not None
        deadline = time.monotonic() + TIMEOUT_S
        while self.mediated.stats()["requests"] < requests:
            assert time.monotonic() < deadline, self.mediated.stats()
            assert self.vm.proc.poll() is None, self.vm.err_path.read_text()
            time.sleep(0.02)

    def back_to_vf(self) -> dict[str, Any]:
        """Claim X1: the mediated path's record goes back into the VF, which resumes."""
        assert self.mediated is not None
        record, fds = self.mediated.stop(TIMEOUT_S)
        self.pf.vf_state_restore(0, record, fds)
        self.close_mediated()
        self.pf.vf_resume(0)
        return record

    def close_mediated(self) -> None:
        if self.mediated is not None:
            self.mediated.close()
            self.mediated = None
        if self.mediated_pf is not None:
            self.mediated_pf.close()
            self.mediated_pf = None

    def finish(self) -> dict[str, Any]:
        """SIGTERM the VM; its verifier's result, which must be clean."""
        self.vm.stop()
        code, result = self.vm.result(timeout=TIMEOUT_S)
        assert code == 0, result
        assert result["ok"], result
        assert result["errors"] == 0 and result["mismatches"] == 0, result
        return result


@pytest.fixture
def rig(tmp_path: Path, array: StorageArray, adapter: Daemon,
        memfile: Path) -> Iterator[Rig]:
    """A VM running the verify workload on VF 0, the direct path busy."""
    pf = PfClient(adapter.sock, timeout=TIMEOUT_S)
    vm: VmProc | None = None
    r: Rig | None = None
    try:
        pf.array_attach(array.directory)
        pf.vf_enable(2)
        pf.vport_create(VPORT, VPORT_NN)
        pf.fabric_zone_create("vm0", [VPORT, *array.target_ports])
        pf.fabric_mask_grant(VPORT, ARRAY_WWN, [0, 1, 2])
        doc, _ = vm_mapping(array)
        sock = str(adapter.run_dir / "vf0.sock")
        table = FirmwareTable("vm0", "vm0-uuid", sock, tuple(
            FwDisk(VPORT, e["target"], e["lun"], e["vdisk_id"], e["capacity_blocks"],
                   e["block_size"], e["serial"], Wwn.parse(e["wwn"])) for e in doc["luns"]))
        fw = tmp_path / "fw.json"
        fw.write_text(json.dumps(table.dump()))
        vm = VmProc(tmp_path, "vm", "--memory-file", str(memfile), "--memory-size", "8MiB",
                    "--fwtable", str(fw), "--workload", "verify", "--depth", "4",
                    "--window", "64", "--progress-ms", "100", "--paused")
        vm.wait_event("vm_paused")
        pf.vf_assign(0, "vm0", vm.pid)
        pf.vport_bind(VPORT, 0)
        pf.mapping_load(0, doc)
        vm.go()
        r = Rig(adapter, pf, vm, memfile)
        r.wait_vf_io(50)
        yield r
    finally:
        if r is not None:
            r.close_mediated()
        if vm is not None:
            vm.stop()
        pf.close()


def _request_queues(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [q for q in record["queues"] if q["index"] >= 2]


# -- claims -------------------------------------------------------------------------------


def test_claim_B1_quiesced_requests_wait_in_the_avail_ring(rig: Rig) -> None:
    rig.pf.vf_quiesce(0)
    drained, _ = rig.pf.vf_drain(0, 5000)
    assert drained
    # the guest keeps submitting: its avail index runs ahead of used, which stands still
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        first = rig.rings()
        if any((avail - used) & 0xFFFF for _, avail, used in first):
            break
        assert time.monotonic() < deadline, first
        time.sleep(0.01)
    io_quiesced = rig.vf_io()
    time.sleep(0.3)
    later = rig.rings()
    assert [used for _, _, used in later] == [used for _, _, used in first]
    assert all(((a2 - a1) & 0xFFFF) >= 0 for (_, a1, _), (_, a2, _) in
               zip(first, later, strict=True))
    assert rig.vf_io() == io_quiesced  # the VF fetched nothing
    waiting = sum((avail - used) & 0xFFFF for _, avail, used in later)
    assert waiting > 0
    # the mediated path takes them from where they wait
    record, fds = rig.pf.vf_state_save(0)
    rig.mediate(record, fds)
    rig.wait_mediated(waiting)
    assert [used for _, _, used in rig.rings()] != [used for _, _, used in later]
    rig.back_to_vf()
    rig.finish()


def test_claim_B3_B4_saved_positions_match_guest_memory(rig: Rig) -> None:
    record, fds = rig.hand_off()
    try:
        layout = rig.layout()
        guest = {i: (avail, used) for i, avail, used in rig.rings()}
        queues = _request_queues(record)
        assert sorted(q["index"] for q in queues) == sorted(guest)
        for q in queues:
            state = q["state"]
            avail, used = guest[q["index"]]
            ring = layout.queues[q["index"]]
            assert (state["desc_addr"], state["avail_addr"], state["used_addr"],
                    state["size"]) == (ring.desc_addr, ring.avail_addr, ring.used_addr,
                                       ring.size)
            # drained: every fetched request is completed, nothing in flight
            assert state["used_idx"] == used
            assert state["last_avail_idx"] == used
            assert state["in_flight"] == []
            # what the guest published since waits beyond the saved position
            assert (avail - state["last_avail_idx"]) & 0xFFFF <= state["size"]
        assert len(fds) == len(record["regions"]) + sum(
            (q["kick_fd"] is not None) + (q["call_fd"] is not None) for q in record["queues"])
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    rig.mediate(record, fds)
    rig.back_to_vf()
    rig.finish()


def test_claim_B5_B6_mediated_path_serves_from_saved_positions(rig: Rig) -> None:
    record, fds = rig.hand_off()
    saved = {q["index"]: q["state"]["last_avail_idx"] for q in _request_queues(record)}
    pf_before = rig.pf_io()
    vf_before = rig.vf_io()
    mediated = rig.mediate(record, fds)
    rig.wait_mediated(200)
    stats = mediated.stats()
    assert stats["errors"] == 0 and stats["last_error"] is None, stats
    assert stats["bytes_in"] > 0 and stats["bytes_out"] > 0, stats
    pf_after = rig.pf_io()
    # claim B6: the PF transmitted them to physical storage
    assert pf_after["commands"] - pf_before["commands"] >= 200
    assert pf_after["bytes_in"] > pf_before["bytes_in"]
    assert pf_after["bytes_out"] > pf_before["bytes_out"]
    assert rig.vf_io() == vf_before  # the VF's DMA window is revoked: it did nothing
    # the guest sees its used rings move on from the saved positions
    new, _ = mediated.stop(TIMEOUT_S)
    served = 0
    for q in _request_queues(new):
        state = q["state"]
        served += (state["used_idx"] - saved[q["index"]]) & 0xFFFF
        assert state["in_flight"] == []
        assert state["used_idx"] == state["last_avail_idx"]
    assert served == mediated.stats()["requests"]
    progress = [e for e in rig.vm.events() if e["event"] == "verify_progress"]
    assert progress and progress[-1]["errors"] == 0
    rig.pf.vf_state_restore(0, new, fds)
    rig.close_mediated()
    rig.pf.vf_resume(0)
    result = rig.finish()
    assert result["verified"] > 0


def test_claim_X5_mediated_writes_are_dirty_pages(rig: Rig) -> None:
    record, fds = rig.hand_off()
    mediated = rig.mediate(record, fds)
    rig.wait_mediated(100)
    record_now, _ = mediated.stop(TIMEOUT_S)
    pages: set[int] = set()
    for first, count in mediated.collect_dirty():
        pages.update(range(first, first + count))
    assert mediated.stats()["pages_marked"] > 0
    layout = rig.layout()
    # every used ring the path wrote (elements, used.idx, avail_event)
    for q in _request_queues(record_now):
        ring = layout.queues[q["index"]]
        used_end = ring.used_addr + 6 + 8 * ring.size
        for page in range(ring.used_addr // PAGE, (used_end - 1) // PAGE + 1):
            assert page in pages, (q["index"], page)
    # the data-in of reads landed in the guest's data slots, and those pages are marked
    data_first = layout.data_addr // PAGE
    data_end = (layout.data_addr + layout.params.tags * layout.params.slot_size) // PAGE
    assert mediated.stats()["bytes_in"] > 0
    assert any(data_first <= p < data_end for p in pages)
    # nothing is written after the stop: nothing new is dirty
    assert mediated.collect_dirty() == []
    rig.pf.vf_state_restore(0, record_now, fds)
    rig.close_mediated()
    rig.pf.vf_resume(0)
    rig.finish()


def test_claim_X1_abort_returns_the_vm_to_its_vf(rig: Rig) -> None:
    record, fds = rig.hand_off()
    rig.mediate(record, fds)
    rig.wait_mediated(100)
    back = rig.back_to_vf()
    for q in _request_queues(back):
        assert q["state"]["in_flight"] == []
    assert rig.pf.vf_get(0)["state"] == "CONNECTED"
    before = rig.vf_io()
    rig.wait_vf_io(before.get("reads", 0) + before.get("writes", 0) + 100)
    result = rig.finish()
    assert result["verified"] > 0


def test_mediated_path_refuses_a_bad_record_and_leaves_the_fds(adapter: Daemon) -> None:
    r, w = os.pipe()
    try:
        with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf, \
                pytest.raises(MediatedError, match="format"):
            MediatedPath({"format": "nope"}, [r, w], pf, wwpn=VPORT.canonical())
        os.fstat(r)  # still open: the caller keeps them when set-up fails
        os.fstat(w)
    finally:
        os.close(r)
        os.close(w)


# -- the test process as the VM: the mediated path answers exactly as the VF -------------

INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])
REPORT_LUNS = bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
READ_CAPACITY_10 = bytes([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0])
TEST_UNIT_READY = bytes(6)
PATTERN = bytes(range(256)) * 16  # 8 blocks


def _rw(opcode: int, lba: int, blocks: int) -> bytes:
    return bytes([opcode, 0, *lba.to_bytes(4, "big"), 0, *blocks.to_bytes(2, "big"), 0])


#: (target, lun, cdb, keyword arguments of FrontEnd.scsi)
COMMANDS: list[tuple[int, int, bytes, dict[str, Any]]] = [
    (0, 0, INQUIRY, {"data_in": 96}),
    (0, 0, REPORT_LUNS, {"data_in": 256}),
    (0, 1, READ_CAPACITY_10, {"data_in": 8}),
    (0, 1, _rw(0x2A, 16, 8), {"data_out": PATTERN, "split": 3}),
    (0, 1, _rw(0x28, 16, 8), {"data_in": 4096, "split": 3}),
    (0, 1, _rw(0x28, 16, 4), {"data_in": 4096}),  # a residual
    (0, 1, _rw(0x28, 16, 8), {"data_in": 512}),  # an overrun
    (0, 1, _rw(0x28, 16, 1), {}),  # an overrun: no buffer at all
    (0, 0, _rw(0x28, 300, 1), {"data_in": 512}),  # past the end of vd-a
    (0, 2, _rw(0x28, 0, 1), {"data_in": 512}),  # LUN 2 is not masked to the vport
    (0, 7, INQUIRY, {"data_in": 96}),  # a LUN without a logical unit
    (0, 7, TEST_UNIT_READY, {}),
    (0, 0, bytes([0xEE, 0, 0, 0, 0, 0]), {}),  # an unknown opcode
    (5, 0, INQUIRY, {"data_in": 96}),  # a target the mapping does not have
    (0, 0, INQUIRY, {"data_in": 96, "lun_field": bytes([2, 0, 0, 0, 0, 0, 0, 0])}),
    (0, 0, INQUIRY, {"data_in": 96, "lun_field": bytes([1, 0, 0x40, 1, 0, 0, 0, 0])}),
    (0, 0, INQUIRY, {"data_in": 96, "lun_field": bytes([1, 0, 0x80, 0, 0, 0, 0, 0])}),
]
TMFS = [(TmfSubtype.ABORT_TASK, 0, 0), (TmfSubtype.LOGICAL_UNIT_RESET, 0, 1),
        (TmfSubtype.LOGICAL_UNIT_RESET, 0, 9), (TmfSubtype.ABORT_TASK_SET, 5, 0),
        (TmfSubtype.I_T_NEXUS_RESET, 0, 0), (TmfSubtype.CLEAR_ACA, 0, 0),
        (TmfSubtype.QUERY_TASK_SET, 0, 2)]


def _answers(fe: FrontEnd) -> list[Any]:
    out: list[Any] = [fe.scsi(t, lun, cdb, **kw) for t, lun, cdb, kw in COMMANDS]
    out += [fe.tmf(int(sub), t, lun) for sub, t, lun in TMFS]
    out.append(fe.an_query(0, 0, 0xFF))
    return out


@pytest.fixture
def front(tmp_path: Path, array: StorageArray, adapter: Daemon) -> Iterator[FrontEnd]:
    """This process as vm0 on VF 0 (vf_test_helpers.configure), its front end set up."""
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
        configure(pf, array, sentinel=False)
        fe = FrontEnd(pf.vf_get(0)["socket_path"], mem_path(tmp_path, "vm0"))
        try:
            fe.setup()
            wait_state(pf, 0, "CONNECTED")
            yield fe
        finally:
            fe.close()


@pytest.mark.parametrize("direct", [True, False], ids=["attached", "bounced"])
def test_claim_B5_B6_mediated_answers_as_the_vf(front: FrontEnd, adapter: Daemon,
                                                direct: bool) -> None:
    fe = front
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf, \
            PfClient(adapter.sock, timeout=TIMEOUT_S) as own:
        direct_answers = _answers(fe)
        pf.vf_quiesce(0)
        assert pf.vf_drain(0, 1000) == (True, [])
        vf_io = pf.adapter_get_stats()["vfs"][0]["io"]
        record, fds = pf.vf_state_save(0)
        before = pf.adapter_get_stats()["pf_io"]
        with MediatedPath(record, fds, own, wwpn=VPORT_VF.canonical(),
                          direct_buffers=direct) as mediated:
            mediated.start()
            assert _answers(fe) == direct_answers
            stats = mediated.stats()
            after = pf.adapter_get_stats()["pf_io"]
            assert pf.adapter_get_stats()["vfs"][0]["io"] == vf_io  # not the VF
            # every command but the BAD_TARGET ones went through the PF (claim B6)
            bad_target = 2  # target 5, and a LUN field not in the single-level format
            assert after["commands"] - before["commands"] == len(COMMANDS) - bad_target
            assert stats["requests"] == len(COMMANDS)
            assert stats["control"] == len(TMFS) + 1
            assert stats["bounced"] == (0 if direct else 12), stats  # those with data
            assert stats["errors"] == 0, stats
            new, new_fds = mediated.stop(TIMEOUT_S)
            assert new_fds == fds
            pf.vf_state_restore(0, new, new_fds)
        pf.vf_resume(0)
        assert _answers(fe) == direct_answers  # and the VF carries on from there


def test_claim_B5_in_flight_heads_of_the_record_are_executed_first(
        front: FrontEnd, adapter: Daemon) -> None:
    fe = front
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf, \
            PfClient(adapter.sock, timeout=TIMEOUT_S) as own:
        pf.vf_quiesce(0)
        record, fds = pf.vf_state_save(0)
        # the guest publishes a WRITE; the record says it was fetched and not completed
        raw = ScsiRequestHeader.build(0, 1, _rw(0x2A, 64, 8)).encode()
        fe.memory.write(0x100000, raw)
        fe.memory.write(0x100100, PATTERN)
        head = fe.submit(2, [(0x100000, len(raw)), (0x100100, 4096)], [(0x102000, 108)])
        rec = VfQueueRecord.from_dict(record, fds=len(fds))
        queues = tuple(
            replace(q, state=replace(q.state, last_avail_idx=q.state.last_avail_idx + 1,
                                     in_flight=(head,))) if q.index == 2 else q
            for q in rec.queues)
        record = replace(rec, queues=queues).to_dict()
        with MediatedPath(record, fds, own, wwpn=VPORT_VF.canonical()) as mediated:
            assert mediated.stats()["outstanding"] == 1
            mediated.start()
            assert fe.wait_used(2) == (head, 108)
            new, _ = mediated.stop(TIMEOUT_S)
            q2 = next(q for q in new["queues"] if q["index"] == 2)["state"]
            assert q2["in_flight"] == [] and q2["used_idx"] == q2["last_avail_idx"]
            assert mediated.stats()["requests"] == 1
            pf.vf_state_restore(0, new, fds)
        pf.vf_resume(0)
        r = fe.scsi(0, 1, _rw(0x28, 64, 8), data_in=4096)
        assert r.data == PATTERN


def test_mediated_path_turns_pf_errors_and_ring_faults_into_answers(
        front: FrontEnd, adapter: Daemon) -> None:
    fe = front
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf, \
            PfClient(adapter.sock, timeout=TIMEOUT_S) as own:
        pf.vf_quiesce(0)
        record, fds = pf.vf_state_save(0)
        with MediatedPath(record, fds, own, wwpn=VPORT_VF.canonical()) as mediated:
            mediated.start()
            # the vport logs out: pf_io_submit refuses (WRONG_STATE), the guest gets
            # BAD_TARGET as from a VF without a logged-in vport; nothing is lost
            pf.vport_logout(VPORT_VF)
            c = fe.scsi(0, 0, INQUIRY, data_in=96)
            assert c.response == VirtioScsiResponse.BAD_TARGET
            assert "WRONG_STATE" in str(mediated.stats()["last_error"])
            pf.vport_login(VPORT_VF)
            assert fe.scsi(0, 0, INQUIRY, data_in=96).response == VirtioScsiResponse.OK
            # a malformed chain on queue 3 (its descriptor's next is out of the table):
            # that queue stops being served, the host does not crash, queue 2 goes on
            layout = fe.drivers[3].layout
            head = layout.size - 1
            fe.memory.write(layout.desc_addr + 16 * head,
                            (0x100000).to_bytes(8, "little") + (64).to_bytes(4, "little")
                            + (1).to_bytes(2, "little") + (layout.size + 5).to_bytes(2, "little"))
            idx = fe.memory.load_u16(layout.avail_addr + 2)
            fe.memory.store_u16(layout.avail_addr + 4 + 2 * (idx % layout.size), head)
            fe.memory.store_u16(layout.avail_addr + 2, (idx + 1) & 0xFFFF)
            fe.kick(3)
            deadline = time.monotonic() + TIMEOUT_S
            while 3 not in mediated.stats()["faults"]:
                assert time.monotonic() < deadline, mediated.stats()
                time.sleep(0.01)
            assert mediated.running
            assert fe.scsi(0, 0, INQUIRY, data_in=96, queue=2).response == \
                VirtioScsiResponse.OK
            new, _ = mediated.stop(TIMEOUT_S)
            q3 = next(q for q in new["queues"] if q["index"] == 3)["state"]
            assert q3["last_avail_idx"] == idx  # the bad chain was not consumed
            assert mediated.stats()["errors"] == 2


def test_claim_X5_every_page_the_mediated_path_changes_is_collected(
        front: FrontEnd, adapter: Daemon) -> None:
    fe = front
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf, \
            PfClient(adapter.sock, timeout=TIMEOUT_S) as own:
        for lba in range(0, 64, 8):  # data to read back later, through the direct path
            w = fe.scsi(0, 1, _rw(0x2A, lba, 8), data_out=PATTERN)
            assert (w.response, w.status) == (0, 0)
        pf.vf_quiesce(0)
        record, fds = pf.vf_state_save(0)
        with MediatedPath(record, fds, own, wwpn=VPORT_VF.canonical()) as mediated:
            assert mediated.collect_dirty()  # restoring the rings wrote their flags
            # the guest queues reads and writes on both request queues (none served yet)
            expected: dict[int, int] = {}
            for n in range(16):
                queue = 2 + n % 2
                base = 0x300000 + n * 0x4000
                write = n % 4 == 3
                raw = ScsiRequestHeader.build(0, 1, _rw(0x2A if write else 0x28, n * 4,
                                                        8)).encode()
                fe.memory.write(base, raw)
                fe.memory.write(base + 0x100, b"\xEE" * 108)
                fe.memory.write(base + 0x1000, PATTERN if write else b"\xEE" * 4096)
                readable = [(base, len(raw))] + ([(base + 0x1000, 4096)] if write else [])
                writable = [(base + 0x100, 108)] + ([] if write else [(base + 0x1000, 4096)])
                fe.submit(queue, readable, writable)
                expected[queue] = expected.get(queue, 0) + 1
            used = {q: fe.used_idx(q) for q in expected}
            before = bytes(fe.shm.buffer)
            mediated.start()
            deadline = time.monotonic() + TIMEOUT_S
            while any((fe.used_idx(q) - used[q]) & 0xFFFF < n for q, n in expected.items()):
                assert time.monotonic() < deadline, mediated.stats()
                time.sleep(0.01)
            new, _ = mediated.stop(TIMEOUT_S)
            after = bytes(fe.shm.buffer)
            dirty: set[int] = set()
            for first, count in mediated.collect_dirty():
                dirty.update(range(first, first + count))
            changed = {p for p in range(len(after) // PAGE)
                       if before[p * PAGE:(p + 1) * PAGE] != after[p * PAGE:(p + 1) * PAGE]}
            assert changed, "the mediated path wrote nothing"
            assert changed <= dirty, sorted(changed - dirty)
            assert mediated.stats()["requests"] == 16
            pf.vf_state_restore(0, new, fds)
        pf.vf_resume(0)
