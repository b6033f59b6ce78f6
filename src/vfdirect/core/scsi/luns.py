"""SAM-5 logical unit numbers: the 8-byte LUN structure and REPORT LUNS parameter data.

Rules of this module:

* a LUN inside vfdirect is a :data:`~vfdirect.core.ids.LunNumber` in 0..16383; the 8-byte
  form exists only on the wire and is made or read here;
* single-level LUNs only (SAM-5, "single level LUN structure"): peripheral device
  addressing (00b) for 0..255 and flat space addressing (01b) for 256..16383. Every other
  form (a bus identifier other than zero, a second level, logical unit or extended
  addressing, well-known LUNs) is refused with :class:`LunError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

from vfdirect.core.ids import LunNumber

#: Highest LUN number: flat space addressing carries 14 bits (SAM-5).
MAX_LUN = 16383
#: Size of a LUN on the wire (SAM-5, "LUN representation").
LUN_LEN = 8
#: Size of the REPORT LUNS parameter data header (SPC-4 6.33 table 286).
REPORT_LUNS_HEADER_LEN = 8


class LunError(ValueError):
    """A LUN number is out of range, or an 8-byte LUN uses a form this target does not
    support."""


class AddressMethod(IntEnum):
    """ADDRESS METHOD, the two top bits of each level of a LUN (SAM-5)."""

    PERIPHERAL_DEVICE = 0b00
    FLAT_SPACE = 0b01
    LOGICAL_UNIT = 0b10
    EXTENDED_LOGICAL_UNIT = 0b11


def check_lun(lun: int) -> LunNumber:
    """``lun`` as a :data:`LunNumber`, or :class:`LunError` if it is not 0..16383."""
    if isinstance(lun, bool) or not isinstance(lun, int) or not 0 <= lun <= MAX_LUN:
        raise LunError(f"LUN {lun!r} is not in 0..{MAX_LUN}")
    return LunNumber(lun)


def encode_lun(lun: int) -> bytes:
    """The 8-byte single-level LUN for ``lun``.

    0..255 use peripheral device addressing with bus identifier 0 (first byte 00h, second
    byte the LUN), as SAM-5 asks for LUNs that fit; 256..16383 use flat space addressing
    (first byte 40h | the six high bits). Levels two to four are zero.
    """
    n = int(check_lun(lun))
    if n <= 0xFF:
        first = (AddressMethod.PERIPHERAL_DEVICE << 6, n)
    else:
        first = ((AddressMethod.FLAT_SPACE << 6) | (n >> 8), n & 0xFF)
    return bytes(first) + bytes(LUN_LEN - 2)


def decode_lun(raw: bytes | bytearray | memoryview) -> LunNumber:
    """The LUN number of an 8-byte single-level LUN; :class:`LunError` for anything else.

    Flat space addressing of a LUN below 256 is accepted and names the same LU as
    peripheral device addressing would.
    """
    data = bytes(raw)
    if len(data) != LUN_LEN:
        raise LunError(f"a LUN is {LUN_LEN} bytes, not {len(data)}")
    if any(data[2:]):
        raise LunError(f"LUN {data.hex()} has more than one level")
    method = AddressMethod(data[0] >> 6)
    if method == AddressMethod.PERIPHERAL_DEVICE:
        if data[0] & 0x3F:
            # A non-zero bus identifier addresses a device behind a bus: a second level.
            raise LunError(f"LUN {data.hex()} has a non-zero bus identifier")
        return LunNumber(data[1])
    if method == AddressMethod.FLAT_SPACE:
        return LunNumber(((data[0] & 0x3F) << 8) | data[1])
    raise LunError(f"LUN {data.hex()} uses {method.name} addressing, which is not supported")


def report_luns_data(luns: Iterable[int]) -> bytes:
    """REPORT LUNS parameter data (SPC-4 6.33 table 286): LUN LIST LENGTH (4 bytes, 8 per
    LUN), 4 reserved bytes, then the LUNs in ascending order, without duplicates."""
    ordered = sorted({check_lun(n) for n in luns})
    body = b"".join(encode_lun(n) for n in ordered)
    return len(body).to_bytes(4, "big") + bytes(4) + body


def parse_report_luns(data: bytes | bytearray | memoryview) -> list[bytes]:
    """The 8-byte LUNs of REPORT LUNS parameter data, for an initiator.

    Truncated data (allocation length shorter than the list) yields the complete entries
    that arrived; :class:`LunError` if even the header is missing.
    """
    raw = bytes(data)
    if len(raw) < REPORT_LUNS_HEADER_LEN:
        raise LunError(f"REPORT LUNS data needs an 8-byte header, got {len(raw)} bytes")
    list_len = int.from_bytes(raw[0:4], "big")
    end = min(len(raw), REPORT_LUNS_HEADER_LEN + list_len)
    count = (end - REPORT_LUNS_HEADER_LEN) // LUN_LEN
    return [
        raw[REPORT_LUNS_HEADER_LEN + i * LUN_LEN : REPORT_LUNS_HEADER_LEN + (i + 1) * LUN_LEN]
        for i in range(count)
    ]
