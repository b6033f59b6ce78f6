"""CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven (pure).

The standard library has no CRC-32C; this is the one the verifier blocks carry
(:func:`vfdirect.core.guest.journal.make_block`). Check value:
``crc32c(b"123456789") == 0xE3069283``.
"""

from __future__ import annotations

__all__ = ["CRC32C_POLY", "crc32c"]

#: The reflected Castagnoli polynomial.
CRC32C_POLY = 0x82F63B78


def _table() -> tuple[int, ...]:
    out = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ CRC32C_POLY if crc & 1 else crc >> 1
        out.append(crc)
    return tuple(out)


_TABLE = _table()


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """The CRC-32C of ``data``; ``value`` continues an earlier CRC (as ``zlib.crc32``)."""
    crc = value ^ 0xFFFFFFFF
    table = _TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
