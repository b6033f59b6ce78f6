"""The vhost-user message codec (QEMU docs/interop/vhost-user.rst), both directions.

Rules of this module:

* a message is a 12-byte header (``request`` u32, ``flags`` u32, ``size`` u32) and a
  ``size``-byte payload, in the machine's byte order (vhost-user.rst: "All numbers are
  in the machine native byte order"; we run little-endian hosts and encode ``<``);
  file descriptors travel beside it as SCM_RIGHTS ancillary data;
* ``flags``: bits 0-1 the version (must be 1), bit 2 REPLY, bit 3 NEED_REPLY; any other
  bit is malformed;
* each payload type is a frozen dataclass with ``encode()`` and ``decode()``; which type
  a message carries, and how many fds, is decided by tables keyed by the channel and the
  request code (:func:`payload_rule`), never by guessing from the size alone;
* malformed input raises :class:`VhostUserProtocolError` (with ``fds``: the descriptors
  the caller must close), never ``struct.error`` or ``IndexError``.

Channels: the front end sends :class:`FrontendRequest` s on the main socket and the
back end replies on it; with BACKEND_REQ the back end sends :class:`BackendRequest` s on
a second socket and the front end replies there.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, IntEnum, IntFlag
from typing import ClassVar, Protocol, Self

__all__ = [
    "HEADER_SIZE",
    "MAX_FDS",
    "MAX_PAYLOAD_SIZE",
    "VHOST_F_LOG_ALL",
    "VHOST_LOG_PAGE",
    "VHOST_MEMORY_BASELINE_NREGIONS",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_MAX_CONFIG_SIZE",
    "VHOST_USER_VERSION",
    "VHOST_USER_VRING_IDX_MASK",
    "VHOST_USER_VRING_NOFD_MASK",
    "BackendRequest",
    "Channel",
    "ConfigSpace",
    "DeviceStateTransfer",
    "Empty",
    "HeaderFlag",
    "InflightDescription",
    "IotlbMessage",
    "LogDescription",
    "MemoryRegionDesc",
    "MemoryTable",
    "Payload",
    "PayloadRule",
    "ProtocolFeature",
    "RawPayload",
    "SharedObject",
    "SingleMemoryRegion",
    "U64",
    "VhostUserMessage",
    "VhostUserProtocolError",
    "VringAddr",
    "VringArea",
    "VringFile",
    "VringState",
    "decode_body",
    "decode_header",
    "encode_header",
    "payload_rule",
]

HEADER_SIZE = 12
VHOST_USER_VERSION = 0x1
#: Feature bit 30 (the legacy UNUSED bit) announces protocol-feature negotiation.
VHOST_USER_F_PROTOCOL_FEATURES = 30
#: vhost feature bit 26: the back end logs its writes to guest memory (migration).
VHOST_F_LOG_ALL = 26
VHOST_LOG_PAGE = 0x1000
VHOST_MEMORY_BASELINE_NREGIONS = 8
VHOST_USER_MAX_CONFIG_SIZE = 256
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x100
#: At most this many fds ride with one message (QEMU's limit, one per region).
MAX_FDS = 8
#: The largest payload we accept: the largest known one (a memory table is 264 bytes,
#: a config space 268) with room for unknown requests that we only refuse.
MAX_PAYLOAD_SIZE = 4096


class VhostUserProtocolError(Exception):
    """Malformed vhost-user input: the connection must be closed. ``fds`` are the file
    descriptors that came with the bad input; the caller owns them and must close them."""

    def __init__(self, message: str, *, fds: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.fds = fds


class FrontendRequest(IntEnum):
    """Front-end message types (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(IntEnum):
    """Back-end message types, sent on the back-end channel (vhost-user.rst)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(IntEnum):
    """Protocol feature bit numbers (vhost-user.rst "Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


class HeaderFlag(IntFlag):
    """Header ``flags`` bits."""

    VERSION = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


_VERSION_MASK = 0x3
_KNOWN_FLAGS = _VERSION_MASK | int(HeaderFlag.REPLY) | int(HeaderFlag.NEED_REPLY)


class Channel(Enum):
    """Which stream a parser reads, hence which request table and direction apply."""

    #: Main socket, read by the back end: front-end requests.
    FRONTEND_REQUESTS = "frontend-requests"
    #: Main socket, read by the front end: the back end's replies.
    FRONTEND_REPLIES = "frontend-replies"
    #: Back-end channel, read by the front end: back-end requests.
    BACKEND_REQUESTS = "backend-requests"
    #: Back-end channel, read by the back end: the front end's replies.
    BACKEND_REPLIES = "backend-replies"

    @property
    def is_reply(self) -> bool:
        return self in (Channel.FRONTEND_REPLIES, Channel.BACKEND_REPLIES)

    @property
    def is_backend_channel(self) -> bool:
        return self in (Channel.BACKEND_REQUESTS, Channel.BACKEND_REPLIES)


# -- payloads ---------------------------------------------------------------------------


class Payload(Protocol):
    """A message body: encodes to bytes, decodes from exactly its bytes."""

    def encode(self) -> bytes: ...


def _unpack(fmt: struct.Struct, data: bytes, what: str) -> tuple[int, ...]:
    if len(data) != fmt.size:
        raise VhostUserProtocolError(f"{what} payload is {len(data)} bytes, not {fmt.size}")
    return tuple(int(v) for v in fmt.unpack(data))


def _pack(fmt: struct.Struct, what: str, *values: int) -> bytes:
    try:
        return fmt.pack(*values)
    except struct.error as exc:
        raise VhostUserProtocolError(f"{what} field out of range: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Empty:
    """No payload (size 0)."""

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, data: bytes) -> Self:
        if data:
            raise VhostUserProtocolError(f"expected no payload, got {len(data)} bytes")
        return cls()


_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class U64:
    """A single 64-bit integer (features, queue count, an ack: 0 success)."""

    value: int

    def encode(self) -> bytes:
        return _pack(_U64, "u64", self.value)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(*_unpack(_U64, data, "u64"))


_STATE = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state``: a vring index and a number (size, base, enable)."""

    index: int
    num: int

    def encode(self) -> bytes:
        return _pack(_STATE, "vring state", self.index, self.num)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(*_unpack(_STATE, data, "vring state"))


_ADDR = struct.Struct("<IIQQQQ")


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``struct vhost_vring_addr``: the ring's user addresses (IOVAs with
    ACCESS_PLATFORM) and the guest address used to log used-ring writes. ``flags`` bit 0
    is VHOST_VRING_F_LOG."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int = 0

    F_LOG: ClassVar[int] = 1 << 0

    @property
    def log_enabled(self) -> bool:
        return bool(self.flags & self.F_LOG)

    def encode(self) -> bytes:
        return _pack(_ADDR, "vring address", self.index, self.flags, self.desc_user_addr,
                     self.used_user_addr, self.avail_user_addr, self.log_guest_addr)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(*_unpack(_ADDR, data, "vring address"))


@dataclass(frozen=True, slots=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 the vring index, bit 8 set when no
    fd rides along (polling instead of an eventfd); other bits must be zero."""

    index: int
    no_fd: bool = False

    def encode(self) -> bytes:
        if not 0 <= self.index <= VHOST_USER_VRING_IDX_MASK:
            raise VhostUserProtocolError(f"vring index {self.index} does not fit in 8 bits")
        return _U64.pack(self.index | (VHOST_USER_VRING_NOFD_MASK if self.no_fd else 0))

    @classmethod
    def decode(cls, data: bytes) -> Self:
        (value,) = _unpack(_U64, data, "vring file")
        if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise VhostUserProtocolError(f"vring file value {value:#x} has unknown bits")
        return cls(value & VHOST_USER_VRING_IDX_MASK, bool(value & VHOST_USER_VRING_NOFD_MASK))


_REGION = struct.Struct("<QQQQ")


@dataclass(frozen=True, slots=True)
class MemoryRegionDesc:
    """One region of the memory table: guest address, size, front-end user address and
    the offset in the region's fd where the region starts."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def encode(self) -> bytes:
        return _pack(_REGION, "memory region", self.guest_phys_addr, self.memory_size,
                     self.userspace_addr, self.mmap_offset)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(*_unpack(_REGION, data, "memory region"))


_NREGIONS = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """``VhostUserMemory``: up to 8 regions (``nregions``, padding, regions), one fd per
    region in the same order. QEMU sends only the regions present (8 + 32*n bytes)."""

    regions: tuple[MemoryRegionDesc, ...]

    def encode(self) -> bytes:
        if len(self.regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise VhostUserProtocolError(f"{len(self.regions)} regions exceed "
                                         f"{VHOST_MEMORY_BASELINE_NREGIONS}")
        return _NREGIONS.pack(len(self.regions), 0) + b"".join(
            r.encode() for r in self.regions)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        if len(data) < _NREGIONS.size:
            raise VhostUserProtocolError(f"memory table payload is {len(data)} bytes")
        count, _padding = _NREGIONS.unpack_from(data)
        if count > VHOST_MEMORY_BASELINE_NREGIONS:
            raise VhostUserProtocolError(f"memory table has {count} regions (max "
                                         f"{VHOST_MEMORY_BASELINE_NREGIONS})")
        if len(data) != _NREGIONS.size + count * _REGION.size:
            raise VhostUserProtocolError(f"memory table of {count} regions is "
                                         f"{len(data)} bytes")
        body = data[_NREGIONS.size:]
        return cls(tuple(MemoryRegionDesc.decode(body[i * _REGION.size:(i + 1) * _REGION.size])
                         for i in range(count)))


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """``VhostUserMemRegMsg`` (ADD_MEM_REG / REM_MEM_REG): 8 bytes padding, a region."""

    region: MemoryRegionDesc

    SIZE: ClassVar[int] = 8 + _REGION.size

    def encode(self) -> bytes:
        return bytes(8) + self.region.encode()

    @classmethod
    def decode(cls, data: bytes) -> Self:
        if len(data) != cls.SIZE:
            raise VhostUserProtocolError(f"single region payload is {len(data)} bytes")
        return cls(MemoryRegionDesc.decode(data[8:]))


_LOG = struct.Struct("<QQ")


@dataclass(frozen=True, slots=True)
class LogDescription:
    """``VhostUserLog`` (SET_LOG_BASE with LOG_SHMFD): size and offset of the dirty log
    in the accompanying fd; bit ``page`` of the log covers guest page ``page``."""

    mmap_size: int
    mmap_offset: int

    def encode(self) -> bytes:
        return _pack(_LOG, "log", self.mmap_size, self.mmap_offset)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(*_unpack(_LOG, data, "log"))


_CONFIG_HDR = struct.Struct("<III")


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """``VhostUserConfig`` (GET/SET_CONFIG): offset, size, flags, then ``size`` bytes of
    device configuration space (at most 256). ``flags`` 1 marks a live-migration write."""

    offset: int
    data: bytes
    flags: int = 0

    FLAG_WRITABLE: ClassVar[int] = 0
    FLAG_LIVE_MIGRATION: ClassVar[int] = 1

    def encode(self) -> bytes:
        if len(self.data) > VHOST_USER_MAX_CONFIG_SIZE:
            raise VhostUserProtocolError(f"config payload of {len(self.data)} bytes exceeds "
                                         f"{VHOST_USER_MAX_CONFIG_SIZE}")
        return _pack(_CONFIG_HDR, "config", self.offset, len(self.data), self.flags) + bytes(
            self.data)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        if len(data) < _CONFIG_HDR.size:
            raise VhostUserProtocolError(f"config payload is {len(data)} bytes")
        offset, size, flags = _CONFIG_HDR.unpack_from(data)
        if size > VHOST_USER_MAX_CONFIG_SIZE:
            raise VhostUserProtocolError(f"config size {size} exceeds "
                                         f"{VHOST_USER_MAX_CONFIG_SIZE}")
        if len(data) != _CONFIG_HDR.size + size:
            raise VhostUserProtocolError(f"config of size {size} in a payload of "
                                         f"{len(data)} bytes")
        return cls(offset, bytes(data[_CONFIG_HDR.size:]), flags)


_IOTLB = struct.Struct("<QQQBB6x")


@dataclass(frozen=True, slots=True)
class IotlbMessage:
    """``struct vhost_iotlb_msg`` (26 bytes of fields, padded to 32 by its alignment)."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int

    def encode(self) -> bytes:
        return _pack(_IOTLB, "iotlb", self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(*_unpack(_IOTLB, data, "iotlb"))


_AREA = struct.Struct("<QQQ")


@dataclass(frozen=True, slots=True)
class VringArea:
    """``VhostUserVringArea`` (VRING_HOST_NOTIFIER_MSG): the u64 holds the vring index
    and the no-fd flag, as in :class:`VringFile`."""

    index: int
    size: int
    offset: int
    no_fd: bool = False

    def encode(self) -> bytes:
        if not 0 <= self.index <= VHOST_USER_VRING_IDX_MASK:
            raise VhostUserProtocolError(f"vring index {self.index} does not fit in 8 bits")
        u64 = self.index | (VHOST_USER_VRING_NOFD_MASK if self.no_fd else 0)
        return _pack(_AREA, "vring area", u64, self.size, self.offset)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        u64, size, offset = _unpack(_AREA, data, "vring area")
        if u64 & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise VhostUserProtocolError(f"vring area value {u64:#x} has unknown bits")
        return cls(u64 & VHOST_USER_VRING_IDX_MASK, size, offset,
                   bool(u64 & VHOST_USER_VRING_NOFD_MASK))


_INFLIGHT = struct.Struct("<QQHH4x")


@dataclass(frozen=True, slots=True)
class InflightDescription:
    """``VhostUserInflight``: mmap size/offset, num_queues u16, queue_size u16 (the C
    struct's alignment pads it to 24 bytes)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def encode(self) -> bytes:
        return _pack(_INFLIGHT, "inflight", self.mmap_size, self.mmap_offset,
                     self.num_queues, self.queue_size)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(*_unpack(_INFLIGHT, data, "inflight"))


_TRANSFER = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer:
    """``VhostUserTransferDeviceState`` (SET_DEVICE_STATE_FD): direction, phase."""

    direction: int
    phase: int

    def encode(self) -> bytes:
        return _pack(_TRANSFER, "device state transfer", self.direction, self.phase)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(*_unpack(_TRANSFER, data, "device state transfer"))


@dataclass(frozen=True, slots=True)
class SharedObject:
    """``VhostUserShared``: a 16-byte UUID."""

    uuid: bytes

    def encode(self) -> bytes:
        if len(self.uuid) != 16:
            raise VhostUserProtocolError("shared object UUID must be 16 bytes")
        return bytes(self.uuid)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        if len(data) != 16:
            raise VhostUserProtocolError(f"shared object payload is {len(data)} bytes")
        return cls(bytes(data))


@dataclass(frozen=True, slots=True)
class RawPayload:
    """An opaque body: requests we do not decode (unknown codes, crypto sessions). The
    session refuses them; the bytes are kept for logs."""

    data: bytes

    def encode(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls(bytes(data))


# -- the tables -------------------------------------------------------------------------

Decoder = Callable[[bytes], Payload]
FdCount = Callable[[Payload], tuple[int, ...]]


def _fds(*counts: int) -> FdCount:
    return lambda _payload: counts


def _vring_file_fds(payload: Payload) -> tuple[int, ...]:
    return (0,) if isinstance(payload, VringFile) and payload.no_fd else (1,)


def _vring_area_fds(payload: Payload) -> tuple[int, ...]:
    return (0,) if isinstance(payload, VringArea) and payload.no_fd else (1,)


def _table_fds(payload: Payload) -> tuple[int, ...]:
    return (len(payload.regions),) if isinstance(payload, MemoryTable) else (0,)


def _any_fds(_payload: Payload) -> tuple[int, ...]:
    return tuple(range(MAX_FDS + 1))


@dataclass(frozen=True, slots=True)
class PayloadRule:
    """What one (channel, request) carries: the payload decoders that may apply (tried
    in order; the first whose size fits wins) and the allowed fd counts."""

    decoders: tuple[Decoder, ...]
    fds: FdCount = field(default=_fds(0))

    def decode(self, data: bytes) -> Payload:
        errors = []
        for decoder in self.decoders:
            try:
                return decoder(data)
            except VhostUserProtocolError as exc:
                errors.append(str(exc))
        raise VhostUserProtocolError("; ".join(errors) or "no payload type applies")


_F = FrontendRequest
_B = BackendRequest
_RAW = PayloadRule((RawPayload.decode,), _any_fds)

_FRONTEND_REQUEST_RULES: dict[int, PayloadRule] = {
    _F.GET_FEATURES: PayloadRule((Empty.decode,)),
    _F.SET_FEATURES: PayloadRule((U64.decode,)),
    _F.SET_OWNER: PayloadRule((Empty.decode,)),
    _F.RESET_OWNER: PayloadRule((Empty.decode,)),
    _F.SET_MEM_TABLE: PayloadRule((MemoryTable.decode,), _table_fds),
    _F.SET_LOG_BASE: PayloadRule((LogDescription.decode,), _fds(1)),
    _F.SET_LOG_FD: PayloadRule((Empty.decode,), _fds(1)),
    _F.SET_VRING_NUM: PayloadRule((VringState.decode,)),
    _F.SET_VRING_ADDR: PayloadRule((VringAddr.decode,)),
    _F.SET_VRING_BASE: PayloadRule((VringState.decode,)),
    _F.GET_VRING_BASE: PayloadRule((VringState.decode,)),
    _F.SET_VRING_KICK: PayloadRule((VringFile.decode,), _vring_file_fds),
    _F.SET_VRING_CALL: PayloadRule((VringFile.decode,), _vring_file_fds),
    _F.SET_VRING_ERR: PayloadRule((VringFile.decode,), _vring_file_fds),
    _F.GET_PROTOCOL_FEATURES: PayloadRule((Empty.decode,)),
    _F.SET_PROTOCOL_FEATURES: PayloadRule((U64.decode,)),
    _F.GET_QUEUE_NUM: PayloadRule((Empty.decode,)),
    _F.SET_VRING_ENABLE: PayloadRule((VringState.decode,)),
    _F.SEND_RARP: PayloadRule((U64.decode,)),
    _F.NET_SET_MTU: PayloadRule((U64.decode,)),
    _F.SET_BACKEND_REQ_FD: PayloadRule((Empty.decode,), _fds(1)),
    _F.IOTLB_MSG: PayloadRule((IotlbMessage.decode,)),
    _F.SET_VRING_ENDIAN: PayloadRule((VringState.decode,)),
    _F.GET_CONFIG: PayloadRule((ConfigSpace.decode,)),
    _F.SET_CONFIG: PayloadRule((ConfigSpace.decode,)),
    _F.CREATE_CRYPTO_SESSION: PayloadRule((RawPayload.decode,)),
    _F.CLOSE_CRYPTO_SESSION: PayloadRule((U64.decode,)),
    _F.POSTCOPY_ADVISE: PayloadRule((Empty.decode,)),
    _F.POSTCOPY_LISTEN: PayloadRule((Empty.decode,)),
    _F.POSTCOPY_END: PayloadRule((Empty.decode,)),
    _F.GET_INFLIGHT_FD: PayloadRule((InflightDescription.decode,)),
    _F.SET_INFLIGHT_FD: PayloadRule((InflightDescription.decode,), _fds(1)),
    _F.GPU_SET_SOCKET: PayloadRule((Empty.decode,), _fds(1)),
    _F.RESET_DEVICE: PayloadRule((Empty.decode,)),
    _F.VRING_KICK: PayloadRule((VringState.decode,)),
    _F.GET_MAX_MEM_SLOTS: PayloadRule((Empty.decode,)),
    _F.ADD_MEM_REG: PayloadRule((SingleMemoryRegion.decode,), _fds(1)),
    # vhost-user.rst: no fd SHOULD come, a back end MAY accept one (and close it).
    _F.REM_MEM_REG: PayloadRule((SingleMemoryRegion.decode,), _fds(0, 1)),
    _F.SET_STATUS: PayloadRule((U64.decode,)),
    _F.GET_STATUS: PayloadRule((Empty.decode,)),
    _F.GET_SHARED_OBJECT: PayloadRule((SharedObject.decode,)),
    _F.SET_DEVICE_STATE_FD: PayloadRule((DeviceStateTransfer.decode,), _fds(1)),
    _F.CHECK_DEVICE_STATE: PayloadRule((Empty.decode,)),
}

#: Replies on the main socket. Requests missing here are answered only when the front
#: end set NEED_REPLY (REPLY_ACK), with a u64 (0 success).
_ACK = PayloadRule((U64.decode,))
_FRONTEND_REPLY_RULES: dict[int, PayloadRule] = {
    _F.GET_FEATURES: _ACK,
    _F.GET_PROTOCOL_FEATURES: _ACK,
    _F.GET_QUEUE_NUM: _ACK,
    _F.GET_VRING_BASE: PayloadRule((VringState.decode,)),
    # With LOG_SHMFD the back end acknowledges SET_LOG_BASE with a u64.
    _F.SET_LOG_BASE: _ACK,
    # Postcopy: the memory table comes back with the back end's bases; otherwise an ack.
    _F.SET_MEM_TABLE: PayloadRule((U64.decode, MemoryTable.decode)),
    # A zero-length reply is the back end's error indication.
    _F.GET_CONFIG: PayloadRule((ConfigSpace.decode, Empty.decode)),
    _F.GET_INFLIGHT_FD: PayloadRule((InflightDescription.decode,), _fds(1)),
    _F.POSTCOPY_ADVISE: PayloadRule((Empty.decode, U64.decode), _fds(1)),
    _F.POSTCOPY_END: _ACK,
    _F.IOTLB_MSG: _ACK,
    _F.GET_MAX_MEM_SLOTS: _ACK,
    _F.ADD_MEM_REG: PayloadRule((U64.decode, SingleMemoryRegion.decode)),
    _F.REM_MEM_REG: PayloadRule((U64.decode, SingleMemoryRegion.decode)),
    _F.GET_STATUS: _ACK,
    _F.GET_SHARED_OBJECT: PayloadRule((U64.decode,), _fds(0, 1)),
    _F.SET_DEVICE_STATE_FD: PayloadRule((U64.decode,), _fds(0, 1)),
    _F.CHECK_DEVICE_STATE: _ACK,
    _F.CREATE_CRYPTO_SESSION: PayloadRule((RawPayload.decode,)),
}

_BACKEND_REQUEST_RULES: dict[int, PayloadRule] = {
    _B.IOTLB_MSG: PayloadRule((IotlbMessage.decode,)),
    _B.CONFIG_CHANGE_MSG: PayloadRule((Empty.decode,)),
    _B.VRING_HOST_NOTIFIER_MSG: PayloadRule((VringArea.decode,), _vring_area_fds),
    _B.VRING_CALL: PayloadRule((VringState.decode,)),
    _B.VRING_ERR: PayloadRule((VringState.decode,)),
    _B.SHARED_OBJECT_ADD: PayloadRule((SharedObject.decode,)),
    _B.SHARED_OBJECT_REMOVE: PayloadRule((SharedObject.decode,)),
    _B.SHARED_OBJECT_LOOKUP: PayloadRule((SharedObject.decode,), _fds(0, 1)),
}

_FRONTEND_CODES = frozenset(int(code) for code in FrontendRequest)
_BACKEND_REPLY_RULES: dict[int, PayloadRule] = dict.fromkeys(BackendRequest, _ACK)


def payload_rule(channel: Channel, request: int) -> PayloadRule:
    """The payload rule for ``request`` on ``channel`` (opaque for unknown codes)."""
    table = {
        Channel.FRONTEND_REQUESTS: _FRONTEND_REQUEST_RULES,
        Channel.FRONTEND_REPLIES: _FRONTEND_REPLY_RULES,
        Channel.BACKEND_REQUESTS: _BACKEND_REQUEST_RULES,
        Channel.BACKEND_REPLIES: _BACKEND_REPLY_RULES,
    }[channel]
    rule = table.get(request)
    if rule is None:
        if channel is Channel.FRONTEND_REPLIES and request in _FRONTEND_CODES:
            return _ACK  # a REPLY_ACK answer
        return _RAW
    return rule


def request_code(channel: Channel, request: int) -> int:
    """The request as an IntEnum member when known (for readable logs), else the int."""
    enum: type[IntEnum] = BackendRequest if channel.is_backend_channel else FrontendRequest
    try:
        return enum(request)
    except ValueError:
        return request


# -- header and message -----------------------------------------------------------------

_HEADER = struct.Struct("<III")


def encode_header(request: int, flags: int, size: int) -> bytes:
    return _pack(_HEADER, "header", request, flags, size)


def decode_header(data: bytes, channel: Channel, *,
                  max_payload: int = MAX_PAYLOAD_SIZE) -> tuple[int, int, int]:
    """``(request, flags, size)`` from 12 header bytes, checked for ``channel``."""
    if len(data) != HEADER_SIZE:
        raise VhostUserProtocolError(f"header is {len(data)} bytes, not {HEADER_SIZE}")
    request, flags, size = _HEADER.unpack(data)
    if flags & _VERSION_MASK != VHOST_USER_VERSION:
        raise VhostUserProtocolError(f"unsupported message version {flags & _VERSION_MASK}")
    if flags & ~_KNOWN_FLAGS:
        raise VhostUserProtocolError(f"unknown header flags {flags:#x}")
    if channel.is_reply:
        if not flags & HeaderFlag.REPLY:
            raise VhostUserProtocolError("a reply without the REPLY flag")
        if flags & HeaderFlag.NEED_REPLY:
            raise VhostUserProtocolError("a reply with NEED_REPLY set")
    elif flags & HeaderFlag.REPLY:
        raise VhostUserProtocolError("a request with the REPLY flag")
    if size > max_payload:
        raise VhostUserProtocolError(f"payload size {size} exceeds {max_payload}")
    return request, flags, size


def decode_body(channel: Channel, request: int, flags: int, body: bytes,
                fds: tuple[int, ...]) -> VhostUserMessage:
    """A message from its checked header fields, its payload bytes and its fds."""
    rule = payload_rule(channel, request)
    try:
        payload = rule.decode(body)
    except VhostUserProtocolError as exc:
        name = getattr(request_code(channel, request), "name", request)
        raise VhostUserProtocolError(f"{name}: {exc}", fds=fds) from exc
    allowed = rule.fds(payload)
    if len(fds) not in allowed:
        name = getattr(request_code(channel, request), "name", request)
        raise VhostUserProtocolError(f"{name} came with {len(fds)} fds, expected "
                                     f"{' or '.join(map(str, allowed))}", fds=fds)
    return VhostUserMessage(request_code(channel, request), payload, flags, fds)


@dataclass(frozen=True, slots=True)
class VhostUserMessage:
    """One message: request code, typed payload, header flags, and its fds."""

    request: int
    payload: Payload = field(default_factory=Empty)
    flags: int = VHOST_USER_VERSION
    fds: tuple[int, ...] = ()

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)

    @classmethod
    def request_of(cls, request: int, payload: Payload | None = None, *,
                   need_reply: bool = False, fds: tuple[int, ...] = ()) -> VhostUserMessage:
        flags = VHOST_USER_VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
        return cls(request, payload if payload is not None else Empty(), int(flags), fds)

    @classmethod
    def reply_to(cls, request: int, payload: Payload | None = None, *,
                 fds: tuple[int, ...] = ()) -> VhostUserMessage:
        return cls(request, payload if payload is not None else Empty(),
                   int(VHOST_USER_VERSION | HeaderFlag.REPLY), fds)

    def encode(self) -> bytes:
        """Header and payload bytes (the fds go in ancillary data, sent by the shell)."""
        body = self.payload.encode()
        if len(body) > MAX_PAYLOAD_SIZE:
            raise VhostUserProtocolError(f"payload of {len(body)} bytes is too large")
        if len(self.fds) > MAX_FDS:
            raise VhostUserProtocolError(f"{len(self.fds)} fds exceed {MAX_FDS}")
        return encode_header(int(self.request), self.flags, len(body)) + body

    def __str__(self) -> str:
        name = getattr(self.request, "name", str(self.request))
        kind = "reply" if self.is_reply else "request"
        return f"{name} {kind} {self.payload!r} fds={list(self.fds)}"
