"""Command descriptor blocks: decoded into typed frozen records, and encoded back.

Rules of this module:

* :func:`decode_cdb` takes any bytes and returns one of the command records below, or
  raises :class:`~vfdirect.core.scsi.sense.CheckCondition`; never another exception;
* a decoded record captures every bit of the CDB: each bit is either a field of the
  record or must be zero, so ``decode_cdb(b).encode() == b[:length]`` for every ``b``
  that decodes;
* this module checks the *form* of a CDB (reserved bits, field combinations the
  standards forbid, features this target never has: ACA, linked commands, protection
  information). What depends on the logical unit (its capacity, which VPD or mode pages
  exist, block limits) is checked where the command is executed.

Choices where the standards leave room:

* Reserved, restricted and obsolete bits set → INVALID FIELD IN CDB (the SPC-4 keyword
  *reserved* lets a recipient check reserved fields; *restricted* bits are treated as
  reserved), the field pointer naming the most significant offending bit. A named
  field we cannot honour (RDPROTECT, NACA, ...) is pointed at by its most significant
  bit, as SPC-4 4.5.2.4.2 asks.
* A CDB shorter than its operation code's length → INVALID COMMAND OPERATION CODE: the
  operation code with that CDB length is not a command this device server supports (as
  REPORT SUPPORTED OPERATION CODES would list it), and that is also what QEMU answers.
  Bytes past the length (a transport's fixed-size CDB area) are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from vfdirect.core.scsi.opcodes import Opcode, PageControl, ServiceActionIn16
from vfdirect.core.scsi.sense import INVALID_COMMAND_OPERATION_CODE, CheckCondition

# CONTROL byte (SAM-5, CDB format): bits 7-6 vendor specific, 5-3 reserved, 2 NACA, 1 obsolete
# (was FLAG), 0 obsolete (was LINK).
_CONTROL_VENDOR = 0xC0
_CONTROL_NACA = 0x04
_CONTROL_LINK = 0x01
_CONTROL_RESERVED = 0x3A


class CdbFieldError(ValueError):
    """A command record was built with a field value that does not fit its CDB field
    (a programming error of the caller, never raised by decoding)."""


def _fits(obj: object, *fields: tuple[str, int]) -> None:
    for name, bits in fields:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CdbFieldError(f"{type(obj).__name__}.{name} must be an int, not {value!r}")
        if not 0 <= value < (1 << bits):
            raise CdbFieldError(f"{type(obj).__name__}.{name}={value} does not fit {bits} bits")


def _check_control(obj: object) -> None:
    _fits(obj, ("control", 8))
    control: int = getattr(obj, "control")  # noqa: B009 - typed access to a dataclass field
    if control & ~_CONTROL_VENDOR:
        raise CdbFieldError(
            f"{type(obj).__name__}.control={control:#04x}: only the vendor bits 7-6 may be set"
        )


def _flag(value: bool, bit: int) -> int:
    return (1 << bit) if value else 0


@dataclass(frozen=True, slots=True)
class TestUnitReady:
    """TEST UNIT READY (SPC-4 6.47)."""

    __test__: ClassVar[bool] = False  # not a pytest test class, despite its name
    OPCODE: ClassVar[Opcode] = Opcode.TEST_UNIT_READY
    LENGTH: ClassVar[int] = 6

    control: int = 0

    def __post_init__(self) -> None:
        _check_control(self)

    def encode(self) -> bytes:
        return bytes((self.OPCODE, 0, 0, 0, 0, self.control))


@dataclass(frozen=True, slots=True)
class RequestSense:
    """REQUEST SENSE (SPC-4 6.39)."""

    OPCODE: ClassVar[Opcode] = Opcode.REQUEST_SENSE
    LENGTH: ClassVar[int] = 6

    desc: bool = False
    allocation_length: int = 18
    control: int = 0

    def __post_init__(self) -> None:
        _fits(self, ("allocation_length", 8))
        _check_control(self)

    def encode(self) -> bytes:
        return bytes((self.OPCODE, _flag(self.desc, 0), 0, 0, self.allocation_length, self.control))


@dataclass(frozen=True, slots=True)
class Inquiry:
    """INQUIRY (SPC-4 6.6). ``page_code`` is zero unless ``evpd`` (SPC-4 6.6.1)."""

    OPCODE: ClassVar[Opcode] = Opcode.INQUIRY
    LENGTH: ClassVar[int] = 6

    evpd: bool = False
    page_code: int = 0
    allocation_length: int = 36
    control: int = 0

    def __post_init__(self) -> None:
        _fits(self, ("page_code", 8), ("allocation_length", 16))
        _check_control(self)
        if not self.evpd and self.page_code:
            raise CdbFieldError("INQUIRY page_code must be 0 when evpd is False")

    def encode(self) -> bytes:
        return (
            bytes((self.OPCODE, _flag(self.evpd, 0), self.page_code))
            + self.allocation_length.to_bytes(2, "big")
            + bytes((self.control,))
        )


@dataclass(frozen=True, slots=True)
class ModeSense6:
    """MODE SENSE(6) (SPC-4 6.13)."""

    OPCODE: ClassVar[Opcode] = Opcode.MODE_SENSE_6
    LENGTH: ClassVar[int] = 6

    dbd: bool = False
    pc: PageControl = PageControl.CURRENT
    page_code: int = 0x3F
    subpage_code: int = 0
    allocation_length: int = 0xFF
    control: int = 0

    def __post_init__(self) -> None:
        _fits(self, ("pc", 2), ("page_code", 6), ("subpage_code", 8), ("allocation_length", 8))
        _check_control(self)

    def encode(self) -> bytes:
        return bytes(
            (
                self.OPCODE,
                _flag(self.dbd, 3),
                (self.pc << 6) | self.page_code,
                self.subpage_code,
                self.allocation_length,
                self.control,
            )
        )


@dataclass(frozen=True, slots=True)
class ModeSense10:
    """MODE SENSE(10) (SPC-4 6.14)."""

    OPCODE: ClassVar[Opcode] = Opcode.MODE_SENSE_10
    LENGTH: ClassVar[int] = 10

    llbaa: bool = False
    dbd: bool = False
    pc: PageControl = PageControl.CURRENT
    page_code: int = 0x3F
    subpage_code: int = 0
    allocation_length: int = 0xFFFF
    control: int = 0

    def __post_init__(self) -> None:
        _fits(self, ("pc", 2), ("page_code", 6), ("subpage_code", 8), ("allocation_length", 16))
        _check_control(self)

    def encode(self) -> bytes:
        return (
            bytes(
                (
                    self.OPCODE,
                    _flag(self.llbaa, 4) | _flag(self.dbd, 3),
                    (self.pc << 6) | self.page_code,
                    self.subpage_code,
                    0,
                    0,
                    0,
                )
            )
            + self.allocation_length.to_bytes(2, "big")
            + bytes((self.control,))
        )


@dataclass(frozen=True, slots=True)
class ReadCapacity10:
    """READ CAPACITY(10) (SBC-3). With ``pmi`` False the LBA must be zero (SBC-3)."""

    OPCODE: ClassVar[Opcode] = Opcode.READ_CAPACITY_10
    LENGTH: ClassVar[int] = 10

    lba: int = 0
    pmi: bool = False
    control: int = 0

    def __post_init__(self) -> None:
        _fits(self, ("lba", 32))
        _check_control(self)
        if not self.pmi and self.lba:
            raise CdbFieldError("READ CAPACITY lba must be 0 when pmi is False")

    def encode(self) -> bytes:
        return (
            bytes((self.OPCODE, 0))
            + self.lba.to_bytes(4, "big")
            + bytes((0, 0, _flag(self.pmi, 0), self.control))
        )


@dataclass(frozen=True, slots=True)
class ReadCapacity16:
    """SERVICE ACTION IN(16) / READ CAPACITY(16) (SBC-3)."""

    OPCODE: ClassVar[Opcode] = Opcode.SERVICE_ACTION_IN_16
    SERVICE_ACTION: ClassVar[ServiceActionIn16] = ServiceActionIn16.READ_CAPACITY_16
    LENGTH: ClassVar[int] = 16

    lba: int = 0
    allocation_length: int = 32
    pmi: bool = False
    control: int = 0

    def __post_init__(self) -> None:
        _fits(self, ("lba", 64), ("allocation_length", 32))
        _check_control(self)
        if not self.pmi and self.lba:
            raise CdbFieldError("READ CAPACITY lba must be 0 when pmi is False")

    def encode(self) -> bytes:
        return (
            bytes((self.OPCODE, self.SERVICE_ACTION))
            + self.lba.to_bytes(8, "big")
            + self.allocation_length.to_bytes(4, "big")
            + bytes((_flag(self.pmi, 0), self.control))
        )


@dataclass(frozen=True, slots=True)
class _ReadWrite10:
    """Common layout of READ(10) and WRITE(10) (SBC-3): byte 1 RDPROTECT/WRPROTECT (7-5,
    must be zero), DPO (4), FUA (3), reserved (2), FUA_NV (1), obsolete (0)."""

    OPCODE: ClassVar[Opcode]
    LENGTH: ClassVar[int] = 10

    lba: int = 0
    transfer_length: int = 0
    dpo: bool = False
    fua: bool = False
    fua_nv: bool = False
    group_number: int = 0
    control: int = 0

    def __post_init__(self) -> None:
        _fits(self, ("lba", 32), ("transfer_length", 16), ("group_number", 5))
        _check_control(self)

    def encode(self) -> bytes:
        return (
            bytes((self.OPCODE, _byte1_rw(self.dpo, self.fua, self.fua_nv)))
            + self.lba.to_bytes(4, "big")
            + bytes((self.group_number,))
            + self.transfer_length.to_bytes(2, "big")
            + bytes((self.control,))
        )


@dataclass(frozen=True, slots=True)
class _ReadWrite16:
    """Common layout of READ(16) and WRITE(16) (SBC-3); byte 1 as in the 10-byte form
    with bit 0 reserved."""

    OPCODE: ClassVar[Opcode]
    LENGTH: ClassVar[int] = 16

    lba: int = 0
    transfer_length: int = 0
    dpo: bool = False
    fua: bool = False
    fua_nv: bool = False
    group_number: int = 0
    control: int = 0

    def __post_init__(self) -> None:
        _fits(self, ("lba", 64), ("transfer_length", 32), ("group_number", 5))
        _check_control(self)

    def encode(self) -> bytes:
        return (
            bytes((self.OPCODE, _byte1_rw(self.dpo, self.fua, self.fua_nv)))
            + self.lba.to_bytes(8, "big")
            + self.transfer_length.to_bytes(4, "big")
            + bytes((self.group_number, self.control))
        )


def _byte1_rw(dpo: bool, fua: bool, fua_nv: bool) -> int:
    return _flag(dpo, 4) | _flag(fua, 3) | _flag(fua_nv, 1)


@dataclass(frozen=True, slots=True)
class Read10(_ReadWrite10):
    """READ(10) (SBC-3)."""

    OPCODE: ClassVar[Opcode] = Opcode.READ_10


@dataclass(frozen=True, slots=True)
class Write10(_ReadWrite10):
    """WRITE(10) (SBC-3)."""

    OPCODE: ClassVar[Opcode] = Opcode.WRITE_10


@dataclass(frozen=True, slots=True)
class Read16(_ReadWrite16):
    """READ(16) (SBC-3)."""

    OPCODE: ClassVar[Opcode] = Opcode.READ_16


@dataclass(frozen=True, slots=True)
class Write16(_ReadWrite16):
    """WRITE(16) (SBC-3)."""

    OPCODE: ClassVar[Opcode] = Opcode.WRITE_16


@dataclass(frozen=True, slots=True)
class SynchronizeCache10:
    """SYNCHRONIZE CACHE(10) (SBC-3). ``num_blocks`` 0 means "through the last LBA"."""

    OPCODE: ClassVar[Opcode] = Opcode.SYNCHRONIZE_CACHE_10
    LENGTH: ClassVar[int] = 10

    lba: int = 0
    num_blocks: int = 0
    immed: bool = False
    sync_nv: bool = False
    group_number: int = 0
    control: int = 0

    def __post_init__(self) -> None:
        _fits(self, ("lba", 32), ("num_blocks", 16), ("group_number", 5))
        _check_control(self)

    def encode(self) -> bytes:
        return (
            bytes((self.OPCODE, _flag(self.sync_nv, 2) | _flag(self.immed, 1)))
            + self.lba.to_bytes(4, "big")
            + bytes((self.group_number,))
            + self.num_blocks.to_bytes(2, "big")
            + bytes((self.control,))
        )


@dataclass(frozen=True, slots=True)
class SynchronizeCache16:
    """SYNCHRONIZE CACHE(16) (SBC-3)."""

    OPCODE: ClassVar[Opcode] = Opcode.SYNCHRONIZE_CACHE_16
    LENGTH: ClassVar[int] = 16

    lba: int = 0
    num_blocks: int = 0
    immed: bool = False
    sync_nv: bool = False
    group_number: int = 0
    control: int = 0

    def __post_init__(self) -> None:
        _fits(self, ("lba", 64), ("num_blocks", 32), ("group_number", 5))
        _check_control(self)

    def encode(self) -> bytes:
        return (
            bytes((self.OPCODE, _flag(self.sync_nv, 2) | _flag(self.immed, 1)))
            + self.lba.to_bytes(8, "big")
            + self.num_blocks.to_bytes(4, "big")
            + bytes((self.group_number, self.control))
        )


@dataclass(frozen=True, slots=True)
class ReportLuns:
    """REPORT LUNS (SPC-4 6.33). ``select_report`` is kept as sent; the target decides
    which values it honours."""

    OPCODE: ClassVar[Opcode] = Opcode.REPORT_LUNS
    LENGTH: ClassVar[int] = 12

    select_report: int = 0
    allocation_length: int = 4096
    control: int = 0

    def __post_init__(self) -> None:
        _fits(self, ("select_report", 8), ("allocation_length", 32))
        _check_control(self)

    def encode(self) -> bytes:
        return (
            bytes((self.OPCODE, 0, self.select_report, 0, 0, 0))
            + self.allocation_length.to_bytes(4, "big")
            + bytes((0, self.control))
        )


Command: TypeAlias = (
    TestUnitReady
    | RequestSense
    | Inquiry
    | ModeSense6
    | ModeSense10
    | ReadCapacity10
    | ReadCapacity16
    | Read10
    | Read16
    | Write10
    | Write16
    | SynchronizeCache10
    | SynchronizeCache16
    | ReportLuns
)
ReadCommand: TypeAlias = Read10 | Read16
WriteCommand: TypeAlias = Write10 | Write16
SyncCacheCommand: TypeAlias = SynchronizeCache10 | SynchronizeCache16
ModeSenseCommand: TypeAlias = ModeSense6 | ModeSense10

# ---------------------------------------------------------------------------------------
# Decoding


def _reserved(b: bytes, byte: int, mask: int) -> None:
    """Reserved (or obsolete) bits ``mask`` of ``byte`` must be zero; the field pointer
    names the most significant offending bit."""
    bad = b[byte] & mask
    if bad:
        raise CheckCondition.invalid_cdb_field(
            byte, bad.bit_length() - 1, reason=f"reserved bits {bad:#04x} set in CDB byte {byte}"
        )


def _reserved_bytes(b: bytes, start: int, stop: int) -> None:
    for i in range(start, stop):
        _reserved(b, i, 0xFF)


def _unsupported(b: bytes, byte: int, mask: int, what: str) -> None:
    """A named field this target cannot honour must be zero; the pointer names the
    field's most significant bit (SPC-4 4.5.2.4.2)."""
    if b[byte] & mask:
        raise CheckCondition.invalid_cdb_field(byte, mask.bit_length() - 1, reason=what)


