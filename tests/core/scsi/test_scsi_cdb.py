from __future__ import annotations

import pytest
from hypothesis import given, settings
from scsi_strategies import cdbs, commands

from vfdirect.core.scsi import sense as sn
from vfdirect.core.scsi.cdb import (
    CdbFieldError,
    Command,
    Inquiry,
    ModeSense6,
    ModeSense10,
    Read10,
    Read16,
    ReadCapacity10,
    ReadCapacity16,
    ReportLuns,
    RequestSense,
    SynchronizeCache10,
    SynchronizeCache16,
    TestUnitReady,
    Write10,
    Write16,
    cdb_length,
    decode_cdb,
    encode_cdb,
)
from vfdirect.core.scsi.opcodes import Opcode
from vfdirect.core.scsi.sense import CheckCondition, FieldPointer, SenseKey


@settings(max_examples=400, deadline=None)
@given(commands)
def test_encode_decode_round_trip(cmd: Command) -> None:
    raw = encode_cdb(cmd)
    assert len(raw) == cmd.LENGTH == cdb_length(raw[0])
    assert raw[0] == cmd.OPCODE
    back = decode_cdb(raw)
    assert back == cmd
    assert type(back) is type(cmd)
    # Trailing bytes of a transport's fixed-size CDB area are ignored.
    assert decode_cdb(raw + b"\xff" * (32 - len(raw))) == cmd


def _outcome(raw: bytes) -> Command | CheckCondition:
    """The decoded command, or the CheckCondition it raised (any other exception
    propagates and fails the test)."""
    try:
        return decode_cdb(raw)
    except CheckCondition as cc:
        return cc


@settings(max_examples=600, deadline=None)
@given(cdbs)
def test_decode_any_bytes_is_a_command_or_check_condition(raw: bytes) -> None:
    outcome = _outcome(raw)
    if isinstance(outcome, CheckCondition):
        assert outcome.sense.key == SenseKey.ILLEGAL_REQUEST
        assert outcome.sense in (sn.INVALID_COMMAND_OPERATION_CODE, sn.INVALID_FIELD_IN_CDB)
        if outcome.field_pointer is not None:
            assert outcome.field_pointer.in_cdb
            assert 0 < outcome.field_pointer.byte < len(raw)
        assert len(outcome.sense_bytes()) == 18
        return
    # Every bit of the CDB is captured by the record.
    assert outcome.encode() == raw[: outcome.LENGTH]


# --- exhaustive bit layout: every bit of every command is a field or refused ---------

#: For each command: a base CDB, then per byte (from 1) the mask of bits that are
#: fields and may be set. The last byte is CONTROL: only the vendor bits 7-6.
LAYOUTS: list[tuple[Command, list[int]]] = [
    (TestUnitReady(), [0, 0, 0, 0, 0xC0]),
    (RequestSense(), [0x01, 0, 0, 0xFF, 0xC0]),
    (Inquiry(evpd=True), [0x01, 0xFF, 0xFF, 0xFF, 0xC0]),
    (ModeSense6(), [0x08, 0xFF, 0xFF, 0xFF, 0xC0]),
    (ModeSense10(), [0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xC0]),
    (ReadCapacity10(pmi=True), [0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0xC0]),
    (ReadCapacity16(pmi=True), [0x00] + [0xFF] * 12 + [0x01, 0xC0]),
    (Read10(), [0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0xC0]),
    (Write10(), [0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0xC0]),
    (Read16(), [0x1A] + [0xFF] * 12 + [0x1F, 0xC0]),
    (Write16(), [0x1A] + [0xFF] * 12 + [0x1F, 0xC0]),
    (SynchronizeCache10(), [0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0xC0]),
    (SynchronizeCache16(), [0x06] + [0xFF] * 12 + [0x1F, 0xC0]),
    (ReportLuns(), [0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xC0]),
]


def _expected_bit(cmd: Command, byte: int, bit: int) -> int:
    """Bit the field pointer names when ``bit`` of ``byte`` is wrongly set: the field's
    most significant bit for named multi-bit fields, else the bit itself."""
    if isinstance(cmd, (Read10, Read16, Write10, Write16)) and byte == 1 and bit >= 5:
        return 7  # RDPROTECT / WRPROTECT (bits 7-5)
    if isinstance(cmd, ReadCapacity16) and byte == 1 and bit <= 4:
        return 4  # SERVICE ACTION (bits 4-0): any other value is unsupported
    return bit


@pytest.mark.parametrize(("base", "masks"), LAYOUTS, ids=lambda v: type(v).__name__)
def test_every_bit_is_a_field_or_an_invalid_field(base: Command, masks: list[int]) -> None:
    raw = base.encode()
    assert len(masks) == len(raw) - 1
    assert decode_cdb(raw) == base
    for byte in range(1, len(raw)):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[byte] ^= 1 << bit
            if masks[byte - 1] & (1 << bit):
                assert decode_cdb(bytes(flipped)).encode() == bytes(flipped)
                continue
            with pytest.raises(CheckCondition) as info:
                decode_cdb(bytes(flipped))
            cc = info.value
            assert cc.sense == sn.INVALID_FIELD_IN_CDB, (type(base).__name__, byte, bit)
            assert cc.field_pointer == FieldPointer(byte, _expected_bit(base, byte, bit))


