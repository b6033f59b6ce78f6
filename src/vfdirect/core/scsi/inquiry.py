"""INQUIRY parameter data: standard data and the vital product data pages.

Rules of this module:

* pure builders: identity and geometry in, the full parameter data out; truncation to
  the allocation length happens where data is sent
  (:meth:`vfdirect.core.scsi.task.Task.send`), never here, so length fields always
  describe the full data (SPC-4 4.2.5.6);
* the set of VPD pages is the table :data:`LU_VPD_PAGES`; page 00h is built from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vfdirect.core.scsi.identity import (
    PRODUCT_LEN,
    REVISION_LEN,
    VENDOR_LEN,
    BlockLimits,
    LuIdentity,
    padded,
)
from vfdirect.core.scsi.opcodes import (
    RESPONSE_DATA_FORMAT,
    SPC4_VERSION,
    Association,
    CodeSet,
    DesignatorType,
    PeripheralDeviceType,
    PeripheralQualifier,
    ProtocolIdentifier,
    VersionDescriptor,
    VpdPage,
)

#: Standard INQUIRY data length: through the reserved bytes 74-95 of SPC-4 6.6.2, so the
#: version descriptors (bytes 58-73) are included.
STANDARD_INQUIRY_LEN = 96
_VERSION_DESCRIPTORS = (VersionDescriptor.SAM_5, VersionDescriptor.SPC_4, VersionDescriptor.SBC_3)
#: PAGE LENGTH of the Block Limits VPD page (SBC-3): 003Ch.
BLOCK_LIMITS_PAGE_LEN = 0x3C


def peripheral_byte(qualifier: PeripheralQualifier, device_type: PeripheralDeviceType) -> int:
    """Byte 0 of INQUIRY data and of every VPD page (SPC-4 6.6.2, 7.8)."""
    return (qualifier << 5) | device_type


#: Byte 0 of data for a LUN with a logical unit: qualifier 000b, direct-access block.
LU_PERIPHERAL = peripheral_byte(
    PeripheralQualifier.CONNECTED, PeripheralDeviceType.DIRECT_ACCESS_BLOCK
)
#: Byte 0 of data for a LUN without one: qualifier 011b, device type 1Fh (SPC-4 6.6.2);
#: Linux's scanner skips such a LUN but still uses LUN 0 to send REPORT LUNS.
NO_LU_PERIPHERAL = peripheral_byte(
    PeripheralQualifier.NOT_SUPPORTED, PeripheralDeviceType.UNKNOWN_OR_NONE
)


def standard_inquiry_data(peripheral: int, vendor: str, product: str, revision: str) -> bytes:
    """Standard INQUIRY data (SPC-4 6.6.2), :data:`STANDARD_INQUIRY_LEN` bytes."""
    out = bytearray(STANDARD_INQUIRY_LEN)
    out[0] = peripheral
    out[1] = 0x00  # RMB 0 (not removable), LU_CONG 0
    out[2] = SPC4_VERSION
    # NORMACA 0 (no ACA: NACA=1 CDBs are refused), HISUP 1 (hierarchical LUNs, SAM-5),
    # RESPONSE DATA FORMAT 2.
    out[3] = 0x10 | RESPONSE_DATA_FORMAT
    out[4] = STANDARD_INQUIRY_LEN - 5  # ADDITIONAL LENGTH (n-4)
    out[5] = 0x00  # SCCS, ACC, TPGS, 3PC, PROTECT: none of these features
    out[6] = 0x00  # ENCSERV 0, MULTIP 0 (one port per target)
    out[7] = 0x02  # CMDQUE 1: the SAM-5 command management model (queued commands)
    out[8:16] = padded(vendor, VENDOR_LEN)
    out[16:32] = padded(product, PRODUCT_LEN)
    out[32:36] = padded(revision, REVISION_LEN)
    # 36-55 vendor specific, 56 SPI-only bits, 57 reserved: zero.
    for i, descriptor in enumerate(_VERSION_DESCRIPTORS):
        out[58 + 2 * i : 60 + 2 * i] = descriptor.to_bytes(2, "big")
    return bytes(out)


def vpd_page(peripheral: int, page: int, payload: bytes) -> bytes:
    """A VPD page: peripheral byte, PAGE CODE, 2-byte PAGE LENGTH, payload (SPC-4 7.8)."""
    return bytes((peripheral, page)) + len(payload).to_bytes(2, "big") + payload


@dataclass(frozen=True, slots=True)
class Designator:
    """One designation descriptor of the Device Identification VPD page (SPC-4 7.8.6.1).
    ``protocol`` set means PIV=1 (only meaningful for target port / device associations)."""

    designator_type: DesignatorType
    code_set: CodeSet
    value: bytes
    association: Association = Association.LOGICAL_UNIT
    protocol: ProtocolIdentifier | None = None

    def __post_init__(self) -> None:
        if len(self.value) > 0xFF:
            raise ValueError(f"designator of {len(self.value)} bytes exceeds 255")

    def encode(self) -> bytes:
        proto = 0 if self.protocol is None else int(self.protocol)
        piv = 0 if self.protocol is None else 0x80
        return (
            bytes(
                (
                    (proto << 4) | self.code_set,
                    piv | (self.association << 4) | self.designator_type,
                    0x00,
                    len(self.value),
                )
            )
            + self.value
        )


def lu_designators(identity: LuIdentity) -> list[Designator]:
    """Designators of an LU: NAA (binary, LU association; the NAA format is SPC-4
    7.8.6.6), T10 vendor id (vendor + serial, ASCII), then the optional target
    port name and relative target port (target port association, PIV with the protocol)."""
    out = [
        Designator(DesignatorType.NAA, CodeSet.BINARY, identity.wwn.raw),
        Designator(
            DesignatorType.T10_VENDOR_ID,
            CodeSet.ASCII,
            padded(identity.vendor, VENDOR_LEN) + identity.serial.encode("ascii"),
        ),
    ]
    if identity.target_port_wwn is not None:
        out.append(
            Designator(
                DesignatorType.NAA,
                CodeSet.BINARY,
                identity.target_port_wwn.raw,
                Association.TARGET_PORT,
                identity.protocol,
            )
        )
    if identity.relative_target_port is not None:
        out.append(
            Designator(
                DesignatorType.RELATIVE_TARGET_PORT,
                CodeSet.BINARY,
                bytes(2) + identity.relative_target_port.to_bytes(2, "big"),
                Association.TARGET_PORT,
                identity.protocol,
            )
        )
    return out


def block_limits_payload(limits: BlockLimits) -> bytes:
    """Bytes 4.. of the Block Limits VPD page (SBC-3)."""
    p = bytearray(BLOCK_LIMITS_PAGE_LEN)
    # page byte 4: WSNZ 0; byte 5: MAXIMUM COMPARE AND WRITE LENGTH 0 (not supported)
    p[2:4] = limits.optimal_granularity_blocks.to_bytes(2, "big")  # bytes 6-7
    p[4:8] = limits.max_transfer_blocks.to_bytes(4, "big")  # bytes 8-11
    p[8:12] = limits.optimal_transfer_blocks.to_bytes(4, "big")  # bytes 12-15
    # bytes 16-63: prefetch/unmap/write-same limits and reserved: zero (unsupported).
    return bytes(p)


_PayloadBuilder = Callable[[LuIdentity], bytes]


def _supported_pages(_identity: LuIdentity) -> bytes:
    return bytes(sorted(LU_VPD_PAGES))


#: The VPD pages of a logical unit, each with the builder of its payload.
LU_VPD_PAGES: dict[int, _PayloadBuilder] = {
    VpdPage.SUPPORTED_VPD_PAGES: _supported_pages,
    VpdPage.UNIT_SERIAL_NUMBER: lambda ident: ident.serial.encode("ascii"),
    VpdPage.DEVICE_IDENTIFICATION: lambda ident: b"".join(
        d.encode() for d in lu_designators(ident)
    ),
    VpdPage.BLOCK_LIMITS: lambda ident: block_limits_payload(ident.limits),
}


def lu_vpd_page(identity: LuIdentity, page: int) -> bytes | None:
    """The full VPD page ``page`` of a logical unit, or ``None`` if it has no such page."""
    build = LU_VPD_PAGES.get(page)
    if build is None:
        return None
    return vpd_page(LU_PERIPHERAL, page, build(identity))


def no_lu_vpd_page(page: int) -> bytes | None:
    """VPD data for a LUN without a logical unit: only page 00h, listing itself, with
    qualifier 011b (SPC-4 6.6.1: INQUIRY fails only when the data cannot be returned)."""
    if page != VpdPage.SUPPORTED_VPD_PAGES:
        return None
    return vpd_page(NO_LU_PERIPHERAL, page, bytes((VpdPage.SUPPORTED_VPD_PAGES,)))
