"""Sense data: the one named catalogue, the fixed-format encoder, a decoder, and the
:class:`CheckCondition` exception.

Rules of this module:

* a sense code is a :class:`Sense` value (key, ASC, ASCQ) taken from the catalogue below;
  no other module writes the three numbers inline;
* inside the core an error is raised as :class:`CheckCondition`; it becomes a completion
  (status CHECK CONDITION plus fixed-format sense bytes) at exactly one place,
  :func:`vfdirect.core.scsi.task.run_guarded`;
* the target always produces fixed-format sense (SPC-4 4.5.3; the Control mode page
  reports D_SENSE=0). The decoder also reads descriptor format (SPC-4 4.5.2), because a
  guest driver may meet it from other targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class SenseKey(IntEnum):
    """SENSE KEY values (SPC-4 4.5.6, table of sense key descriptions)."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    #: Obsolete since SPC-3 (was EQUAL); listed so that every 4-bit value decodes.
    OBSOLETE_0C = 0xC
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE
    COMPLETED = 0xF


class ResponseCode(IntEnum):
    """RESPONSE CODE of sense data (SPC-4 4.5.1)."""

    CURRENT_FIXED = 0x70
    DEFERRED_FIXED = 0x71
    CURRENT_DESCRIPTOR = 0x72
    DEFERRED_DESCRIPTOR = 0x73


class SenseFormatError(ValueError):
    """Bytes handed to :func:`decode_sense` are not sense data."""


@dataclass(frozen=True, slots=True)
class Sense:
    """A sense code: sense key, additional sense code and qualifier. ``name`` is the
    catalogue's text (for logs); it takes no part in equality."""

    key: SenseKey
    asc: int
    ascq: int
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not (0 <= self.asc <= 0xFF and 0 <= self.ascq <= 0xFF):
            raise ValueError(f"ASC/ASCQ {self.asc:#x}/{self.ascq:#x} do not fit in a byte")

    @property
    def code(self) -> tuple[int, int, int]:
        return (int(self.key), self.asc, self.ascq)

    @staticmethod
    def lookup(key: int, asc: int, ascq: int) -> Sense:
        """The catalogue entry for these numbers, or an unnamed :class:`Sense`."""
        found = _CATALOGUE.get((key & 0xF, asc, ascq))
        if found is not None:
            return found
        return Sense(SenseKey(key & 0xF), asc, ascq)

    def __str__(self) -> str:
        text = f"{self.key.name}/{self.asc:02X}h/{self.ascq:02X}h"
        return f"{text} {self.name}" if self.name else text


_CATALOGUE: dict[tuple[int, int, int], Sense] = {}


def _entry(key: SenseKey, asc: int, ascq: int, name: str) -> Sense:
    sense = Sense(key, asc, ascq, name)
    _CATALOGUE[sense.code] = sense
    return sense


