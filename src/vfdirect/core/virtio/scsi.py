"""virtio-scsi wire formats (VIRTIO 1.x 5.6), pure.

Rules of this module:

* every structure is a frozen dataclass with ``encode()`` and a ``decode()`` class
  method; multi-byte fields are little-endian (VIRTIO 1.x 1.4, ``le32``/``le64``);
* a decoder takes the bytes the device COPIED out of the chain (never a live view of
  guest memory) and raises :class:`VirtioScsiError` (or its subclass
  :class:`LunFieldError`) for short or malformed input, nothing else;
* ``cdb_size`` and ``sense_size`` come from the device configuration (5.6.4); the
  defaults are 32 and 96;
* the LUN field (5.6.6.1): byte 0 is 1, byte 1 the target, bytes 2-3 the LUN in SAM
  single-level form, bytes 4-7 zero. Linux writes ``0x40 | lun >> 8, lun & 0xff`` (flat
  space addressing) for every LUN; QEMU also accepts peripheral form ``0x00, lun`` for
  LUNs below 256. We decode both and encode Linux's form by default.

Queue numbering (5.6.2): 0 control, 1 event, 2.. request queues.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

__all__ = [
    "CDB_DEFAULT_SIZE",
    "CONFIG_SIZE",
    "CONTROLQ",
    "EVENTQ",
    "EVENTS_MISSED",
    "REQUESTQ_BASE",
    "SENSE_DEFAULT_SIZE",
    "AsyncEvent",
    "ControlType",
    "CtrlAnRequest",
    "CtrlAnResponse",
    "CtrlTmfRequest",
    "CtrlTmfResponse",
    "EventType",
    "LunAddressing",
    "LunFieldError",
    "ScsiFeature",
    "ScsiRequestHeader",
    "ScsiResponseHeader",
    "TaskAttribute",
    "TmfSubtype",
    "TransportResetReason",
    "VirtioScsiConfig",
    "VirtioScsiError",
    "VirtioScsiEvent",
    "VirtioScsiResponse",
    "decode_control_type",
    "decode_lun",
    "encode_lun",
]

CDB_DEFAULT_SIZE = 32
SENSE_DEFAULT_SIZE = 96
CONTROLQ = 0
EVENTQ = 1
REQUESTQ_BASE = 2
#: Flag ORed into an event's type when the device dropped events (5.6.6.3).
EVENTS_MISSED = 0x80000000


class VirtioScsiError(ValueError):
    """Bytes from the driver are not a well-formed virtio-scsi structure."""


class LunFieldError(VirtioScsiError):
    """The 8-byte LUN field is not in the form 5.6.6.1 allows (the device answers the
    request with response BAD_TARGET)."""


class ScsiFeature(IntEnum):
    """virtio-scsi feature bit numbers (5.6.3)."""

    INOUT = 0
    HOTPLUG = 1
    CHANGE = 2
    T10_PI = 3


class VirtioScsiResponse(IntEnum):
    """The ``response`` byte of command, TMF and AN responses (5.6.6.1, 5.6.6.2)."""

    OK = 0
    OVERRUN = 1
    ABORTED = 2
    BAD_TARGET = 3
    RESET = 4
    BUSY = 5
    TRANSPORT_FAILURE = 6
    TARGET_FAILURE = 7
    NEXUS_FAILURE = 8
    FAILURE = 9
    FUNCTION_SUCCEEDED = 10
    FUNCTION_REJECTED = 11
    INCORRECT_LUN = 12

    #: TMF spelling of OK (5.6.6.2.1, VIRTIO_SCSI_S_FUNCTION_COMPLETE).
    FUNCTION_COMPLETE = 0


class TaskAttribute(IntEnum):
    """``task_attr`` (5.6.6.1)."""

    SIMPLE = 0
    ORDERED = 1
    HEAD = 2
    ACA = 3


class ControlType(IntEnum):
    """Control queue request type (5.6.6.2)."""

    TMF = 0
    AN_QUERY = 1
    AN_SUBSCRIBE = 2


class TmfSubtype(IntEnum):
    """Task management function (5.6.6.2.1)."""

    ABORT_TASK = 0
    ABORT_TASK_SET = 1
    CLEAR_ACA = 2
    CLEAR_TASK_SET = 3
    I_T_NEXUS_RESET = 4
    LOGICAL_UNIT_RESET = 5
    QUERY_TASK = 6
    QUERY_TASK_SET = 7


class AsyncEvent(IntFlag):
    """Asynchronous notification event classes (5.6.6.2.2; bit positions follow the
    MMC GET EVENT STATUS NOTIFICATION classes)."""

    OPERATIONAL_CHANGE = 2
    POWER_MGMT = 4
    EXTERNAL_REQUEST = 8
    MEDIA_CHANGE = 16
    MULTI_HOST = 32
    DEVICE_BUSY = 64


class EventType(IntEnum):
    """Event queue event codes (5.6.6.3), without the EVENTS_MISSED flag."""

    NO_EVENT = 0
    TRANSPORT_RESET = 1
    ASYNC_NOTIFY = 2
    PARAM_CHANGE = 3


class TransportResetReason(IntEnum):
    """``reason`` of a TRANSPORT_RESET event (5.6.6.3.1)."""

    RESET_HARD = 0
    RESCAN = 1
    REMOVED = 2


# -- the LUN field ----------------------------------------------------------------------


class LunAddressing(IntEnum):
    """How :func:`encode_lun` writes bytes 2-3."""

    #: ``0x40 | lun >> 8, lun & 0xff`` for every LUN (what Linux's driver sends).
    FLAT = 0
    #: ``0x00, lun`` below 256 (SAM peripheral device addressing, bus 0), flat above.
    PERIPHERAL = 1


MAX_LUN = 0x3FFF


def encode_lun(target: int, lun: int,
               addressing: LunAddressing = LunAddressing.FLAT) -> bytes:
    """The 8-byte virtio-scsi LUN field for ``target`` (0..255) and ``lun`` (0..16383)."""
    if not 0 <= target <= 0xFF:
        raise LunFieldError(f"target {target} does not fit in a byte")
    if not 0 <= lun <= MAX_LUN:
        raise LunFieldError(f"LUN {lun} is not in 0..16383")
    if addressing is LunAddressing.PERIPHERAL and lun < 256:
        return bytes((1, target, 0x00, lun, 0, 0, 0, 0))
    return bytes((1, target, 0x40 | lun >> 8, lun & 0xFF, 0, 0, 0, 0))


def decode_lun(field_bytes: bytes) -> tuple[int, int]:
    """``(target, lun)`` from an 8-byte LUN field; :class:`LunFieldError` if malformed."""
    if len(field_bytes) != 8:
        raise LunFieldError(f"LUN field is {len(field_bytes)} bytes, not 8")
    if field_bytes[0] != 1:
        raise LunFieldError(f"LUN field byte 0 is {field_bytes[0]:#x}, not 1")
    method = field_bytes[2] & 0xC0
    if method == 0x40:
        lun = (field_bytes[2] & 0x3F) << 8 | field_bytes[3]
    elif field_bytes[2] == 0x00:
        lun = field_bytes[3]
    else:
        raise LunFieldError(f"LUN bytes 2-3 {field_bytes[2]:02x}{field_bytes[3]:02x} are "
                            "neither flat nor peripheral bus-0 addressing")
    if any(field_bytes[4:]):
        raise LunFieldError("multi-level LUNs (bytes 4-7 non-zero) are not supported")
    return field_bytes[1], lun


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise VirtioScsiError(f"{what} needs {size} bytes, got {len(data)}")


def _byte(value: int, name: str) -> None:
    if not 0 <= value <= 0xFF:
        raise VirtioScsiError(f"{name} {value} does not fit in a byte")


# -- request queues ---------------------------------------------------------------------

_REQ_FIXED = struct.Struct("<8sQBBB")
_REQ_PI = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class ScsiRequestHeader:
    """``virtio_scsi_req_cmd``'s device-readable header (5.6.6.1); with T10_PI it
    carries ``pi_bytesout``/``pi_bytesin`` before the CDB. ``cdb`` has exactly
    ``cdb_size`` bytes (zero-padded after the command)."""

    lun: bytes
    tag: int
    task_attr: int
    prio: int
    crn: int
    cdb: bytes
    pi_bytesout: int | None = None
    pi_bytesin: int | None = None

    @staticmethod
    def size(cdb_size: int = CDB_DEFAULT_SIZE, *, t10_pi: bool = False) -> int:
        return _REQ_FIXED.size + (_REQ_PI.size if t10_pi else 0) + cdb_size

    @property
    def t10_pi(self) -> bool:
        return self.pi_bytesout is not None

    @property
    def target(self) -> int:
        return decode_lun(self.lun)[0]

    def address(self) -> tuple[int, int]:
        """``(target, lun)``; raises :class:`LunFieldError`."""
        return decode_lun(self.lun)

    @classmethod
    def build(cls, target: int, lun: int, cdb: bytes, *, tag: int = 0,
              task_attr: int = TaskAttribute.SIMPLE, prio: int = 0, crn: int = 0,
              cdb_size: int = CDB_DEFAULT_SIZE,
              addressing: LunAddressing = LunAddressing.FLAT) -> ScsiRequestHeader:
        if len(cdb) > cdb_size:
            raise VirtioScsiError(f"CDB of {len(cdb)} bytes exceeds cdb_size {cdb_size}")
        return cls(encode_lun(target, lun, addressing), tag, task_attr, prio, crn,
                   cdb.ljust(cdb_size, b"\0"))

    def encode(self) -> bytes:
        if len(self.lun) != 8:
            raise VirtioScsiError("LUN field must be 8 bytes")
        if not 0 <= self.tag < 1 << 64:
            raise VirtioScsiError(f"tag {self.tag} is not 64-bit")
        for name in ("task_attr", "prio", "crn"):
            _byte(getattr(self, name), name)
        out = _REQ_FIXED.pack(self.lun, self.tag, self.task_attr, self.prio, self.crn)
        if self.t10_pi:
            if self.pi_bytesin is None or self.pi_bytesout is None:
                raise VirtioScsiError("T10 PI header needs both pi_bytesout and pi_bytesin")
            out += _REQ_PI.pack(self.pi_bytesout, self.pi_bytesin)
        return out + self.cdb

    @classmethod
    def decode(cls, data: bytes, cdb_size: int = CDB_DEFAULT_SIZE, *,
               t10_pi: bool = False) -> ScsiRequestHeader:
        """Decode the header from the first bytes of the readable part (extra bytes, the
        data-out buffer, are ignored)."""
        if not 1 <= cdb_size <= 0xFFFF:
            raise VirtioScsiError(f"cdb_size {cdb_size} is unusable")
        _need(data, cls.size(cdb_size, t10_pi=t10_pi), "command request header")
        lun, tag, attr, prio, crn = _REQ_FIXED.unpack_from(data)
        offset = _REQ_FIXED.size
        pi_out = pi_in = None
        if t10_pi:
            pi_out, pi_in = _REQ_PI.unpack_from(data, offset)
            offset += _REQ_PI.size
        return cls(bytes(lun), tag, attr, prio, crn, bytes(data[offset:offset + cdb_size]),
                   pi_out, pi_in)


_RESP_FIXED = struct.Struct("<IIHBB")


@dataclass(frozen=True, slots=True)
class ScsiResponseHeader:
    """``virtio_scsi_resp_cmd`` (5.6.6.1): the device-writable header before data-in.
    ``sense`` is the meaningful sense bytes (``sense_len`` of them); :meth:`encode` pads
    it to ``sense_size``."""

    response: int = VirtioScsiResponse.OK
    status: int = 0
    sense: bytes = b""
    resid: int = 0
    status_qualifier: int = 0
    sense_len: int | None = None

    @staticmethod
    def size(sense_size: int = SENSE_DEFAULT_SIZE) -> int:
        return _RESP_FIXED.size + sense_size

    @property
    def reported_sense_len(self) -> int:
        return len(self.sense) if self.sense_len is None else self.sense_len

    def encode(self, sense_size: int = SENSE_DEFAULT_SIZE) -> bytes:
        # 5.6.6.1: sense_len is the number of valid bytes written to sense; the device
        # MUST NOT write more than sense_size.
        if len(self.sense) > sense_size:
            raise VirtioScsiError(f"{len(self.sense)} sense bytes exceed sense_size "
                                  f"{sense_size}")
        if not 0 <= self.resid <= 0xFFFFFFFF or not 0 <= self.status_qualifier <= 0xFFFF:
            raise VirtioScsiError("resid or status_qualifier out of range")
        _byte(self.status, "status")
        _byte(self.response, "response")
        return _RESP_FIXED.pack(self.reported_sense_len, self.resid, self.status_qualifier,
                                self.status, self.response) + self.sense.ljust(sense_size,
                                                                               b"\0")

    @classmethod
    def decode(cls, data: bytes, sense_size: int = SENSE_DEFAULT_SIZE) -> ScsiResponseHeader:
        _need(data, cls.size(sense_size), "command response header")
        sense_len, resid, qualifier, status, response = _RESP_FIXED.unpack_from(data)
        if sense_len > sense_size:
            raise VirtioScsiError(f"sense_len {sense_len} exceeds sense_size {sense_size}")
        start = _RESP_FIXED.size
        return cls(response, status, bytes(data[start:start + sense_len]), resid, qualifier,
                   None)


# -- control queue ----------------------------------------------------------------------

_TMF_REQ = struct.Struct("<II8sQ")
_AN_REQ = struct.Struct("<I8sI")
_AN_RESP = struct.Struct("<IB")


def decode_control_type(data: bytes) -> int:
    """The ``type`` field that starts every control queue request (5.6.6.2)."""
    _need(data, 4, "control request type")
    return int(struct.unpack_from("<I", data)[0])


@dataclass(frozen=True, slots=True)
class CtrlTmfRequest:
    """``virtio_scsi_ctrl_tmf`` device-readable part (5.6.6.2.1)."""

    subtype: int
    lun: bytes
    tag: int = 0
    type: int = ControlType.TMF

    SIZE = _TMF_REQ.size

    def encode(self) -> bytes:
        if len(self.lun) != 8 or not 0 <= self.tag < 1 << 64:
            raise VirtioScsiError("bad LUN field or tag")
        if not 0 <= self.subtype <= 0xFFFFFFFF:
            raise VirtioScsiError("subtype out of range")
        return _TMF_REQ.pack(self.type, self.subtype, self.lun, self.tag)

    @classmethod
    def decode(cls, data: bytes) -> CtrlTmfRequest:
        _need(data, _TMF_REQ.size, "TMF request")
        type_, subtype, lun, tag = _TMF_REQ.unpack_from(data)
        if type_ != ControlType.TMF:
            raise VirtioScsiError(f"control type {type_} is not TMF")
        return cls(subtype, bytes(lun), tag)

    def address(self) -> tuple[int, int]:
        return decode_lun(self.lun)


@dataclass(frozen=True, slots=True)
class CtrlTmfResponse:
    """``virtio_scsi_ctrl_tmf`` device-writable part: one response byte."""

    response: int = VirtioScsiResponse.FUNCTION_COMPLETE

    SIZE = 1

    def encode(self) -> bytes:
        _byte(self.response, "response")
        return bytes((self.response,))

    @classmethod
    def decode(cls, data: bytes) -> CtrlTmfResponse:
        _need(data, 1, "TMF response")
        return cls(data[0])


@dataclass(frozen=True, slots=True)
class CtrlAnRequest:
    """``virtio_scsi_ctrl_an`` device-readable part (5.6.6.2.2), QUERY or SUBSCRIBE."""

    type: int
    lun: bytes
    event_requested: int

    SIZE = _AN_REQ.size

    def encode(self) -> bytes:
        if len(self.lun) != 8 or not 0 <= self.event_requested <= 0xFFFFFFFF:
            raise VirtioScsiError("bad LUN field or event mask")
        return _AN_REQ.pack(self.type, self.lun, self.event_requested)

    @classmethod
    def decode(cls, data: bytes) -> CtrlAnRequest:
        _need(data, _AN_REQ.size, "AN request")
        type_, lun, requested = _AN_REQ.unpack_from(data)
        if type_ not in (ControlType.AN_QUERY, ControlType.AN_SUBSCRIBE):
            raise VirtioScsiError(f"control type {type_} is not an AN query or subscribe")
        return cls(type_, bytes(lun), requested)


@dataclass(frozen=True, slots=True)
class CtrlAnResponse:
    """``virtio_scsi_ctrl_an`` device-writable part: ``event_actual``, ``response``."""

    event_actual: int = 0
    response: int = VirtioScsiResponse.OK

    SIZE = _AN_RESP.size

    def encode(self) -> bytes:
        _byte(self.response, "response")
        if not 0 <= self.event_actual <= 0xFFFFFFFF:
            raise VirtioScsiError("event_actual out of range")
        return _AN_RESP.pack(self.event_actual, self.response)

    @classmethod
    def decode(cls, data: bytes) -> CtrlAnResponse:
        _need(data, _AN_RESP.size, "AN response")
        actual, response = _AN_RESP.unpack_from(data)
        return cls(actual, response)


# -- event queue ------------------------------------------------------------------------

_EVENT = struct.Struct("<I8sI")


@dataclass(frozen=True, slots=True)
class VirtioScsiEvent:
    """``virtio_scsi_event`` (5.6.6.3), written by the device into an event buffer.
    ``event`` may carry :data:`EVENTS_MISSED`. For PARAM_CHANGE the reason is
    ``asc | ascq << 8`` (5.6.6.3.3)."""

    event: int
    lun: bytes = bytes(8)
    reason: int = 0

    SIZE = _EVENT.size

    @property
    def events_missed(self) -> bool:
        return bool(self.event & EVENTS_MISSED)

    @property
    def kind(self) -> int:
        return self.event & ~EVENTS_MISSED

    @classmethod
    def transport_reset(cls, target: int, lun: int, reason: TransportResetReason,
                        *, missed: bool = False) -> VirtioScsiEvent:
        return cls(EventType.TRANSPORT_RESET | (EVENTS_MISSED if missed else 0),
                   encode_lun(target, lun), reason)

    @classmethod
    def param_change(cls, target: int, lun: int, asc: int, ascq: int) -> VirtioScsiEvent:
        _byte(asc, "asc")
        _byte(ascq, "ascq")
        return cls(EventType.PARAM_CHANGE, encode_lun(target, lun), asc | ascq << 8)

    def encode(self) -> bytes:
        if len(self.lun) != 8:
            raise VirtioScsiError("LUN field must be 8 bytes")
        if not 0 <= self.event <= 0xFFFFFFFF or not 0 <= self.reason <= 0xFFFFFFFF:
            raise VirtioScsiError("event or reason out of range")
        return _EVENT.pack(self.event, self.lun, self.reason)

    @classmethod
    def decode(cls, data: bytes) -> VirtioScsiEvent:
        _need(data, _EVENT.size, "event")
        event, lun, reason = _EVENT.unpack_from(data)
        return cls(event, bytes(lun), reason)


# -- device configuration ---------------------------------------------------------------

_CONFIG = struct.Struct("<IIIIIIIHHI")
CONFIG_SIZE = _CONFIG.size


@dataclass(frozen=True, slots=True)
class VirtioScsiConfig:
    """``virtio_scsi_config`` (5.6.4), the device configuration space (36 bytes)."""

    num_queues: int = 1
    seg_max: int = 126
    max_sectors: int = 0xFFFF
    cmd_per_lun: int = 128
    event_info_size: int = _EVENT.size
    sense_size: int = SENSE_DEFAULT_SIZE
    cdb_size: int = CDB_DEFAULT_SIZE
    max_channel: int = 0
    max_target: int = 255
    max_lun: int = MAX_LUN

    def encode(self) -> bytes:
        try:
            return _CONFIG.pack(self.num_queues, self.seg_max, self.max_sectors,
                                self.cmd_per_lun, self.event_info_size, self.sense_size,
                                self.cdb_size, self.max_channel, self.max_target,
                                self.max_lun)
        except struct.error as exc:
            raise VirtioScsiError(f"configuration field out of range: {exc}") from exc

    @classmethod
    def decode(cls, data: bytes) -> VirtioScsiConfig:
        _need(data, _CONFIG.size, "virtio-scsi configuration")
        return cls(*_CONFIG.unpack_from(data))
