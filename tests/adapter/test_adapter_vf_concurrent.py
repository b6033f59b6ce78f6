"""Concurrent IO in a VF (``vfdirect adapter run --io-threads N``) and claim X2 at the VF:
a drain that misses its deadline hands the executing requests over; their stale
executions are never completed by the VF, are reported by ``vf_drain`` of the SAVED VF
until they finish, and keep the guest memory mapped until then. Physical LUNs are made
slow with the storage fault injection (vfdirect.storage.faults)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import Daemon, make_san
from vf_frontend_helpers import RESP_SIZE, FrontEnd, rw
from vf_test_helpers import configure, lun_bytes, mem_path, wait_state

from vfdirect.adapter.pf_client import PfClient, PfError
from vfdirect.core.rpc import ErrorCode
from vfdirect.core.scsi import Status
from vfdirect.core.virtio.scsi import (
    ScsiRequestHeader,
    ScsiResponseHeader,
    TmfSubtype,
    VirtioScsiResponse,
)
from vfdirect.storage import StorageArray
from vfdirect.storage.faults import FAULTS_ENV, clear_lun_faults, set_lun_faults

pytestmark = pytest.mark.timeout(120)
TIMEOUT_S = 10.0
DELAY_MS = 300
_R = VirtioScsiResponse
BAD_EVENTS = ("vf_internal_error", "pf_internal_error", "vf_unmap_deferred",
              "vf_thread_stuck", "vf_event_failed", "vf_io_threads_stuck")


@pytest.fixture
def san(tmp_path: Path) -> StorageArray:
    return make_san(tmp_path / "san")


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    monkeypatch.setenv(FAULTS_ENV, "1")  # inherited by the adapter process
    d = Daemon(tmp_path / "host1", "--io-threads", "4")
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


def slow(san: StorageArray, delay_ms: int | None) -> None:
    for lun in (0, 1):
        if delay_ms is None:
            clear_lun_faults(san.lun_path(lun))
        else:
            set_lun_faults(san.lun_path(lun), delay_ms=delay_ms)


class Request:
    """One command placed by hand in guest memory (slot ``n`` of a private area)."""

    def __init__(self, fe: FrontEnd, n: int, cdb: bytes, *, data_out: bytes = b"",
                 data_in: int = 0, queue: int = 2, lun: int = 1) -> None:
        base = 0x400000 + n * 0x10000
        self.fe, self.queue = fe, queue
        self.resp, self.data = base + 0x1000, base + 0x2000
        raw = ScsiRequestHeader.build(0, lun, cdb).encode()
        fe.memory.write(base, raw)
        fe.memory.write(self.resp, bytes(RESP_SIZE))
        readable = [(base, len(raw))]
        writable = [(self.resp, RESP_SIZE)]
        if data_out:
            fe.memory.write(self.data, data_out)
            readable.append((self.data, len(data_out)))
        if data_in:
            fe.memory.write(self.data, b"\xEE" * data_in)
            writable.append((self.data, data_in))
        self.head = fe.submit(queue, readable, writable)

    def response(self) -> ScsiResponseHeader:
        return ScsiResponseHeader.decode(self.fe.memory.read(self.resp, RESP_SIZE))


def collect(fe: FrontEnd, queue: int, count: int) -> dict[int, int]:
    """The next ``count`` used elements of ``queue``: {head: written}."""
    return dict(fe.wait_used(queue) for _ in range(count))


def test_requests_execute_concurrently_and_complete_out_of_order(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
        configure(pf, san, sentinel=False)
        fe = FrontEnd(pf.vf_get(0)["socket_path"], mem_path(tmp_path, "vm0")).setup()
        fronts.append(fe)
        wait_state(pf, 0, "CONNECTED")
        datas = [os.urandom(4096) for _ in range(4)]
        writes = [Request(fe, i, rw(0x2A, 100 + 8 * i, 8), data_out=d)
                  for i, d in enumerate(datas)]
        assert set(collect(fe, 2, 4)) == {w.head for w in writes}
        slow(san, DELAY_MS)
        reads = [Request(fe, 10 + i, rw(0x28, 100 + 8 * i, 8), data_in=4096)
                 for i in range(4)]
        time.sleep(0.05)  # a few ms to fetch them; each executes for 300 ms
        # all four were fetched while the first still executed (one at a time, the VF
        # thread would only see the quiesce between two requests, with none outstanding)
        assert pf.vf_quiesce(0) == 4
        assert pf.vf_drain(0, 5000) == (True, [])
        pf.vf_resume(0)
        done = collect(fe, 2, 4)
        assert set(done) == {r.head for r in reads}
        for r, d in zip(reads, datas, strict=True):
            assert (r.response().response, r.response().status) == (_R.OK, Status.GOOD)
            assert fe.memory.read(r.data, 4096) == d
        slow(san, None)


def test_a_tmf_waits_for_the_executing_commands(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
        configure(pf, san, sentinel=False)
        fe = FrontEnd(pf.vf_get(0)["socket_path"], mem_path(tmp_path, "vm0")).setup()
        fronts.append(fe)
        wait_state(pf, 0, "CONNECTED")
        slow(san, DELAY_MS)
        read = Request(fe, 0, rw(0x28, 0, 8), data_in=4096)
        time.sleep(0.05)  # fetched (not yet done: it executes for 300 ms)
        # ABORT TASK answers FUNCTION COMPLETE only once the read has completed: when
        # the TMF's used element is there, the read's is there already
        assert fe.tmf(TmfSubtype.ABORT_TASK, 0, 1, tag=1) == _R.FUNCTION_COMPLETE
        used = fe.drivers[2].pop_used()
        assert used is not None and used.head == read.head
        assert read.response().status == Status.GOOD
        slow(san, None)


def test_claim_X2_drain_deadline_hands_over_executing_requests_at_the_vf(
        tmp_path: Path, daemon: Daemon, san: StorageArray, fronts: list[FrontEnd]) -> None:
    with PfClient(daemon.sock, timeout=TIMEOUT_S) as pf:
        _, _, lay = configure(pf, san, sentinel=False)
        fe = FrontEnd(pf.vf_get(0)["socket_path"], mem_path(tmp_path, "vm0")).setup()
        fronts.append(fe)
        wait_state(pf, 0, "CONNECTED")
        old = os.urandom(4096)
        first = Request(fe, 0, rw(0x2A, 40, 8), data_out=old)
        assert collect(fe, 2, 1) == {first.head: RESP_SIZE}
        slow(san, DELAY_MS)
        new = os.urandom(4096)
        write = Request(fe, 1, rw(0x2A, 48, 8), data_out=new)
        read = Request(fe, 2, rw(0x28, 40, 8), data_in=4096)
        time.sleep(0.05)  # fetched, executing for 300 ms
        assert pf.vf_quiesce(0) == 2
        drained, heads = pf.vf_drain(0, 50)  # well below the LUN's 300 ms
        assert not drained and sorted(heads) == sorted([write.head, read.head])
        record, fds = pf.vf_state_save(0)  # handed over: the save is allowed
        try:
            assert sorted(map(tuple, record["executing"])) == \
                sorted([(2, write.head), (2, read.head)])
            q2 = next(q for q in record["queues"] if q["index"] == 2)["state"]
            assert sorted(q2["in_flight"]) == sorted([write.head, read.head])
            # the stale executions still use the guest memory: still mapped
            maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
            assert fe.shm.path is not None and str(fe.shm.path) in maps
            # another VF may not take a record with executing heads
            pf.vf_assign(2, "vm2", os.getpid())
            with pytest.raises(PfError) as info:
                pf.vf_state_restore(2, record, fds)
            assert info.value.code is ErrorCode.INVALID_PARAMS
            assert "still executing" in info.value.message
            pf.vf_unassign(2)
            # vf_drain of the SAVED VF reports them until they are done
            deadline = time.monotonic() + TIMEOUT_S
            while not pf.vf_drain(0, 100)[0]:
                assert time.monotonic() < deadline, "the stale executions never ended"
            # then, and only then, the VF lets go of the guest memory
            maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
            assert str(fe.shm.path) not in maps
            # their results were never pushed: the guest saw no completion
            with pytest.raises(TimeoutError):
                fe.wait_used(2, timeout=0.2)
            # the stale WRITE reached the LUN; the stale READ filled its buffer
            place = lay.b.placements[0]
            assert lun_bytes(san, int(place.extent.lun.lun), place.extent.start + 48,
                             8) == new
            slow(san, None)
            # X1 on the same VF: its own record is taken back, the heads re-executed
            pf.vf_state_restore(0, record, fds)
        finally:
            for fd in fds:
                os.close(fd)
        pf.vf_resume(0)
        done = collect(fe, 2, 2)
        assert done == {write.head: RESP_SIZE, read.head: RESP_SIZE + 4096}
        assert read.response().status == Status.GOOD
        assert fe.memory.read(read.data, 4096) == old
        assert fe.scsi(0, 1, rw(0x28, 40, 16), data_in=8192).data == old + new
        stale = [e for e in daemon.events() if e["event"] == "vf_requests_stale"]
        assert stale and stale[-1]["count"] == 2
