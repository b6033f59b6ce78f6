from __future__ import annotations

from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scsi_doubles import FailingDevice, RamDisk, make_identity, run
from scsi_strategies import cdbs

from vfdirect.core.scsi import sense as sn
from vfdirect.core.scsi.cdb import (
    Inquiry,
    Read10,
    ReadCapacity10,
    ReportLuns,
    RequestSense,
    TestUnitReady,
    Write10,
)
from vfdirect.core.scsi.identity import TargetIdentity
from vfdirect.core.scsi.lu import LogicalUnit
from vfdirect.core.scsi.luns import LunError, decode_lun, parse_report_luns
from vfdirect.core.scsi.opcodes import Status
from vfdirect.core.scsi.sense import FieldPointer, decode_sense
from vfdirect.core.scsi.target import Target
from vfdirect.core.scsi.task import ScsiResult


def make_target(*luns: int) -> Target:
    target = Target(TargetIdentity("VFDIRECT", "VIRTUAL TARGET", "0001"))
    for n in luns:
        target.add_lu(n, LogicalUnit(RamDisk(), make_identity(serial=f"SER{n}")))
    return target


def at(target: Target, lun: int) -> partial[ScsiResult]:
    return partial(target.execute, lun)


# --- REPORT LUNS -------------------------------------------------------------------------


def test_report_luns_golden_from_any_lun() -> None:
    target = make_target(0, 1, 300)
    expected = bytes.fromhex(
        "00000018"  # LUN LIST LENGTH: 3 x 8
        "00000000"  # reserved
        "0000000000000000"  # LUN 0: peripheral device addressing
        "0001000000000000"  # LUN 1
        "412c000000000000"  # LUN 300: flat space addressing (40h | 01h, 2Ch)
    )
    for lun in (0, 1, 7, 300, 16383, 99999):
        result, data = run(
            at(target, lun), ReportLuns(allocation_length=4096).encode(), data_in=4096
        )
        assert result.good
        assert data == expected


def test_report_luns_without_lun_0() -> None:
    # SPC-4 6.33: LUN 0 need not exist; REPORT LUNS to it still answers.
    target = make_target(2)
    _, data = run(at(target, 0), ReportLuns(allocation_length=16).encode(), data_in=16)
    assert [decode_lun(x) for x in parse_report_luns(data)] == [2]


@pytest.mark.parametrize("alloc", [0, 4, 8, 15, 16])
def test_report_luns_truncation_keeps_list_length(alloc: int) -> None:
    target = make_target(0, 1, 2)
    result, data = run(at(target, 0), ReportLuns(allocation_length=alloc).encode(), data_in=alloc)
    assert result.good
    assert len(data) == alloc
    assert data == bytes.fromhex("00000018000000000000000000000000")[:alloc]


@pytest.mark.parametrize(
    ("select", "luns"),
    [
        (0x00, [0, 5]),
        (0x01, []),  # well-known LUs only: none
        (0x02, [0, 5]),
        (0x10, []),  # administrative LUs only: none
        (0x11, [0, 5]),  # administrative + non-conglomerate: every LU
    ],
)
def test_report_luns_select_report(select: int, luns: list[int]) -> None:
    _, data = run(at(make_target(0, 5), 0), ReportLuns(select, 4096).encode(), data_in=4096)
    assert [decode_lun(x) for x in parse_report_luns(data)] == luns


def test_report_luns_select_all_on_an_empty_target_lists_lun_0() -> None:
    # SPC-4 6.33: for SELECT REPORT 02h a null inventory becomes a default one with LUN 0.
    target = make_target()
    _, data = run(at(target, 0), ReportLuns(0x02, 4096).encode(), data_in=4096)
    assert data == bytes.fromhex("00000008000000000000000000000000")
    _, data = run(at(target, 0), ReportLuns(0x00, 4096).encode(), data_in=4096)
    assert data == bytes(8)