def _control(b: bytes) -> int:
    i = len(b) - 1
    _unsupported(b, i, _CONTROL_NACA, "NACA=1, but ACA is not supported (SAM-5)")
    _unsupported(b, i, _CONTROL_LINK, "LINK=1, but linked commands are not supported")
    _reserved(b, i, _CONTROL_RESERVED)
    return b[i]


def _u(b: bytes, start: int, stop: int) -> int:
    return int.from_bytes(b[start:stop], "big")


def _decode_tur(b: bytes) -> Command:
    _reserved_bytes(b, 1, 5)
    return TestUnitReady(control=_control(b))


def _decode_request_sense(b: bytes) -> Command:
    _reserved(b, 1, 0xFE)
    _reserved_bytes(b, 2, 4)
    return RequestSense(desc=bool(b[1] & 0x01), allocation_length=b[4], control=_control(b))


def _decode_inquiry(b: bytes) -> Command:
    _reserved(b, 1, 0xFC)
    # Bit 1 was CMDDT; obsolete since SPC-3, so command support data cannot be asked for.
    _unsupported(b, 1, 0x02, "CMDDT=1: command support data is obsolete (SPC-3)")
    evpd = bool(b[1] & 0x01)
    if not evpd and b[2]:
        # SPC-4 6.6.1: PAGE CODE non-zero with EVPD zero is an invalid field.
        raise CheckCondition.invalid_cdb_field(2, reason="PAGE CODE set without EVPD")
    return Inquiry(evpd=evpd, page_code=b[2], allocation_length=_u(b, 3, 5), control=_control(b))


