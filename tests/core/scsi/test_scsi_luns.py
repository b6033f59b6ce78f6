from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.scsi.luns import (
    MAX_LUN,
    LunError,
    check_lun,
    decode_lun,
    encode_lun,
    parse_report_luns,
    report_luns_data,
)


@pytest.mark.parametrize(
    ("lun", "wire"),
    [
        (0, "0000000000000000"),  # peripheral device addressing, bus 0, LUN 0
        (1, "0001000000000000"),
        (255, "00ff000000000000"),  # last LUN of peripheral device addressing
        (256, "4100000000000000"),  # flat space: 01b | 6 high bits (000001b), low byte 00h
        (300, "412c000000000000"),  # 300 = 12Ch
        (MAX_LUN, "7fff000000000000"),  # 16383 = 3FFFh: 40h | 3Fh, FFh
    ],
)
def test_lun_golden(lun: int, wire: str) -> None:
    assert encode_lun(lun).hex() == wire
    assert decode_lun(bytes.fromhex(wire)) == lun


def test_flat_addressing_below_256_names_the_same_lun() -> None:
    assert decode_lun(bytes.fromhex("4005000000000000")) == 5


@pytest.mark.parametrize(
    "wire",
    [
        "0100000000000000",  # peripheral device addressing with bus identifier 1
        "0001000100000000",  # a second level
        "0000000000000001",  # garbage in the fourth level
        "8001000000000000",  # logical unit addressing method
        "c101000000000000",  # REPORT LUNS well-known LUN (extended addressing)
        "00000000000000",  # 7 bytes
        "000000000000000000",  # 9 bytes
    ],
)
def test_decode_rejects_other_forms(wire: str) -> None:
    with pytest.raises(LunError):
        decode_lun(bytes.fromhex(wire))


@pytest.mark.parametrize("bad", [-1, MAX_LUN + 1, True, 1.0, "1"])
def test_check_lun_rejects(bad: object) -> None:
    with pytest.raises(LunError):
        check_lun(bad)  # type: ignore[arg-type]
    with pytest.raises(LunError):
        encode_lun(bad)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, MAX_LUN))
def test_lun_round_trip(lun: int) -> None:
    raw = encode_lun(lun)
    assert len(raw) == 8
    assert decode_lun(raw) == lun
    assert decode_lun(bytearray(raw)) == lun


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=10))
def test_decode_any_bytes_is_total(raw: bytes) -> None:
    try:
        lun = decode_lun(raw)
    except LunError:
        return
    assert 0 <= lun <= MAX_LUN


def test_report_luns_golden() -> None:
    data = report_luns_data([300, 0, 1, 1])
    expected = bytes.fromhex(
        "00000018"  # LUN LIST LENGTH: 3 LUNs x 8 bytes (duplicates removed)
        "00000000"  # reserved
        "0000000000000000"  # LUN 0 (peripheral device addressing)
        "0001000000000000"  # LUN 1
        "412c000000000000"  # LUN 300 (flat space addressing)
    )
    assert data == expected
    assert report_luns_data([]) == bytes(8)


def test_parse_report_luns_full_and_truncated() -> None:
    data = report_luns_data([0, 1, 300])
    assert [decode_lun(x) for x in parse_report_luns(data)] == [0, 1, 300]
    # Truncated by the allocation length: only complete entries come back.
    assert [decode_lun(x) for x in parse_report_luns(data[:27])] == [0, 1]
    assert parse_report_luns(data[:8]) == []
    with pytest.raises(LunError):
        parse_report_luns(data[:7])