@pytest.mark.parametrize("select", [0x03, 0x0F, 0x12, 0x13, 0x80, 0xF8, 0xFF])
def test_report_luns_other_select_report(select: int) -> None:
    result, _ = run(at(make_target(0), 0), ReportLuns(select, 4096).encode(), data_in=4096)
    data = result.sense_data()
    assert data is not None
    assert data.sense == sn.INVALID_FIELD_IN_CDB
    assert data.field_pointer == FieldPointer(2)


def test_report_luns_reserved_bits() -> None:
    cdb = bytearray(ReportLuns().encode())
    cdb[1] = 0x01
    result, _ = run(at(make_target(0), 3), bytes(cdb), data_in=4096)
    data = result.sense_data()
    assert data is not None and data.field_pointer == FieldPointer(1, 0)


# --- LUNs without a logical unit ---------------------------------------------------------


def test_inquiry_to_a_missing_lun() -> None:
    target = make_target(1)
    result, data = run(at(target, 0), Inquiry(allocation_length=96).encode(), data_in=96)
    assert result.good
    assert data[0] == 0x7F  # PERIPHERAL QUALIFIER 011b, PERIPHERAL DEVICE TYPE 1Fh
    assert data[1:8] == bytes([0x00, 0x06, 0x12, 0x5B, 0x00, 0x00, 0x02])  # as for an LU
    assert data[8:36] == b"VFDIRECT" + b"VIRTUAL TARGET  " + b"0001"


def test_inquiry_to_a_missing_lun_36_bytes_like_linux() -> None:
    result, data = run(at(make_target(), 0), Inquiry(allocation_length=36).encode(), data_in=36)
    assert result.good and len(data) == 36 and data[0] == 0x7F


def test_vpd_to_a_missing_lun() -> None:
    target = make_target()
    result, data = run(at(target, 4), Inquiry(True, 0x00, 255).encode(), data_in=255)
    assert result.good
    assert data == bytes([0x7F, 0x00, 0x00, 0x01, 0x00])
    result, _ = run(at(target, 4), Inquiry(True, 0x83, 255).encode(), data_in=255)
    decoded = result.sense_data()
    assert decoded is not None and decoded.sense == sn.INVALID_FIELD_IN_CDB


def test_request_sense_to_a_missing_lun() -> None:
    # SPC-4 6.39: GOOD status, sense data ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED.
    result, data = run(
        at(make_target(0), 9), RequestSense(allocation_length=252).encode(), data_in=252
    )
    assert result.status == Status.GOOD
    assert result.sense == b""
    assert decode_sense(data).sense == sn.LOGICAL_UNIT_NOT_SUPPORTED
    result, _ = run(at(make_target(0), 9), RequestSense(desc=True).encode(), data_in=18)
    decoded = result.sense_data()
    assert decoded is not None and decoded.sense == sn.INVALID_FIELD_IN_CDB


@pytest.mark.parametrize(
    "cdb",
    [
        TestUnitReady().encode(),
        Read10(lba=0, transfer_length=1).encode(),
        ReadCapacity10().encode(),
        bytes([0x08, 0, 0, 0, 1, 0]),  # unsupported opcode: still "no such LU"
        bytes([0xFF] * 16),
        b"",
    ],
)
@pytest.mark.parametrize("lun", [1, 255, 16383, 16384, -1, 1 << 40])
def test_other_commands_to_a_missing_lun(cdb: bytes, lun: int) -> None:
    result, _ = run(at(make_target(0), lun), cdb, data_in=512)
    decoded = result.sense_data()
    assert result.status == Status.CHECK_CONDITION
    assert decoded is not None and decoded.sense == sn.LOGICAL_UNIT_NOT_SUPPORTED


# --- configuration and dispatch ----------------------------------------------------------