def _decode_mode_sense6(b: bytes) -> Command:
    _reserved(b, 1, 0xF7)
    return ModeSense6(
        dbd=bool(b[1] & 0x08),
        pc=PageControl(b[2] >> 6),
        page_code=b[2] & 0x3F,
        subpage_code=b[3],
        allocation_length=b[4],
        control=_control(b),
    )


def _decode_mode_sense10(b: bytes) -> Command:
    _reserved(b, 1, 0xE7)
    _reserved_bytes(b, 4, 7)
    return ModeSense10(
        llbaa=bool(b[1] & 0x10),
        dbd=bool(b[1] & 0x08),
        pc=PageControl(b[2] >> 6),
        page_code=b[2] & 0x3F,
        subpage_code=b[3],
        allocation_length=_u(b, 7, 9),
        control=_control(b),
    )


def _pmi_rule(lba: int, pmi: bool) -> None:
    # SBC-3 READ CAPACITY: with PMI zero a non-zero LOGICAL BLOCK ADDRESS is an invalid
    # field (the field is only meaningful for partial medium indication).
    if not pmi and lba:
        raise CheckCondition.invalid_cdb_field(2, reason="LBA set while PMI is zero")


def _decode_read_capacity10(b: bytes) -> Command:
    _reserved(b, 1, 0xFF)  # bits 7-1 reserved, bit 0 obsolete (RELADR)
    _reserved_bytes(b, 6, 8)
    _reserved(b, 8, 0xFE)
    lba, pmi = _u(b, 2, 6), bool(b[8] & 0x01)
    _pmi_rule(lba, pmi)
    return ReadCapacity10(lba=lba, pmi=pmi, control=_control(b))