_K = SenseKey
# The catalogue. Numbers from the SPC-4 ASC/ASCQ assignment table (numeric-order annex);
# the sense key is the one the citing clause prescribes.
NO_SENSE = _entry(_K.NO_SENSE, 0x00, 0x00, "NO ADDITIONAL SENSE INFORMATION")
LOGICAL_UNIT_NOT_READY = _entry(
    _K.NOT_READY, 0x04, 0x00, "LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE"
)
MEDIUM_NOT_PRESENT = _entry(_K.NOT_READY, 0x3A, 0x00, "MEDIUM NOT PRESENT")
# SBC-3 error reporting: an unrecovered medium error is MEDIUM ERROR with the ASC of
# the failed operation.
UNRECOVERED_READ_ERROR = _entry(_K.MEDIUM_ERROR, 0x11, 0x00, "UNRECOVERED READ ERROR")
WRITE_ERROR = _entry(_K.MEDIUM_ERROR, 0x0C, 0x00, "WRITE ERROR")
LOGICAL_UNIT_COMMUNICATION_FAILURE = _entry(
    _K.HARDWARE_ERROR, 0x08, 0x00, "LOGICAL UNIT COMMUNICATION FAILURE"
)
INTERNAL_TARGET_FAILURE = _entry(_K.HARDWARE_ERROR, 0x44, 0x00, "INTERNAL TARGET FAILURE")
PARAMETER_LIST_LENGTH_ERROR = _entry(_K.ILLEGAL_REQUEST, 0x1A, 0x00, "PARAMETER LIST LENGTH ERROR")
INVALID_COMMAND_OPERATION_CODE = _entry(
    _K.ILLEGAL_REQUEST, 0x20, 0x00, "INVALID COMMAND OPERATION CODE"
)
# SPC-4 8.3.3 (access controls) reports a refused access with ILLEGAL REQUEST and the
# ACCESS DENIED ASCs; we use it when the fabric refuses an IO (BlockDevice raises AccessDenied).
ACCESS_DENIED_NO_ACCESS_RIGHTS = _entry(
    _K.ILLEGAL_REQUEST, 0x20, 0x02, "ACCESS DENIED - NO ACCESS RIGHTS"
)
LBA_OUT_OF_RANGE = _entry(_K.ILLEGAL_REQUEST, 0x21, 0x00, "LOGICAL BLOCK ADDRESS OUT OF RANGE")
INVALID_FIELD_IN_CDB = _entry(_K.ILLEGAL_REQUEST, 0x24, 0x00, "INVALID FIELD IN CDB")
LOGICAL_UNIT_NOT_SUPPORTED = _entry(_K.ILLEGAL_REQUEST, 0x25, 0x00, "LOGICAL UNIT NOT SUPPORTED")
INVALID_FIELD_IN_PARAMETER_LIST = _entry(
    _K.ILLEGAL_REQUEST, 0x26, 0x00, "INVALID FIELD IN PARAMETER LIST"
)
WRITE_PROTECTED = _entry(_K.DATA_PROTECT, 0x27, 0x00, "WRITE PROTECTED")
SAVING_PARAMETERS_NOT_SUPPORTED = _entry(
    _K.ILLEGAL_REQUEST, 0x39, 0x00, "SAVING PARAMETERS NOT SUPPORTED"
)
# The transport's buffers disagree with the lengths in the CDB (used with the overrun
# flag of a result; SPC-4 lists 0Eh/03h for a bad field of a command information unit).
INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT = _entry(
    _K.ILLEGAL_REQUEST, 0x0E, 0x03, "INVALID FIELD IN COMMAND INFORMATION UNIT"
)
POWER_ON_RESET_OCCURRED = _entry(
    _K.UNIT_ATTENTION, 0x29, 0x00, "POWER ON, RESET, OR BUS DEVICE RESET OCCURRED"
)
I_T_NEXUS_LOSS_OCCURRED = _entry(_K.UNIT_ATTENTION, 0x29, 0x07, "I_T NEXUS LOSS OCCURRED")
MODE_PARAMETERS_CHANGED = _entry(_K.UNIT_ATTENTION, 0x2A, 0x01, "MODE PARAMETERS CHANGED")
CAPACITY_DATA_HAS_CHANGED = _entry(_K.UNIT_ATTENTION, 0x2A, 0x09, "CAPACITY DATA HAS CHANGED")
INQUIRY_DATA_HAS_CHANGED = _entry(_K.UNIT_ATTENTION, 0x3F, 0x03, "INQUIRY DATA HAS CHANGED")
REPORTED_LUNS_DATA_HAS_CHANGED = _entry(
    _K.UNIT_ATTENTION, 0x3F, 0x0E, "REPORTED LUNS DATA HAS CHANGED"
)
COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = _entry(
    _K.UNIT_ATTENTION, 0x2F, 0x00, "COMMANDS CLEARED BY ANOTHER INITIATOR"
)
del _K

#: Every named sense code, by its numbers.
CATALOGUE: dict[tuple[int, int, int], Sense] = _CATALOGUE


@dataclass(frozen=True, slots=True)
class FieldPointer:
    """Sense-key-specific field pointer (SPC-4 4.5.2.4.2): which byte (and optionally
    which bit, the most significant bit of the field in error) of the CDB (``in_cdb``, the
    C/D bit) or of the parameter list was wrong."""

    byte: int
    bit: int | None = None
    in_cdb: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.byte <= 0xFFFF:
            raise ValueError(f"field pointer byte {self.byte} does not fit in 16 bits")
        if self.bit is not None and not 0 <= self.bit <= 7:
            raise ValueError(f"bit pointer {self.bit} is not 0..7")

    def encode(self) -> bytes:
        """The three sense-key-specific bytes, SKSV set."""
        b15 = 0x80  # SKSV: the sense-key-specific bytes are valid
        if self.in_cdb:
            b15 |= 0x40  # C/D
        if self.bit is not None:
            b15 |= 0x08 | self.bit  # BPV and BIT POINTER
        return bytes((b15,)) + self.byte.to_bytes(2, "big")

    @classmethod
    def decode(cls, sks: bytes) -> FieldPointer | None:
        """Parse three sense-key-specific bytes; ``None`` when SKSV is clear."""
        if len(sks) < 3 or not sks[0] & 0x80:
            return None
        bit = sks[0] & 0x07 if sks[0] & 0x08 else None
        return cls(int.from_bytes(sks[1:3], "big"), bit, bool(sks[0] & 0x40))


