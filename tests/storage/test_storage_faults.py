"""Fault injection on physical LUN files (vfdirect.storage.faults): a slow or failing disk
on demand, off unless VFDIRECT_STORAGE_FAULTS=1, seen by the SCSI layer as a real one."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from vfdirect.core.block import BlockError, MediumError
from vfdirect.core.scsi import sense as sn
from vfdirect.core.scsi.cdb import Read10, SynchronizeCache10, Write10
from vfdirect.core.scsi.identity import LuIdentity
from vfdirect.core.scsi.lu import LogicalUnit
from vfdirect.core.scsi.opcodes import Status
from vfdirect.core.wwn import Wwn
from vfdirect.storage import FileBackend, StorageArray
from vfdirect.storage.faults import (
    FAULTS_ENV,
    FaultControlError,
    FaultInjector,
    FaultSpec,
    clear_lun_faults,
    control_path,
    set_lun_faults,
)

BS = 512
NUM_BLOCKS = 32


@pytest.fixture
def faults_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "1")


@pytest.fixture
def lun_path(tmp_path: Path) -> Path:
    path = tmp_path / "lun-00000.img"
    FileBackend.create(path, BS, NUM_BLOCKS).close()
    return path


def read(dev: FileBackend, lba: int, count: int = 1) -> bytes:
    buf = bytearray(count * BS)
    dev.read_blocks(lba, [memoryview(buf)])
    return bytes(buf)


def test_control_path_is_beside_the_lun(lun_path: Path) -> None:
    assert control_path(lun_path) == lun_path.parent / "lun-00000.img.fault"


def test_off_by_default_ignores_the_control_file(
    lun_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    set_lun_faults(lun_path, fail="all")
    with FileBackend(lun_path, BS) as dev:
        assert dev._faults is None
        dev.write_blocks(0, [memoryview(b"\x01" * BS)])
        assert read(dev, 0) == b"\x01" * BS
        dev.flush()


@pytest.mark.usefixtures("faults_on")
def test_no_control_file_no_fault(lun_path: Path) -> None:
    with FileBackend(lun_path, BS) as dev:
        assert dev._faults is not None
        dev.write_blocks(3, [memoryview(b"\x07" * BS)])
        assert read(dev, 3) == b"\x07" * BS


@pytest.mark.usefixtures("faults_on")
def test_fail_read_only_fails_reads(lun_path: Path) -> None:
    with FileBackend(lun_path, BS) as dev:
        dev.write_blocks(1, [memoryview(b"\x05" * BS)])
        set_lun_faults(lun_path, fail="read")
        with pytest.raises(MediumError, match="injected") as info:
            read(dev, 1)
        assert info.value.write is False
        dev.write_blocks(2, [memoryview(b"\x06" * BS)])  # writes still work
        dev.flush()
        clear_lun_faults(lun_path)
        assert read(dev, 1) == b"\x05" * BS
        assert read(dev, 2) == b"\x06" * BS


@pytest.mark.usefixtures("faults_on")
def test_fail_write_fails_writes_flush_and_zero_not_reads(lun_path: Path) -> None:
    with FileBackend(lun_path, BS) as dev:
        set_lun_faults(lun_path, fail="write")
        for op in (
            lambda: dev.write_blocks(0, [memoryview(b"\x09" * BS)]),
            dev.flush,
            lambda: dev.zero_blocks(0, 1),
        ):
            with pytest.raises(MediumError) as info:
                op()
            assert info.value.write is True
        assert read(dev, 0) == bytes(BS)  # the failed write left nothing


@pytest.mark.usefixtures("faults_on")
def test_fail_all_and_hardware_error(lun_path: Path) -> None:
    with FileBackend(lun_path, BS) as dev:
        set_lun_faults(lun_path, fail="all")
        with pytest.raises(MediumError):
            read(dev, 0)
        with pytest.raises(MediumError):
            dev.write_blocks(0, [memoryview(bytes(BS))])
        set_lun_faults(lun_path, fail="all", error="hardware")
        with pytest.raises(BlockError) as info:
            read(dev, 0)
        assert not isinstance(info.value, MediumError)


@pytest.mark.usefixtures("faults_on")
def test_delay_slows_every_io(lun_path: Path) -> None:
    with FileBackend(lun_path, BS) as dev:
        set_lun_faults(lun_path, delay_ms=60)
        start = time.monotonic()
        dev.write_blocks(0, [memoryview(b"\x02" * BS)])
        assert read(dev, 0) == b"\x02" * BS
        # Lower bound only: two IOs each slept at least 60 ms.
        assert time.monotonic() - start >= 0.12


@pytest.mark.usefixtures("faults_on")
def test_delay_applies_to_concurrent_ios_in_parallel(lun_path: Path) -> None:
    """IO threads share one injector; a delayed IO does not hold the others."""
    with FileBackend(lun_path, BS) as dev:
        set_lun_faults(lun_path, delay_ms=200)
        results: list[bytes] = []
        threads = [threading.Thread(target=lambda: results.append(read(dev, 0))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert results == [bytes(BS)] * 4


@pytest.mark.usefixtures("faults_on")
def test_control_file_reread_only_when_it_changes(
    lun_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    real_read = FaultInjector._read

    def counting_read(self: FaultInjector) -> FaultSpec | FaultControlError:
        reads.append(1)
        return real_read(self)

    monkeypatch.setattr(FaultInjector, "_read", counting_read)
    with FileBackend(lun_path, BS) as dev:
        set_lun_faults(lun_path, delay_ms=0)
        for lba in range(10):
            read(dev, lba)
        assert len(reads) == 1
        set_lun_faults(lun_path, fail="read")
        with pytest.raises(MediumError):
            read(dev, 0)
        with pytest.raises(MediumError):
            read(dev, 1)
        assert len(reads) == 2
        clear_lun_faults(lun_path)  # gone: no fault, nothing to read
        read(dev, 0)
        assert len(reads) == 2


@pytest.mark.usefixtures("faults_on")
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "Expecting"),
        ('{"delay_ms": -1}', "delay_ms"),
        ('{"fail": "sometimes"}', "fail must be"),
        ('{"error": "fire"}', "error must be"),
        ('{"delay": 5}', "unknown keys"),
        ("[1]", "not a JSON object"),
    ],
)
def test_malformed_control_file_fails_each_io_clearly(
    lun_path: Path, content: str, message: str
) -> None:
    control_path(lun_path).write_text(content)
    with FileBackend(lun_path, BS) as dev:
        with pytest.raises(FaultControlError, match=message) as info:
            read(dev, 0)
        assert str(control_path(lun_path)) in str(info.value)
        control_path(lun_path).write_text("")  # empty: no fault
        read(dev, 0)


def test_set_lun_faults_validates_and_replaces_atomically(lun_path: Path) -> None:
    with pytest.raises(FaultControlError, match="fail must be"):
        set_lun_faults(lun_path, fail="reads")
    spec = set_lun_faults(lun_path, delay_ms=300, fail="write")
    assert spec == FaultSpec(300.0, FaultSpec.load({"fail": "write"}).fail)
    assert json.loads(control_path(lun_path).read_text()) == spec.dump()
    assert [p.name for p in lun_path.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.usefixtures("faults_on")
def test_scsi_layer_answers_medium_error_through_an_array_lun(tmp_path: Path) -> None:
    """Through the array (as the IO engine opens LUNs) and the SCSI LU: CHECK CONDITION
    MEDIUM ERROR, UNRECOVERED READ ERROR / WRITE ERROR; HARDWARE ERROR for `hardware`."""
    array = StorageArray.create(tmp_path / "array", Wwn(bytes.fromhex("5001405012345678")))
    array.lun_create(NUM_BLOCKS, BS, lun=0)
    path = array.lun_path(0)
    identity = LuIdentity(
        vendor="VFDIRECT", product="VDISK", revision="0001", serial="S1",
        wwn=Wwn(bytes.fromhex("5001405123456780")),
    )
    backend = array.lun_open(0)
    try:
        lu = LogicalUnit(backend, identity)
        data = b"\x11" * BS
        ok = lu.execute(Write10(lba=4, transfer_length=1).encode(), [memoryview(data)], [])
        assert ok.good

        set_lun_faults(path, fail="all")
        buf = bytearray(BS)
        res = lu.execute(Read10(lba=4, transfer_length=1).encode(), [], [memoryview(buf)])
        assert res.status == Status.CHECK_CONDITION
        decoded = res.sense_data()
        assert decoded is not None and decoded.sense == sn.UNRECOVERED_READ_ERROR
        res = lu.execute(Write10(lba=4, transfer_length=1).encode(), [memoryview(data)], [])
        decoded = res.sense_data()
        assert decoded is not None and decoded.sense == sn.WRITE_ERROR
        res = lu.execute(SynchronizeCache10().encode(), [], [])
        decoded = res.sense_data()
        assert decoded is not None and decoded.sense == sn.WRITE_ERROR

        set_lun_faults(path, fail="read", error="hardware")
        res = lu.execute(Read10(lba=4, transfer_length=1).encode(), [], [memoryview(buf)])
        decoded = res.sense_data()
        assert decoded is not None and decoded.sense == sn.LOGICAL_UNIT_COMMUNICATION_FAILURE
        assert lu.internal_errors == 0  # a failing disk is not a bug

        clear_lun_faults(path)
        res = lu.execute(Read10(lba=4, transfer_length=1).encode(), [], [memoryview(buf)])
        assert res.good and bytes(buf) == data
    finally:
        backend.close()
    assert os.path.exists(path)