def _decode_service_action_in16(b: bytes) -> Command:
    _reserved(b, 1, 0xE0)
    if b[1] & 0x1F != ServiceActionIn16.READ_CAPACITY_16:
        # SPC-4 4.2.5.2: an unsupported service action is an invalid field in the CDB.
        raise CheckCondition.invalid_cdb_field(
            1, 4, reason=f"SERVICE ACTION IN(16) service action {b[1] & 0x1F:#04x}"
        )
    _reserved(b, 14, 0xFE)
    lba, pmi = _u(b, 2, 10), bool(b[14] & 0x01)
    _pmi_rule(lba, pmi)
    return ReadCapacity16(lba=lba, allocation_length=_u(b, 10, 14), pmi=pmi, control=_control(b))


_NO_PROTECTION = "RDPROTECT/WRPROTECT non-zero, but protection information is not supported"


def _rw_byte1(b: bytes) -> tuple[bool, bool, bool]:
    # SBC-3: without protection information, a non-zero RDPROTECT/WRPROTECT is an invalid
    # field. Bit 2 is reserved; bit 0 is obsolete (RELADR) in the 10-byte and reserved in
    # the 16-byte form.
    _unsupported(b, 1, 0xE0, _NO_PROTECTION)
    _reserved(b, 1, 0x05)
    return bool(b[1] & 0x10), bool(b[1] & 0x08), bool(b[1] & 0x02)