# --- specific rules ---------------------------------------------------------------------


def _invalid_field(raw: bytes) -> FieldPointer | None:
    with pytest.raises(CheckCondition) as info:
        decode_cdb(raw)
    assert info.value.sense == sn.INVALID_FIELD_IN_CDB
    return info.value.field_pointer


def test_control_byte_naca_and_link() -> None:
    # SAM-5: NACA=1 without ACA support, and LINK=1, are invalid fields of CONTROL.
    assert _invalid_field(bytes([0, 0, 0, 0, 0, 0x04])) == FieldPointer(5, 2)
    assert _invalid_field(bytes([0, 0, 0, 0, 0, 0x01])) == FieldPointer(5, 0)
    assert decode_cdb(bytes([0, 0, 0, 0, 0, 0xC0])) == TestUnitReady(control=0xC0)


def test_inquiry_page_code_without_evpd() -> None:
    # SPC-4 6.6.1: PAGE CODE non-zero with EVPD zero.
    assert _invalid_field(bytes([0x12, 0x00, 0x83, 0x00, 0xFF, 0x00])) == FieldPointer(2)
    assert decode_cdb(bytes([0x12, 0x01, 0x83, 0x01, 0x00, 0x00])) == Inquiry(
        evpd=True, page_code=0x83, allocation_length=0x100
    )


def test_inquiry_cmddt_is_refused() -> None:
    assert _invalid_field(bytes([0x12, 0x02, 0x00, 0x00, 0x24, 0x00])) == FieldPointer(1, 1)


def test_read_capacity_lba_without_pmi() -> None:
    assert _invalid_field(bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0])) == FieldPointer(2)
    rc16 = bytes([0x9E, 0x10]) + (5).to_bytes(8, "big") + (32).to_bytes(4, "big") + b"\x00\x00"
    assert _invalid_field(rc16) == FieldPointer(2)


@pytest.mark.parametrize("service_action", [0x00, 0x11, 0x12, 0x13, 0x1F])
def test_service_action_in_other_service_actions(service_action: int) -> None:
    raw = bytes([0x9E, service_action]) + bytes(8) + (32).to_bytes(4, "big") + bytes(2)
    assert _invalid_field(raw) == FieldPointer(1, 4)


@pytest.mark.parametrize("protect", [1, 2, 4, 7])
def test_rdprotect_and_wrprotect_refused(protect: int) -> None:
    for opcode in (0x28, 0x2A):
        raw = bytes([opcode, protect << 5]) + bytes(8)
        assert _invalid_field(raw) == FieldPointer(1, 7)
    for opcode in (0x88, 0x8A):
        raw = bytes([opcode, protect << 5]) + bytes(14)
        assert _invalid_field(raw) == FieldPointer(1, 7)


def test_read_write_flags_decode() -> None:
    cmd = decode_cdb(bytes.fromhex("2a1a00001000050003" + "80"))
    assert cmd == Write10(
        lba=0x1000, transfer_length=3, dpo=True, fua=True, fua_nv=True, group_number=5, control=0x80
    )
    cmd16 = decode_cdb(bytes.fromhex("88088000000000000000ffffffff0000"))
    assert cmd16 == Read16(lba=1 << 63, transfer_length=0xFFFF_FFFF, fua=True)


@pytest.mark.parametrize("opcode", [0x08, 0x0A, 0x15, 0x2F, 0x41, 0x42, 0x7F, 0xA3, 0xC0, 0xFF])
def test_unknown_opcodes(opcode: int) -> None:
    with pytest.raises(CheckCondition) as info:
        decode_cdb(bytes([opcode]) + bytes(15))
    assert info.value.sense == sn.INVALID_COMMAND_OPERATION_CODE
    assert info.value.field_pointer is None


@pytest.mark.parametrize("opcode", sorted(Opcode))
def test_short_cdb_is_invalid_command_operation_code(opcode: Opcode) -> None:
    length = cdb_length(opcode)
    assert length is not None
    for n in range(1, length):
        with pytest.raises(CheckCondition) as info:
            decode_cdb(bytes([opcode]) + bytes(n - 1))  # an n-byte CDB
        assert info.value.sense == sn.INVALID_COMMAND_OPERATION_CODE
    with pytest.raises(CheckCondition):
        decode_cdb(b"")


def test_decode_accepts_bytearray_and_memoryview() -> None:
    raw = Read10(lba=9, transfer_length=1).encode()
    assert (
        decode_cdb(bytearray(raw))
        == decode_cdb(memoryview(raw))
        == Read10(lba=9, transfer_length=1)
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: Read10(lba=1 << 32),
        lambda: Read10(transfer_length=1 << 16),
        lambda: Read16(transfer_length=-1),
        lambda: Write16(group_number=32),
        lambda: TestUnitReady(control=0x04),
        lambda: Inquiry(evpd=False, page_code=0x80),
        lambda: ReadCapacity10(lba=1),
        lambda: ModeSense6(page_code=0x40),
        lambda: RequestSense(allocation_length=True),
    ],
)
def test_records_refuse_values_their_cdb_cannot_carry(build: object) -> None:
    with pytest.raises(CdbFieldError):
        build()  # type: ignore[operator]


def test_test_unit_ready_is_not_collected_as_a_test() -> None:
    assert TestUnitReady.__test__ is False