class CheckCondition(Exception):
    """A command ends with CHECK CONDITION status and this sense.

    Raised anywhere inside the core; :func:`vfdirect.core.scsi.task.run_guarded` turns it
    into a :class:`~vfdirect.core.scsi.task.ScsiResult`.
    """

    def __init__(
        self,
        sense: Sense,
        *,
        field_pointer: FieldPointer | None = None,
        information: int | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(f"{sense}" + (f": {reason}" if reason else ""))
        self.sense = sense
        self.field_pointer = field_pointer
        self.information = information
        self.reason = reason

    @classmethod
    def invalid_cdb_field(
        cls, byte: int, bit: int | None = None, reason: str = ""
    ) -> CheckCondition:
        """ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at ``byte``/``bit`` of the CDB."""
        return cls(INVALID_FIELD_IN_CDB, field_pointer=FieldPointer(byte, bit), reason=reason)

    @classmethod
    def invalid_parameter_field(
        cls, byte: int, bit: int | None = None, reason: str = ""
    ) -> CheckCondition:
        """ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, pointing into the data-out."""
        return cls(
            INVALID_FIELD_IN_PARAMETER_LIST,
            field_pointer=FieldPointer(byte, bit, in_cdb=False),
            reason=reason,
        )

    def sense_bytes(self) -> bytes:
        return encode_fixed_sense(
            self.sense, field_pointer=self.field_pointer, information=self.information
        )


#: Length of the fixed-format sense data this target produces: 8 header bytes plus an
#: ADDITIONAL SENSE LENGTH of 10 (SPC-4 4.5.3).
FIXED_SENSE_LEN = 18
_MAX_INFO_FIXED = 0xFFFF_FFFF


def encode_fixed_sense(
    sense: Sense,
    *,
    field_pointer: FieldPointer | None = None,
    information: int | None = None,
    command_specific: int = 0,
    fru: int = 0,
    deferred: bool = False,
) -> bytes:
    """Fixed-format sense data (SPC-4 4.5.3), 18 bytes.

    An ``information`` value that does not fit the 4-byte INFORMATION field is left out
    with VALID=0, as SPC-4 4.5.3 prescribes for fixed format.
    """
    if not 0 <= command_specific <= 0xFFFF_FFFF:
        raise ValueError(f"command-specific information {command_specific:#x} exceeds 4 bytes")
    if not 0 <= fru <= 0xFF:
        raise ValueError(f"FRU code {fru:#x} exceeds a byte")
    out = bytearray(FIXED_SENSE_LEN)
    code = ResponseCode.DEFERRED_FIXED if deferred else ResponseCode.CURRENT_FIXED
    out[0] = code
    if information is not None and 0 <= information <= _MAX_INFO_FIXED:
        out[0] |= 0x80  # VALID: the INFORMATION field is defined
        out[3:7] = information.to_bytes(4, "big")
    # byte 1 obsolete; byte 2: FILEMARK, EOM, ILI (all zero for a block device) + key
    out[2] = sense.key & 0x0F
    out[7] = FIXED_SENSE_LEN - 8  # ADDITIONAL SENSE LENGTH (n-7)
    out[8:12] = command_specific.to_bytes(4, "big")
    out[12] = sense.asc
    out[13] = sense.ascq
    out[14] = fru
    if field_pointer is not None:
        out[15:18] = field_pointer.encode()
    return bytes(out)


@dataclass(frozen=True, slots=True)
class SenseData:
    """Decoded sense data, fixed or descriptor format."""

    response_code: ResponseCode
    sense: Sense
    #: INFORMATION field, or ``None`` when VALID is clear / no information descriptor.
    information: int | None = None
    command_specific: int = 0
    fru: int = 0
    filemark: bool = False
    eom: bool = False
    ili: bool = False
    #: The three sense-key-specific bytes as sent (zeros when absent).
    sense_key_specific: bytes = b"\x00\x00\x00"
    #: Parsed field pointer (ILLEGAL REQUEST with SKSV set), else ``None``.
    field_pointer: FieldPointer | None = None

    @property
    def deferred(self) -> bool:
        return self.response_code in (
            ResponseCode.DEFERRED_FIXED,
            ResponseCode.DEFERRED_DESCRIPTOR,
        )

    @property
    def descriptor_format(self) -> bool:
        return self.response_code in (
            ResponseCode.CURRENT_DESCRIPTOR,
            ResponseCode.DEFERRED_DESCRIPTOR,
        )


def decode_sense(data: bytes | bytearray | memoryview) -> SenseData:
    """Decode sense data as a device server returned it (possibly truncated by the
    initiator's sense buffer). Raises :class:`SenseFormatError` on anything that is not
    sense data; never another exception.

    Fields beyond what the data holds (``ADDITIONAL SENSE LENGTH`` or the buffer end,
    whichever is shorter) read as zero, as SPC-4 4.5.1 allows short sense data.
    """
    raw = bytes(data)
    if not raw:
        raise SenseFormatError("empty sense data")
    code = raw[0] & 0x7F
    if code in (ResponseCode.CURRENT_FIXED, ResponseCode.DEFERRED_FIXED):
        return _decode_fixed(raw)
    if code in (ResponseCode.CURRENT_DESCRIPTOR, ResponseCode.DEFERRED_DESCRIPTOR):
        return _decode_descriptor(raw)
    raise SenseFormatError(f"response code {code:#04x} is not sense data (70h-73h)")


def _decode_fixed(raw: bytes) -> SenseData:
    if len(raw) < 8:
        raise SenseFormatError(f"fixed-format sense data needs 8 bytes, got {len(raw)}")
    end = min(len(raw), 8 + raw[7])
    body = raw[:end] + bytes(max(0, FIXED_SENSE_LEN - end))
    key = body[2] & 0x0F
    sks = body[15:18]
    sense = Sense.lookup(key, body[12], body[13])
    return SenseData(
        response_code=ResponseCode(raw[0] & 0x7F),
        sense=sense,
        information=int.from_bytes(body[3:7], "big") if raw[0] & 0x80 else None,
        command_specific=int.from_bytes(body[8:12], "big"),
        fru=body[14],
        filemark=bool(body[2] & 0x80),
        eom=bool(body[2] & 0x40),
        ili=bool(body[2] & 0x20),
        sense_key_specific=sks,
        field_pointer=FieldPointer.decode(sks) if key == SenseKey.ILLEGAL_REQUEST else None,
    )


_DESC_INFORMATION = 0x00
_DESC_COMMAND_SPECIFIC = 0x01
_DESC_SENSE_KEY_SPECIFIC = 0x02
_DESC_BLOCK_COMMANDS = 0x05


def _decode_descriptor(raw: bytes) -> SenseData:
    if len(raw) < 4:
        raise SenseFormatError(f"descriptor-format sense data needs 4 bytes, got {len(raw)}")
    key = raw[1] & 0x0F
    end = min(len(raw), 8 + raw[7]) if len(raw) >= 8 else len(raw)
    information: int | None = None
    command_specific = 0
    sks = b"\x00\x00\x00"
    ili = False
    pos = 8
    # SPC-4 4.5.2.1: descriptors follow byte 7, each as type, additional length, body.
    while pos + 2 <= end:
        dtype, dlen = raw[pos], raw[pos + 1]
        body = raw[pos + 2 : min(end, pos + 2 + dlen)]
        if dtype == _DESC_INFORMATION and len(body) >= 10 and body[0] & 0x80:
            information = int.from_bytes(body[2:10], "big")
        elif dtype == _DESC_COMMAND_SPECIFIC and len(body) >= 10:
            command_specific = int.from_bytes(body[2:10], "big")
        elif dtype == _DESC_SENSE_KEY_SPECIFIC and len(body) >= 5:
            sks = body[2:5]
        elif dtype == _DESC_BLOCK_COMMANDS and len(body) >= 2:
            ili = bool(body[1] & 0x20)
        pos += 2 + dlen
    return SenseData(
        response_code=ResponseCode(raw[0] & 0x7F),
        sense=Sense.lookup(key, raw[2], raw[3]),
        information=information,
        command_specific=command_specific,
        ili=ili,
        sense_key_specific=sks,
        field_pointer=FieldPointer.decode(sks) if key == SenseKey.ILLEGAL_REQUEST else None,
    )