def _decode_rw10(cls: type[Read10] | type[Write10]) -> Callable[[bytes], Command]:
    def decode(b: bytes) -> Command:
        dpo, fua, fua_nv = _rw_byte1(b)
        _reserved(b, 6, 0xE0)
        return cls(
            lba=_u(b, 2, 6),
            transfer_length=_u(b, 7, 9),
            dpo=dpo,
            fua=fua,
            fua_nv=fua_nv,
            group_number=b[6] & 0x1F,
            control=_control(b),
        )

    return decode


def _decode_rw16(cls: type[Read16] | type[Write16]) -> Callable[[bytes], Command]:
    def decode(b: bytes) -> Command:
        dpo, fua, fua_nv = _rw_byte1(b)
        _reserved(b, 14, 0xE0)
        return cls(
            lba=_u(b, 2, 10),
            transfer_length=_u(b, 10, 14),
            dpo=dpo,
            fua=fua,
            fua_nv=fua_nv,
            group_number=b[14] & 0x1F,
            control=_control(b),
        )

    return decode


def _decode_sync10(b: bytes) -> Command:
    _reserved(b, 1, 0xF9)  # bits 7-3 reserved, bit 0 obsolete (RELADR)
    _reserved(b, 6, 0xE0)
    return SynchronizeCache10(
        lba=_u(b, 2, 6),
        num_blocks=_u(b, 7, 9),
        immed=bool(b[1] & 0x02),
        sync_nv=bool(b[1] & 0x04),
        group_number=b[6] & 0x1F,
        control=_control(b),
    )


