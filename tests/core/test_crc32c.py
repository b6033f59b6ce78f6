"""CRC-32C (Castagnoli): the standard check value and incremental use."""

from __future__ import annotations

from vfdirect.core.crc32c import crc32c


def test_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283


def test_known_vectors_and_continuation() -> None:
    assert crc32c(b"") == 0
    # RFC 3720 (iSCSI) B.4: 32 bytes of zeros, of 0xFF
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    data = bytes(range(256)) * 3
    assert crc32c(data[100:], crc32c(data[:100])) == crc32c(data)