def test_add_remove_and_dispatch() -> None:
    target = make_target()
    disk = RamDisk()
    lu = LogicalUnit(disk, make_identity())
    target.add_lu(3, lu)
    assert target.luns() == [3] and len(target) == 1 and target.lu(3) is lu
    result, _ = run(
        at(target, 3), Write10(lba=2, transfer_length=1).encode(), data_out=b"\x5a" * 512
    )
    assert result.good
    assert disk.data[1024:1536] == b"\x5a" * 512
    _, data = run(at(target, 3), Inquiry().encode(), data_in=36)
    assert data[0] == 0x00
    with pytest.raises(LunError):
        target.add_lu(3, lu)
    assert target.remove_lu(3) is lu
    with pytest.raises(LunError):
        target.remove_lu(3)
    _, data = run(at(target, 3), Inquiry().encode(), data_in=36)
    assert data[0] == 0x7F
    _, data = run(at(target, 0), ReportLuns().encode(), data_in=4096)
    assert data == bytes(8)


@pytest.mark.parametrize("bad", [-1, 16384, True])
def test_add_lu_rejects_bad_luns(bad: int) -> None:
    with pytest.raises(LunError):
        make_target().add_lu(bad, LogicalUnit(RamDisk(), make_identity()))


def test_add_lu_rejects_non_lus() -> None:
    with pytest.raises(TypeError):
        make_target().add_lu(0, object())  # type: ignore[arg-type]


def test_internal_errors_are_counted_where_they_happen() -> None:
    seen: list[BaseException] = []
    target = Target(on_internal_error=seen.append)
    lu = LogicalUnit(FailingDevice(on_read=RuntimeError("bug")), make_identity())
    target.add_lu(0, lu)
    result = target.execute(
        0, Read10(lba=0, transfer_length=1).encode(), [], [memoryview(bytearray(512))]
    )
    decoded = result.sense_data()
    assert decoded is not None and decoded.sense == sn.INTERNAL_TARGET_FAILURE
    assert lu.internal_errors == 1
    assert target.internal_errors == 0
    # A broken buffer on a missing LUN is the target's own internal error.
    result = target.execute(5, Inquiry().encode(), [], [memoryview(bytes(36))])
    decoded = result.sense_data()
    assert decoded is not None and decoded.sense == sn.INTERNAL_TARGET_FAILURE
    assert target.internal_errors == 1
    assert len(seen) == 1


def test_default_identity() -> None:
    assert Target().identity == TargetIdentity()


@settings(max_examples=400, deadline=None)
@given(
    lun=st.one_of(st.sampled_from([0, 1, 2, 300]), st.integers(-5, 20000)),
    cdb=cdbs,
    in_size=st.integers(0, 5000),
    out_size=st.integers(0, 5000),
)
def test_execute_never_raises(lun: int, cdb: bytes, in_size: int, out_size: int) -> None:
    target = make_target(0, 2)
    ins = [memoryview(bytearray(in_size))] if in_size else []
    outs = [memoryview(bytes(out_size))] if out_size else []
    result = target.execute(lun, cdb, outs, ins)
    assert isinstance(result, ScsiResult)
    assert result.residual == in_size + out_size - result.data_in_len - result.data_out_len
    assert (result.sense == b"") == result.good
    assert target.internal_errors == 0
    for n in target.luns():
        lu = target.lu(n)
        assert lu is not None and lu.internal_errors == 0


@pytest.mark.parametrize(
    ("wire", "first_byte"),
    [
        ("0002000000000000", 0x00),  # LUN 2, peripheral device addressing: the LU
        ("4002000000000000", 0x00),  # LUN 2, flat space addressing: the same LU
        ("0000000000000000", 0x7F),  # LUN 0: no LU
        ("c101000000000000", 0x7F),  # well-known LUN: not supported, no LU
        ("0002000100000000", 0x7F),  # two levels: no LU
        ("00", 0x7F),  # not even 8 bytes
    ],
)
def test_execute_lun_bytes(wire: str, first_byte: int) -> None:
    target = make_target(2)
    execute = partial(target.execute_lun_bytes, bytes.fromhex(wire))
    result, data = run(execute, Inquiry().encode(), data_in=36)
    assert result.good
    assert data[0] == first_byte
    result, _ = run(execute, ReportLuns().encode(), data_in=4096)
    assert result.good