def _decode_sync16(b: bytes) -> Command:
    _reserved(b, 1, 0xF9)
    _reserved(b, 14, 0xE0)
    return SynchronizeCache16(
        lba=_u(b, 2, 10),
        num_blocks=_u(b, 10, 14),
        immed=bool(b[1] & 0x02),
        sync_nv=bool(b[1] & 0x04),
        group_number=b[14] & 0x1F,
        control=_control(b),
    )


def _decode_report_luns(b: bytes) -> Command:
    _reserved(b, 1, 0xFF)
    _reserved_bytes(b, 3, 6)
    _reserved(b, 10, 0xFF)
    return ReportLuns(select_report=b[2], allocation_length=_u(b, 6, 10), control=_control(b))


#: Operation code → (CDB length, decoder). The table is the whole command set.
_DECODERS: dict[int, tuple[int, Callable[[bytes], Command]]] = {
    Opcode.TEST_UNIT_READY: (TestUnitReady.LENGTH, _decode_tur),
    Opcode.REQUEST_SENSE: (RequestSense.LENGTH, _decode_request_sense),
    Opcode.INQUIRY: (Inquiry.LENGTH, _decode_inquiry),
    Opcode.MODE_SENSE_6: (ModeSense6.LENGTH, _decode_mode_sense6),
    Opcode.READ_CAPACITY_10: (ReadCapacity10.LENGTH, _decode_read_capacity10),
    Opcode.READ_10: (Read10.LENGTH, _decode_rw10(Read10)),
    Opcode.WRITE_10: (Write10.LENGTH, _decode_rw10(Write10)),
    Opcode.SYNCHRONIZE_CACHE_10: (SynchronizeCache10.LENGTH, _decode_sync10),
    Opcode.MODE_SENSE_10: (ModeSense10.LENGTH, _decode_mode_sense10),
    Opcode.READ_16: (Read16.LENGTH, _decode_rw16(Read16)),
    Opcode.WRITE_16: (Write16.LENGTH, _decode_rw16(Write16)),
    Opcode.SYNCHRONIZE_CACHE_16: (SynchronizeCache16.LENGTH, _decode_sync16),
    Opcode.SERVICE_ACTION_IN_16: (ReadCapacity16.LENGTH, _decode_service_action_in16),
    Opcode.REPORT_LUNS: (ReportLuns.LENGTH, _decode_report_luns),
}


def cdb_length(opcode: int) -> int | None:
    """The CDB length of a supported operation code, ``None`` for any other."""
    entry = _DECODERS.get(opcode)
    return entry[0] if entry else None


def decode_cdb(cdb: bytes | bytearray | memoryview) -> Command:
    """Decode a CDB, or raise :class:`CheckCondition` (and nothing else)."""
    raw = bytes(cdb)
    if not raw:
        raise CheckCondition(INVALID_COMMAND_OPERATION_CODE, reason="empty CDB")
    entry = _DECODERS.get(raw[0])
    if entry is None:
        raise CheckCondition(INVALID_COMMAND_OPERATION_CODE, reason=f"operation code {raw[0]:#04x}")
    length, decode = entry
    if len(raw) < length:
        raise CheckCondition(
            INVALID_COMMAND_OPERATION_CODE,
            reason=f"{Opcode(raw[0]).name} needs a {length}-byte CDB, got {len(raw)} bytes",
        )
    return decode(raw[:length])


def encode_cdb(command: Command) -> bytes:
    """The CDB bytes of a command record (the inverse of :func:`decode_cdb`)."""
    return command.encode()
