from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.scsi import sense as sn
from vfdirect.core.scsi.sense import (
    CATALOGUE,
    FIXED_SENSE_LEN,
    CheckCondition,
    FieldPointer,
    ResponseCode,
    Sense,
    SenseFormatError,
    SenseKey,
    decode_sense,
    encode_fixed_sense,
)


def test_catalogue_values_from_the_brief() -> None:
    # The (key, ASC, ASCQ) triples the rest of vfdirect relies on.
    expected = {
        "NO_SENSE": (0x0, 0x00, 0x00),
        "INVALID_COMMAND_OPERATION_CODE": (0x5, 0x20, 0x00),
        "INVALID_FIELD_IN_CDB": (0x5, 0x24, 0x00),
        "INVALID_FIELD_IN_PARAMETER_LIST": (0x5, 0x26, 0x00),
        "PARAMETER_LIST_LENGTH_ERROR": (0x5, 0x1A, 0x00),
        "LBA_OUT_OF_RANGE": (0x5, 0x21, 0x00),
        "LOGICAL_UNIT_NOT_SUPPORTED": (0x5, 0x25, 0x00),
        "SAVING_PARAMETERS_NOT_SUPPORTED": (0x5, 0x39, 0x00),
        "UNRECOVERED_READ_ERROR": (0x3, 0x11, 0x00),
        "WRITE_ERROR": (0x3, 0x0C, 0x00),
        "INTERNAL_TARGET_FAILURE": (0x4, 0x44, 0x00),
        "ACCESS_DENIED_NO_ACCESS_RIGHTS": (0x5, 0x20, 0x02),
        "REPORTED_LUNS_DATA_HAS_CHANGED": (0x6, 0x3F, 0x0E),
    }
    for name, code in expected.items():
        assert getattr(sn, name).code == code, name


def test_catalogue_is_unique_and_named() -> None:
    names = [s.name for s in CATALOGUE.values()]
    assert len(set(names)) == len(names)
    assert all(names)
    for code, sense in CATALOGUE.items():
        assert sense.code == code
        assert Sense.lookup(*code) is sense


def test_lookup_unknown_and_equality_ignores_name() -> None:
    unknown = Sense.lookup(0x5, 0x99, 0x01)
    assert unknown.name == ""
    assert unknown.key is SenseKey.ILLEGAL_REQUEST
    assert Sense(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00) == sn.INVALID_FIELD_IN_CDB
    assert "INVALID FIELD IN CDB" in str(sn.INVALID_FIELD_IN_CDB)
    with pytest.raises(ValueError):
        Sense(SenseKey.NO_SENSE, 0x100, 0)


def test_golden_fixed_sense_with_field_pointer() -> None:
    # INVALID FIELD IN CDB, the offending field is RDPROTECT: CDB byte 1, bit 7.
    data = encode_fixed_sense(sn.INVALID_FIELD_IN_CDB, field_pointer=FieldPointer(1, 7))
    expected = bytes(
        [
            0x70,  # VALID 0, RESPONSE CODE 70h (current, fixed format)
            0x00,  # obsolete
            0x05,  # FILEMARK 0, EOM 0, ILI 0, SENSE KEY 5h ILLEGAL REQUEST
            0x00, 0x00, 0x00, 0x00,  # INFORMATION (not valid)
            0x0A,  # ADDITIONAL SENSE LENGTH: 18 - 8
            0x00, 0x00, 0x00, 0x00,  # COMMAND-SPECIFIC INFORMATION
            0x24,  # ASC: INVALID FIELD IN CDB
            0x00,  # ASCQ
            0x00,  # FIELD REPLACEABLE UNIT CODE
            0xCF,  # SKSV 1, C/D 1 (CDB), reserved 00, BPV 1, BIT POINTER 7
            0x00, 0x01,  # FIELD POINTER: byte 1
        ]
    )  # fmt: skip
    assert data == expected
    assert CheckCondition.invalid_cdb_field(1, 7).sense_bytes() == expected


def test_golden_fixed_sense_parameter_list_pointer_without_bit() -> None:
    data = CheckCondition.invalid_parameter_field(0x0123).sense_bytes()
    # SKSV 1, C/D 0 (parameter data), BPV 0; FIELD POINTER 0123h.
    assert data[12:14] == b"\x26\x00"
    assert data[15:18] == b"\x80\x01\x23"


def test_golden_fixed_sense_with_information_and_deferred() -> None:
    data = encode_fixed_sense(sn.UNRECOVERED_READ_ERROR, information=0x1234, deferred=True)
    # VALID 1 | 71h (deferred), key 3 MEDIUM ERROR, INFORMATION 00001234h, ASC 11h.
    assert data.hex() == "f1000300001234" + "0a" + "00000000" + "1100" + "00" + "000000"
    # INFORMATION that does not fit 4 bytes: VALID 0 (SPC-4 4.5.3), field zero.
    big = encode_fixed_sense(sn.UNRECOVERED_READ_ERROR, information=1 << 32)
    assert big[0] == 0x70
    assert big[3:7] == bytes(4)
    assert decode_sense(big).information is None


