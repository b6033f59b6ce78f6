"""What an initiator reads from parameter data (pure): standard INQUIRY data, VPD pages
80h (unit serial number) and 83h (device identification), READ CAPACITY(16) data.

Rules of this module: every parser takes the bytes the device returned (possibly
truncated by the allocation length or by a residual) and returns a frozen record, or
raises :class:`ScsiDataError`; never another exception.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Capacity",
    "InquiryInfo",
    "ScsiDataError",
    "parse_inquiry",
    "parse_read_capacity16",
    "parse_vpd_devid_naa",
    "parse_vpd_serial",
]

#: Peripheral qualifier 011b: "the device server is not capable of supporting a
#: peripheral device on this logical unit" (SPC-4 6.6.2).
QUALIFIER_NOT_SUPPORTED = 0b011
DIRECT_ACCESS = 0x00


class ScsiDataError(ValueError):
    """Parameter data too short or inconsistent."""


@dataclass(frozen=True, slots=True)
class InquiryInfo:
    qualifier: int
    device_type: int
    vendor: str
    product: str
    revision: str

    @property
    def present(self) -> bool:
        """A logical unit is there (qualifier 000b; 001b means "not connected now")."""
        return self.qualifier == 0


def _ascii(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip()


def parse_inquiry(data: bytes) -> InquiryInfo:
    """Standard INQUIRY data (SPC-4 6.6.2); at least 5 bytes (vendor/product/revision
    read as empty when truncated)."""
    if len(data) < 5:
        raise ScsiDataError(f"standard INQUIRY data of {len(data)} bytes")
    return InquiryInfo(data[0] >> 5, data[0] & 0x1F, _ascii(data[8:16]), _ascii(data[16:32]),
                       _ascii(data[32:36]))


@dataclass(frozen=True, slots=True)
class Capacity:
    num_blocks: int
    block_size: int


def parse_read_capacity16(data: bytes) -> Capacity:
    """READ CAPACITY(16) parameter data (SBC-3): RETURNED LOGICAL BLOCK ADDRESS (the
    last LBA) and LOGICAL BLOCK LENGTH IN BYTES."""
    if len(data) < 12:
        raise ScsiDataError(f"READ CAPACITY(16) data of {len(data)} bytes")
    last = int.from_bytes(data[0:8], "big")
    size = int.from_bytes(data[8:12], "big")
    if size == 0:
        raise ScsiDataError("logical block length 0")
    return Capacity(last + 1, size)


def _vpd(data: bytes, page: int) -> bytes:
    if len(data) < 4:
        raise ScsiDataError(f"VPD page {page:#04x} of {len(data)} bytes")
    if data[1] != page:
        raise ScsiDataError(f"asked VPD page {page:#04x}, got {data[1]:#04x}")
    length = int.from_bytes(data[2:4], "big")
    return bytes(data[4:4 + length])


def parse_vpd_serial(data: bytes) -> str:
    """VPD page 80h: PRODUCT SERIAL NUMBER (SPC-4 7.8.15), ASCII, trailing blanks off."""
    return _ascii(_vpd(data, 0x80))


def parse_vpd_devid_naa(data: bytes) -> str | None:
    """The logical unit's NAA designator from VPD page 83h (SPC-4 7.8.6), as
    ``naa.<hex>``; ``None`` when the page names none."""
    body = _vpd(data, 0x83)
    pos = 0
    while pos + 4 <= len(body):
        code_set = body[pos] & 0x0F
        association = body[pos + 1] >> 4 & 0x03
        designator_type = body[pos + 1] & 0x0F
        length = body[pos + 3]
        designator = body[pos + 4:pos + 4 + length]
        # Binary code set (1), association logical unit (0), designator type NAA (3).
        if code_set == 1 and association == 0 and designator_type == 3 and designator:
            return "naa." + designator.hex()
        pos += 4 + length
    return None
