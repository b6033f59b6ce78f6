"""Claim X2 at the mediated path: a record whose heads the VF was still executing at the
save (a VF with IO threads over a slow LUN, a drain deadline far below its latency) is
served by the mediated path only once the VF reports the stale executions finished;
if the VF never does within the bound, those heads stay in flight, unexecuted, and go
back to the VF that saved them, which completes them at its resume."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS / "adapter") not in sys.path:
    sys.path.insert(0, str(_TESTS / "adapter"))

from daemon_helpers import Daemon, make_san  # noqa: E402
from vf_frontend_helpers import RESP_SIZE, FrontEnd, rw  # noqa: E402
from vf_test_helpers import VPORT, configure, mem_path, wait_state  # noqa: E402

from vfdirect.adapter.pf_client import PfClient  # noqa: E402
from vfdirect.core.scsi import Status  # noqa: E402
from vfdirect.core.virtio.scsi import ScsiRequestHeader, ScsiResponseHeader  # noqa: E402
from vfdirect.host.mediated import MediatedPath  # noqa: E402
from vfdirect.storage import StorageArray  # noqa: E402
from vfdirect.storage.faults import FAULTS_ENV, clear_lun_faults, set_lun_faults  # noqa: E402

pytestmark = pytest.mark.timeout(120)
TIMEOUT_S = 20.0


@pytest.fixture
def san(tmp_path: Path) -> StorageArray:
    return make_san(tmp_path / "san")


@pytest.fixture
def adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    monkeypatch.setenv(FAULTS_ENV, "1")
    d = Daemon(tmp_path / "host1", "--io-threads", "4")
    try:
        yield d.wait_ready()
    finally:
        d.stop()


@pytest.fixture
def front(tmp_path: Path) -> Iterator[list[FrontEnd]]:
    made: list[FrontEnd] = []
    yield made
    for fe in made:
        fe.close()


def _slow(san: StorageArray, delay_ms: int | None) -> None:
    for lun in (0, 1):
        if delay_ms is None:
            clear_lun_faults(san.lun_path(lun))
        else:
            set_lun_faults(san.lun_path(lun), delay_ms=delay_ms)


def _submit(fe: FrontEnd, n: int, cdb: bytes, *, data_out: bytes = b"",
            data_in: int = 0) -> tuple[int, int, int]:
    """A command on queue 2 built by hand: (head, response gpa, data gpa)."""
    base = 0x400000 + n * 0x10000
    resp, data = base + 0x1000, base + 0x2000
    raw = ScsiRequestHeader.build(0, 1, cdb).encode()
    fe.memory.write(base, raw)
    fe.memory.write(resp, bytes(RESP_SIZE))
    readable, writable = [(base, len(raw))], [(resp, RESP_SIZE)]
    if data_out:
        fe.memory.write(data, data_out)
        readable.append((data, len(data_out)))
    if data_in:
        fe.memory.write(data, b"\xEE" * data_in)
        writable.append((data, data_in))
    return fe.submit(2, readable, writable), resp, data


def _hand_over(pf: PfClient, fe: FrontEnd, san: StorageArray,
               delay_ms: int) -> tuple[bytes, bytes, tuple[int, int, int], tuple[int, int, int],
                                       dict[str, Any], list[int]]:
    """Old data at LBA 40, then (slow LUN) WRITE new data at 48 and READ 40; quiesce,
    drain 50 ms (missed), save: the record lists both as executing."""
    old, new = os.urandom(4096), os.urandom(4096)
    head, _, _ = _submit(fe, 0, rw(0x2A, 40, 8), data_out=old)
    assert fe.wait_used(2) == (head, RESP_SIZE)
    _slow(san, delay_ms)
    write = _submit(fe, 1, rw(0x2A, 48, 8), data_out=new)
    read = _submit(fe, 2, rw(0x28, 40, 8), data_in=4096)
    time.sleep(0.05)  # fetched; each executes for delay_ms
    assert pf.vf_quiesce(0) == 2
    drained, heads = pf.vf_drain(0, 50)
    assert not drained and sorted(heads) == sorted([write[0], read[0]])
    record, fds = pf.vf_state_save(0)
    assert sorted(map(tuple, record["executing"])) == sorted([(2, write[0]), (2, read[0])])
    return old, new, write, read, record, list(fds)


def test_mediated_path_reexecutes_handed_over_heads_after_the_vf_reports_them_done(
        tmp_path: Path, adapter: Daemon, san: StorageArray, front: list[FrontEnd]) -> None:
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
        configure(pf, san, sentinel=False)
        fe = FrontEnd(pf.vf_get(0)["socket_path"], mem_path(tmp_path, "vm0")).setup()
        front.append(fe)
        wait_state(pf, 0, "CONNECTED")
        old, new, write, read, record, fds = _hand_over(pf, fe, san, 300)
        mpf = PfClient(adapter.sock, timeout=TIMEOUT_S)
        try:
            mediated = MediatedPath(record, fds, mpf, wwpn=VPORT.canonical(), owns_pf=True)
        except BaseException:
            mpf.close()
            for fd in fds:
                os.close(fd)
            raise
        try:
            mediated.start()
            done = dict([fe.wait_used(2, timeout=TIMEOUT_S) for _ in range(2)])
            assert done == {write[0]: RESP_SIZE, read[0]: RESP_SIZE + 4096}
            assert fe.memory.read(read[2], 4096) == old
            resp = ScsiResponseHeader.decode(fe.memory.read(read[1], RESP_SIZE))
            assert resp.status == Status.GOOD
            stats = mediated.stats()
            assert stats["requests"] == 2 and stats["errors"] == 0, stats
            state, state_fds = mediated.stop(TIMEOUT_S)
            assert "executing" not in state  # confirmed: the list is dropped
            _slow(san, None)
            pf.vf_state_restore(0, state, state_fds)
        finally:
            mediated.close()
        pf.vf_resume(0)
        assert fe.scsi(0, 1, rw(0x28, 40, 16), data_in=8192).data == old + new


def test_unconfirmed_stale_heads_are_not_reexecuted_and_go_back_to_their_vf(
        tmp_path: Path, adapter: Daemon, san: StorageArray, front: list[FrontEnd]) -> None:
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
        configure(pf, san, sentinel=False)
        fe = FrontEnd(pf.vf_get(0)["socket_path"], mem_path(tmp_path, "vm0")).setup()
        front.append(fe)
        wait_state(pf, 0, "CONNECTED")
        old, new, write, read, record, fds = _hand_over(pf, fe, san, 1500)
        mpf = PfClient(adapter.sock, timeout=TIMEOUT_S)
        try:
            mediated = MediatedPath(record, fds, mpf, wwpn=VPORT.canonical(), owns_pf=True,
                                    stale_wait_s=0.1)
        except BaseException:
            mpf.close()
            for fd in fds:
                os.close(fd)
            raise
        try:
            mediated.start()
            with pytest.raises(TimeoutError):
                fe.wait_used(2, timeout=0.5)  # neither stale nor re-executed
            stats = mediated.stats()
            assert stats["requests"] == 0 and "did not report" in str(stats["last_error"])
            state, state_fds = mediated.stop(TIMEOUT_S)
            assert sorted(map(tuple, state["executing"])) == \
                sorted([(2, write[0]), (2, read[0])])
            assert state["saver"] == record["saver"]
            _slow(san, None)
            pf.vf_state_restore(0, state, state_fds)  # the VF that saved it takes it
        finally:
            mediated.close()
        pf.vf_resume(0)  # waits for its stale executions, then re-executes both
        done = dict([fe.wait_used(2, timeout=TIMEOUT_S) for _ in range(2)])
        assert done == {write[0]: RESP_SIZE, read[0]: RESP_SIZE + 4096}
        assert fe.memory.read(read[2], 4096) == old
        assert fe.scsi(0, 1, rw(0x28, 40, 16), data_in=8192).data == old + new