def test_encode_rejects_out_of_range_extras() -> None:
    with pytest.raises(ValueError):
        encode_fixed_sense(sn.NO_SENSE, command_specific=1 << 32)
    with pytest.raises(ValueError):
        encode_fixed_sense(sn.NO_SENSE, fru=256)
    with pytest.raises(ValueError):
        FieldPointer(1 << 16)
    with pytest.raises(ValueError):
        FieldPointer(0, 8)


pointers = st.one_of(
    st.none(),
    st.builds(
        FieldPointer,
        byte=st.integers(0, 0xFFFF),
        bit=st.one_of(st.none(), st.integers(0, 7)),
        in_cdb=st.booleans(),
    ),
)


@settings(max_examples=200, deadline=None)
@given(
    sense=st.sampled_from(sorted(CATALOGUE.values(), key=lambda s: s.code)),
    pointer=pointers,
    information=st.one_of(st.none(), st.integers(0, 0xFFFF_FFFF)),
    command_specific=st.integers(0, 0xFFFF_FFFF),
    fru=st.integers(0, 0xFF),
    deferred=st.booleans(),
)
def test_fixed_sense_round_trip(
    sense: Sense,
    pointer: FieldPointer | None,
    information: int | None,
    command_specific: int,
    fru: int,
    deferred: bool,
) -> None:
    raw = encode_fixed_sense(
        sense,
        field_pointer=pointer,
        information=information,
        command_specific=command_specific,
        fru=fru,
        deferred=deferred,
    )
    assert len(raw) == FIXED_SENSE_LEN
    got = decode_sense(raw)
    assert got.sense == sense
    assert got.sense.name == sense.name
    assert got.information == information
    assert got.command_specific == command_specific
    assert got.fru == fru
    assert got.deferred is deferred
    assert not got.descriptor_format
    if sense.key == SenseKey.ILLEGAL_REQUEST:
        assert got.field_pointer == pointer
    else:
        assert got.field_pointer is None


def test_decode_short_fixed_sense() -> None:
    # Only 8 bytes arrived: key known, ASC/ASCQ read as zero.
    got = decode_sense(bytes([0x70, 0, 0x06, 0, 0, 0, 0, 0x0A]))
    assert got.sense.key is SenseKey.UNIT_ATTENTION
    assert (got.sense.asc, got.sense.ascq) == (0, 0)
    # ADDITIONAL SENSE LENGTH 6 covers ASC/ASCQ; the bytes after it are ignored.
    raw = bytes([0x70, 0, 0x06, 0, 0, 0, 0, 0x06, 0, 0, 0, 0, 0x3F, 0x0E, 0xFF, 0xFF, 0xFF, 0xFF])
    got = decode_sense(raw)
    assert got.sense == sn.REPORTED_LUNS_DATA_HAS_CHANGED
    assert got.fru == 0
    assert got.sense_key_specific == bytes(3)


def test_decode_descriptor_format() -> None:
    raw = bytes(
        [
            0x72, 0x05, 0x24, 0x00, 0x00, 0x00, 0x00, 20,  # header, ADDITIONAL LENGTH 20
            0x02, 0x06, 0x00, 0x00, 0xC8, 0x00, 0x02, 0x00,  # sense key specific: CDB 2 bit 0
            0x00, 0x0A, 0x80, 0x00, 0, 0, 0, 0, 0, 0, 0x12, 0x34,  # information 1234h, VALID
        ]
    )  # fmt: skip
    got = decode_sense(raw)
    assert got.descriptor_format and not got.deferred
    assert got.response_code is ResponseCode.CURRENT_DESCRIPTOR
    assert got.sense == sn.INVALID_FIELD_IN_CDB
    assert got.information == 0x1234
    assert got.field_pointer == FieldPointer(2, 0, in_cdb=True)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x00" * 18, b"\x7f" + bytes(17), b"\x70\x00\x05", b"\x72\x00"],
)
def test_decode_rejects_non_sense(raw: bytes) -> None:
    with pytest.raises(SenseFormatError):
        decode_sense(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_decode_any_bytes_is_total(raw: bytes) -> None:
    with contextlib.suppress(SenseFormatError):
        decode_sense(raw)


def test_check_condition_carries_everything() -> None:
    cc = CheckCondition(sn.LBA_OUT_OF_RANGE, information=7, reason="LBA 7")
    assert cc.sense is sn.LBA_OUT_OF_RANGE
    assert "LBA 7" in str(cc)
    decoded = decode_sense(cc.sense_bytes())
    assert decoded.sense == sn.LBA_OUT_OF_RANGE
    assert decoded.information == 7
