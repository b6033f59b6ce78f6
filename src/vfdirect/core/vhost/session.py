"""The back-end side of one vhost-user connection, as a sans-IO state machine.

Rules of this module:

* :meth:`BackendSession.handle` takes one decoded front-end request (with its fds) and
  returns a list of **actions** for the shell: replies to send, memory to map, vrings
  to start/stop/enable, fds to close, or "close this connection". It never raises for
  peer input, never touches a socket, and affects only this connection;
* every fd that comes in is released exactly once. Memory fds are handed over for good
  in ``MapMemory`` (the shell maps, then closes them). Kick, call, error and log fds stay
  the session's and are only *lent* to the shell by ``StartVring``, ``SetVring*`` and
  ``SetLogBase``; the session says when to close each with exactly one ``CloseFds``
  (replaced, released by a ring stop or a reset, or at :meth:`BackendSession.disconnected`).
  Fds of a refused request come back at once in a ``CloseFds``;
* GET_VRING_BASE stops a ring: the session answers with ``StopVring`` and the reply is
  deferred until the device has stopped fetching and calls
  :meth:`BackendSession.vring_stopped` with its ``last_avail_idx`` (QEMU waits for
  that reply, so no other request may arrive meanwhile);
* refusal policy (vhost-user.rst "REPLY_ACK"):

  1. a request whose reply carries a status (SET_LOG_BASE, IOTLB_MSG, POSTCOPY_END,
     GET_SHARED_OBJECT, SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE) is answered with a
     non-zero u64; GET_CONFIG with a zero-length payload (its documented error form);
  2. any other request with NEED_REPLY set gets a non-zero u64 (QEMU sets NEED_REPLY
     only when REPLY_ACK was negotiated; we answer whenever it is set, so that a front
     end never waits forever);
  3. otherwise a request that *must* produce a reply we cannot give (GET_INFLIGHT_FD,
     GET_STATUS, ... only legal after a protocol feature we never offer) closes the
     connection;
  4. otherwise a *supported* request with invalid content (a ring size that is not a
     power of 2, a vring index out of range, features we did not offer, a kick before
     the ring is configured) closes the connection: the front end would go on believing
     the device configured;
  5. otherwise (an unsupported, fire-and-forget request such as SEND_RARP or
     SET_VRING_ENDIAN) the request is ignored and reported with ``Refused``.

What QEMU's vhost-user-scsi front end sends (hw/virtio/vhost-user.c, vhost.c):
GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (with MQ),
SET_OWNER, GET_FEATURES; then on start SET_FEATURES, SET_MEM_TABLE, and per vring
SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL,
SET_VRING_ENABLE; for migration SET_LOG_BASE (LOG_SHMFD), SET_FEATURES with LOG_ALL and
SET_VRING_ADDR with VHOST_VRING_F_LOG; on stop GET_VRING_BASE per vring; RESET_DEVICE
when the guest resets the device. It does not require SET_OWNER first, so neither do
we.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from vfdirect.core.vhost.messages import (
    U64,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    Channel,
    ConfigSpace,
    Empty,
    FrontendRequest,
    LogDescription,
    MemoryRegionDesc,
    MemoryTable,
    Payload,
    ProtocolFeature,
    VhostUserMessage,
    VhostUserProtocolError,
    VringAddr,
    VringFile,
    VringState,
    payload_rule,
)
from vfdirect.core.virtio.errors import GuestMemoryError, VirtqueueError, VirtqueueFault
from vfdirect.core.virtio.features import VirtioFeature, has
from vfdirect.core.virtio.layout import VirtqueueConfig, is_valid_queue_size
from vfdirect.core.virtio.memory import RegionMemory

__all__ = [
    "DEFAULT_PROTOCOL_FEATURES",
    "SUPPORTED_PROTOCOL_FEATURES",
    "Action",
    "BackendConfig",
    "BackendSession",
    "CloseConnection",
    "CloseFds",
    "EnableVring",
    "FeaturesChanged",
    "MapMemory",
    "Refused",
    "ResetDevice",
    "SendReply",
    "SessionState",
    "SetLogBase",
    "SetVringCall",
    "SetVringErr",
    "SetVringKick",
    "StartVring",
    "StopVring",
    "UpdateVringAddr",
    "VringSetup",
]

_P = ProtocolFeature
_F = FrontendRequest
_T = TypeVar("_T")

#: Protocol features this session implements.
SUPPORTED_PROTOCOL_FEATURES = (1 << _P.MQ | 1 << _P.LOG_SHMFD | 1 << _P.REPLY_ACK
                               | 1 << _P.CONFIG | 1 << _P.RESET_DEVICE)
DEFAULT_PROTOCOL_FEATURES = SUPPORTED_PROTOCOL_FEATURES


# -- actions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendReply:
    """Send ``message`` (encode it; its fds go as ancillary data)."""

    message: VhostUserMessage


@dataclass(frozen=True, slots=True)
class MapMemory:
    """Replace the whole memory table: map ``fds[i]`` from ``regions[i].mmap_offset`` for
    ``memory_size`` bytes and build a RegionMemory; running rings must be rebuilt on the
    new memory (``Virtqueue.save()``/``restore()``)."""

    regions: tuple[MemoryRegionDesc, ...]
    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SetLogBase:
    """Map the dirty log (``fd``) for migration: one bit per 4 KiB guest page."""

    fd: int
    log: LogDescription


@dataclass(frozen=True, slots=True)
class VringSetup:
    """Everything needed to start serving vring ``index``."""

    index: int
    num: int
    addr: VringAddr
    base: int
    kick_fd: int | None
    call_fd: int | None
    err_fd: int | None
    enabled: bool
    features: int

    def queue_config(self, memory: RegionMemory) -> VirtqueueConfig:
        """The ring's guest-physical configuration: the front end's user addresses
        translated through the memory table (vhost-user.rst "Memory access")."""
        event_idx = has(self.features, VirtioFeature.RING_EVENT_IDX)
        indirect = has(self.features, VirtioFeature.RING_INDIRECT_DESC)
        probe = VirtqueueConfig(self.num, 0, 0, 0, event_idx=event_idx)
        try:
            desc = memory.user_to_gpa(self.addr.desc_user_addr, probe.desc_bytes)
            avail = memory.user_to_gpa(self.addr.avail_user_addr, probe.avail_bytes)
            used = memory.user_to_gpa(self.addr.used_user_addr, probe.used_bytes)
        except GuestMemoryError as exc:
            raise VirtqueueError(f"vring {self.index}: {exc}",
                                 fault=VirtqueueFault.BAD_CONFIG) from exc
        return VirtqueueConfig(self.num, desc, avail, used, event_idx=event_idx,
                               indirect=indirect)


@dataclass(frozen=True, slots=True)
class StartVring:
    """Start serving a vring (watch its kick fd, or poll when ``kick_fd`` is None)."""

    setup: VringSetup


@dataclass(frozen=True, slots=True)
class StopVring:
    """Stop fetching from vring ``index``, finish what is in flight, then call
    :meth:`BackendSession.vring_stopped` with the ring's ``last_avail_idx``."""

    index: int


@dataclass(frozen=True, slots=True)
class EnableVring:
    index: int
    enabled: bool


@dataclass(frozen=True, slots=True)
class UpdateVringAddr:
    """A started ring's addresses were re-sent (QEMU toggles VHOST_VRING_F_LOG)."""

    index: int
    addr: VringAddr


@dataclass(frozen=True, slots=True)
class SetVringKick:
    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class SetVringCall:
    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class SetVringErr:
    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class FeaturesChanged:
    """Negotiated features changed while rings run (LOG_ALL on/off for migration)."""

    features: int


@dataclass(frozen=True, slots=True)
class ResetDevice:
    """RESET_DEVICE: stop every ring without replies and drop device state."""


@dataclass(frozen=True, slots=True)
class CloseFds:
    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Refused:
    """A request was refused (for the log); what the peer sees is in the other actions."""

    request: int
    reason: str


@dataclass(frozen=True, slots=True)
class CloseConnection:
    reason: str


Action = (SendReply | MapMemory | SetLogBase | StartVring | StopVring | EnableVring
          | UpdateVringAddr | SetVringKick | SetVringCall | SetVringErr | FeaturesChanged
          | ResetDevice | CloseFds | Refused | CloseConnection)


# -- configuration and state ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """What the device offers on this connection."""

    device_features: int
    num_queues: int
    protocol_features: int = DEFAULT_PROTOCOL_FEATURES
    max_queue_size: int = 1024
    config_space: bytes = b""

    def __post_init__(self) -> None:
        if self.protocol_features & ~SUPPORTED_PROTOCOL_FEATURES:
            raise ValueError("protocol features beyond what the session implements")
        if not 1 <= self.num_queues <= 256:
            raise ValueError("num_queues must be in 1..256 (8-bit vring index)")
        if not is_valid_queue_size(self.max_queue_size):
            raise ValueError("max_queue_size must be a power of 2 up to 32768")
        if self.device_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES | 1 << VHOST_F_LOG_ALL):
            raise ValueError("bits 26 and 30 are the session's to offer")

    @property
    def offered_features(self) -> int:
        extra = 1 << VHOST_USER_F_PROTOCOL_FEATURES
        if has(self.protocol_features, ProtocolFeature.LOG_SHMFD):
            extra |= 1 << VHOST_F_LOG_ALL  # migration needs both (QEMU checks LOG_ALL)
        return self.device_features | extra


class SessionState(Enum):
    OPEN = "open"
    AWAITING_VRING_BASE = "awaiting-vring-base"
    CLOSED = "closed"


@dataclass(slots=True)
class _Vring:
    num: int | None = None
    addr: VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False
    enabled: bool | None = None  # None: never set by SET_VRING_ENABLE

    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.kick_fd, self.call_fd, self.err_fd) if fd is not None)


@dataclass(frozen=True, slots=True)
class VringInfo:
    """A read-only snapshot of one vring's vhost-user state."""

    index: int
    num: int | None
    addr: VringAddr | None
    base: int
    kick_fd: int | None
    call_fd: int | None
    err_fd: int | None
    started: bool
    enabled: bool


class _Refuse(Exception):
    def __init__(self, reason: str, *, fatal: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal


#: Requests that always get a reply, and how a refusal of each is expressed.
_REPLY_FAILURE: dict[int, Callable[[], Payload] | None] = {
    _F.SET_LOG_BASE: lambda: U64(1),
    _F.IOTLB_MSG: lambda: U64(1),
    _F.POSTCOPY_END: lambda: U64(1),
    _F.GET_SHARED_OBJECT: lambda: U64(1),
    _F.SET_DEVICE_STATE_FD: lambda: U64(1),
    _F.CHECK_DEVICE_STATE: lambda: U64(1),
    _F.GET_CONFIG: Empty,
    # No failure form: refusing these closes the connection.
    _F.GET_FEATURES: None,
    _F.GET_PROTOCOL_FEATURES: None,
    _F.GET_QUEUE_NUM: None,
    _F.GET_VRING_BASE: None,
    _F.GET_INFLIGHT_FD: None,
    _F.POSTCOPY_ADVISE: None,
    _F.GET_MAX_MEM_SLOTS: None,
    _F.GET_STATUS: None,
    _F.CREATE_CRYPTO_SESSION: None,
}


class BackendSession:
    """Back-end state of one vhost-user connection for one virtio device."""

    def __init__(self, config: BackendConfig) -> None:
        self._config = config
        self._state = SessionState.OPEN
        self._features = 0
        self._features_set = False
        self._protocol_features = 0
        self._owner = False
        self._vrings = [_Vring() for _ in range(config.num_queues)]
        self._awaiting: int | None = None
        self._log_fd: int | None = None
        self._handlers: dict[int, Callable[[VhostUserMessage], list[Action]]] = {
            _F.GET_FEATURES: self._get_features,
            _F.SET_FEATURES: self._set_features,
            _F.SET_OWNER: self._set_owner,
            _F.RESET_OWNER: self._reset_owner,
            _F.SET_MEM_TABLE: self._set_mem_table,
            _F.SET_LOG_BASE: self._set_log_base,
            _F.SET_LOG_FD: self._set_log_fd,
            _F.SET_VRING_NUM: self._set_vring_num,
            _F.SET_VRING_ADDR: self._set_vring_addr,
            _F.SET_VRING_BASE: self._set_vring_base,
            _F.GET_VRING_BASE: self._get_vring_base,
            _F.SET_VRING_KICK: self._set_vring_kick,
            _F.SET_VRING_CALL: self._set_vring_call,
            _F.SET_VRING_ERR: self._set_vring_err,
            _F.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            _F.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            _F.GET_QUEUE_NUM: self._get_queue_num,
            _F.SET_VRING_ENABLE: self._set_vring_enable,
            _F.GET_CONFIG: self._get_config,
            _F.RESET_DEVICE: self._reset_device,
        }

    # -- observers ------------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def features(self) -> int:
        """Virtio features acknowledged by SET_FEATURES."""
        return self._features

    @property
    def protocol_features(self) -> int:
        return self._protocol_features

    @property
    def owner(self) -> bool:
        return self._owner

    @property
    def awaiting_vring_base(self) -> int | None:
        return self._awaiting

    def vring(self, index: int) -> VringInfo:
        v = self._vrings[index]
        return VringInfo(index, v.num, v.addr, v.base, v.kick_fd, v.call_fd, v.err_fd,
                         v.started, self._enabled(v))

    def _protocol(self, feature: ProtocolFeature) -> bool:
        return has(self._protocol_features, feature)

    def _enabled(self, vring: _Vring) -> bool:
        # vhost-user.rst "Ring states": without VHOST_USER_F_PROTOCOL_FEATURES a ring
        # starts enabled; with it, it waits for SET_VRING_ENABLE 1.
        if vring.enabled is not None:
            return vring.enabled
        return not has(self._features, VHOST_USER_F_PROTOCOL_FEATURES)

    # -- entry points ---------------------------------------------------------------------

    def handle(self, message: VhostUserMessage) -> list[Action]:
        """Process one request from the front end."""
        fds = (CloseFds(message.fds),) if message.fds else ()
        if self._state is SessionState.CLOSED:
            return list(fds)
        if self._state is SessionState.AWAITING_VRING_BASE:
            return self._close([*fds], f"{_name(message.request)} arrived while the "
                                      "GET_VRING_BASE reply was pending")
        if message.is_reply:
            return self._close([*fds], "a reply arrived on the request channel")
        if not _well_formed(message):  # built by hand rather than by the parser
            return self._close([*fds], f"{_name(message.request)} is malformed")
        handler = self._handlers.get(int(message.request))
        try:
            if handler is None:
                raise _Refuse("not supported by this back end", fatal=False)
            actions = handler(message)
        except _Refuse as refusal:
            return self._refuse(message, refusal)
        has_reply = any(isinstance(a, SendReply) for a in actions)
        if (message.need_reply and not has_reply and int(message.request) not in _REPLY_FAILURE
                and self._state is SessionState.OPEN):
            actions.append(self._reply(message.request, U64(0)))
        return actions

    def vring_stopped(self, index: int, last_avail_idx: int) -> list[Action]:
        """The device stopped vring ``index`` (after ``StopVring``): send GET_VRING_BASE's
        reply. ``last_avail_idx`` is the next available entry the device would take."""
        if self._awaiting != index or self._state is not SessionState.AWAITING_VRING_BASE:
            raise ValueError(f"vring {index} was not being stopped")
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise ValueError(f"last_avail_idx {last_avail_idx} is not 16-bit")
        vring = self._vrings[index]
        vring.base = last_avail_idx
        self._state = SessionState.OPEN
        self._awaiting = None
        return [self._reply(_F.GET_VRING_BASE, VringState(index, last_avail_idx)),
                *self._stop_fds(vring)]

    def disconnected(self) -> list[Action]:
        """The connection is gone: release every fd the session still holds."""
        held = [fd for v in self._vrings for fd in v.fds()]
        if self._log_fd is not None:
            held.append(self._log_fd)
        for v in self._vrings:
            v.kick_fd = v.call_fd = v.err_fd = None
            v.started = False
        self._log_fd = None
        self._state = SessionState.CLOSED
        return [CloseFds(tuple(held))] if held else []

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def _reply(request: int, payload: Payload, fds: tuple[int, ...] = ()) -> SendReply:
        return SendReply(VhostUserMessage.reply_to(request, payload, fds=fds))

    def _close(self, actions: list[Action], reason: str) -> list[Action]:
        held = self.disconnected()
        self._state = SessionState.CLOSED
        return [*actions, *held, CloseConnection(reason)]

    def _refuse(self, message: VhostUserMessage, refusal: _Refuse) -> list[Action]:
        request = int(message.request)
        actions: list[Action] = []
        if message.fds:
            actions.append(CloseFds(message.fds))
        actions.append(Refused(message.request, refusal.reason))
        if request in _REPLY_FAILURE:
            failure = _REPLY_FAILURE[request]
            if failure is None:
                return self._close(actions, f"{_name(message.request)} refused: "
                                            f"{refusal.reason}")
            actions.append(self._reply(message.request, failure()))
            return actions
        if message.need_reply:
            actions.append(self._reply(message.request, U64(1)))
            return actions
        if refusal.fatal:
            return self._close(actions, f"{_name(message.request)} refused: "
                                        f"{refusal.reason}")
        return actions

    def _ring(self, index: int) -> _Vring:
        if not 0 <= index < len(self._vrings):
            raise _Refuse(f"vring index {index} out of range (0..{len(self._vrings) - 1})",
                          fatal=True)
        return self._vrings[index]

    @staticmethod
    def _payload(message: VhostUserMessage, kind: type[_T]) -> _T:
        if not isinstance(message.payload, kind):
            raise _Refuse(f"payload is {type(message.payload).__name__}, not "
                          f"{kind.__name__}", fatal=True)
        return message.payload

    def _stop_fds(self, vring: _Vring) -> list[Action]:
        # libvhost-user closes kick and call on GET_VRING_BASE; QEMU re-sends both on the
        # next start.
        fds = tuple(fd for fd in (vring.kick_fd, vring.call_fd) if fd is not None)
        vring.kick_fd = vring.call_fd = None
        vring.started = False
        return [CloseFds(fds)] if fds else []

    # -- handlers -------------------------------------------------------------------------

    def _get_features(self, message: VhostUserMessage) -> list[Action]:
        return [self._reply(message.request, U64(self._config.offered_features))]

    def _set_features(self, message: VhostUserMessage) -> list[Action]:
        value = self._payload(message, U64).value
        extra = value & ~self._config.offered_features
        if extra:
            raise _Refuse(f"features {extra:#x} were not offered", fatal=True)
        changed = value != self._features
        self._features = value
        self._features_set = True
        if changed and any(v.started for v in self._vrings):
            return [FeaturesChanged(value)]
        return []

    def _set_owner(self, message: VhostUserMessage) -> list[Action]:
        self._owner = True
        return []

    def _reset_owner(self, message: VhostUserMessage) -> list[Action]:
        # Deprecated (vhost-user.rst): we take its safe reading, "disable all rings".
        actions: list[Action] = []
        for index, vring in enumerate(self._vrings):
            if self._enabled(vring):
                vring.enabled = False
                if vring.started:
                    actions.append(EnableVring(index, False))
        return actions

    def _set_mem_table(self, message: VhostUserMessage) -> list[Action]:
        table = self._payload(message, MemoryTable)
        limit = 1 << 64
        spans_gpa: list[tuple[int, int]] = []
        spans_user: list[tuple[int, int]] = []
        for region in table.regions:
            if region.memory_size == 0:
                raise _Refuse("empty memory region", fatal=True)
            for base in (region.guest_phys_addr, region.userspace_addr, region.mmap_offset):
                if base + region.memory_size > limit:
                    raise _Refuse("memory region wraps the 64-bit space", fatal=True)
            spans_gpa.append((region.guest_phys_addr, region.memory_size))
            spans_user.append((region.userspace_addr, region.memory_size))
        for spans, what in ((spans_gpa, "guest"), (spans_user, "user")):
            ordered = sorted(spans)
            for (a, n), (b, _) in itertools.pairwise(ordered):
                if b < a + n:
                    raise _Refuse(f"memory regions overlap in {what} addresses", fatal=True)
        return [MapMemory(table.regions, message.fds)]

    def _set_log_base(self, message: VhostUserMessage) -> list[Action]:
        if not self._protocol(ProtocolFeature.LOG_SHMFD):
            raise _Refuse("SET_LOG_BASE without LOG_SHMFD", fatal=True)
        log = self._payload(message, LogDescription)
        actions: list[Action] = []
        if self._log_fd is not None:
            actions.append(CloseFds((self._log_fd,)))
        self._log_fd = message.fds[0]
        actions.append(SetLogBase(message.fds[0], log))
        actions.append(self._reply(message.request, U64(0)))
        return actions

    def _set_log_fd(self, message: VhostUserMessage) -> list[Action]:
        # Optional eventfd to tell the front end the log changed; we do not use it.
        return [CloseFds(message.fds)] if message.fds else []

    def _set_vring_num(self, message: VhostUserMessage) -> list[Action]:
        state = self._payload(message, VringState)
        vring = self._ring(state.index)
        if vring.started:
            raise _Refuse(f"vring {state.index} is running", fatal=True)
        if not is_valid_queue_size(state.num) or state.num > self._config.max_queue_size:
            raise _Refuse(f"vring size {state.num} is not a power of 2 up to "
                          f"{self._config.max_queue_size}", fatal=True)
        vring.num = state.num
        return []

    def _set_vring_addr(self, message: VhostUserMessage) -> list[Action]:
        addr = self._payload(message, VringAddr)
        vring = self._ring(addr.index)
        if addr.flags & ~VringAddr.F_LOG:
            raise _Refuse(f"unknown vring address flags {addr.flags:#x}", fatal=True)
        vring.addr = addr
        return [UpdateVringAddr(addr.index, addr)] if vring.started else []

    def _set_vring_base(self, message: VhostUserMessage) -> list[Action]:
        state = self._payload(message, VringState)
        vring = self._ring(state.index)
        if vring.started:
            raise _Refuse(f"vring {state.index} is running", fatal=True)
        if state.num > 0xFFFF:
            raise _Refuse(f"split ring base {state.num} is not 16-bit", fatal=True)
        vring.base = state.num
        return []

    def _get_vring_base(self, message: VhostUserMessage) -> list[Action]:
        state = self._payload(message, VringState)
        vring = self._ring(state.index)
        if vring.started:
            self._state = SessionState.AWAITING_VRING_BASE
            self._awaiting = state.index
            return [StopVring(state.index)]
        return [self._reply(message.request, VringState(state.index, vring.base)),
                *self._stop_fds(vring)]

    def _vring_fd(self, message: VhostUserMessage) -> tuple[int, _Vring, int | None]:
        file = self._payload(message, VringFile)
        vring = self._ring(file.index)
        return file.index, vring, None if file.no_fd else message.fds[0]

    def _set_vring_kick(self, message: VhostUserMessage) -> list[Action]:
        index, vring, fd = self._vring_fd(message)
        if not vring.started and (vring.num is None or vring.addr is None):
            raise _Refuse(f"vring {index} kicked before its size and addresses were set",
                          fatal=True)
        actions: list[Action] = []
        if vring.kick_fd is not None:
            actions.append(CloseFds((vring.kick_fd,)))
        vring.kick_fd = fd
        if vring.started:
            actions.append(SetVringKick(index, fd))
            return actions
        assert vring.num is not None and vring.addr is not None
        vring.started = True
        actions.append(StartVring(VringSetup(
            index=index, num=vring.num, addr=vring.addr, base=vring.base, kick_fd=fd,
            call_fd=vring.call_fd, err_fd=vring.err_fd, enabled=self._enabled(vring),
            features=self._features)))
        return actions

    def _set_vring_call(self, message: VhostUserMessage) -> list[Action]:
        index, vring, fd = self._vring_fd(message)
        actions: list[Action] = []
        if vring.call_fd is not None:
            actions.append(CloseFds((vring.call_fd,)))
        vring.call_fd = fd
        if vring.started:
            actions.append(SetVringCall(index, fd))
        return actions

    def _set_vring_err(self, message: VhostUserMessage) -> list[Action]:
        index, vring, fd = self._vring_fd(message)
        actions: list[Action] = []
        if vring.err_fd is not None:
            actions.append(CloseFds((vring.err_fd,)))
        vring.err_fd = fd
        if vring.started:
            actions.append(SetVringErr(index, fd))
        return actions

    def _get_protocol_features(self, message: VhostUserMessage) -> list[Action]:
        return [self._reply(message.request, U64(self._config.protocol_features))]

    def _set_protocol_features(self, message: VhostUserMessage) -> list[Action]:
        value = self._payload(message, U64).value
        extra = value & ~self._config.protocol_features
        if extra:
            raise _Refuse(f"protocol features {extra:#x} were not offered", fatal=True)
        self._protocol_features = value
        return []

    def _get_queue_num(self, message: VhostUserMessage) -> list[Action]:
        return [self._reply(message.request, U64(self._config.num_queues))]

    def _set_vring_enable(self, message: VhostUserMessage) -> list[Action]:
        state = self._payload(message, VringState)
        vring = self._ring(state.index)
        if state.num not in (0, 1):
            raise _Refuse(f"SET_VRING_ENABLE value {state.num} is not 0 or 1", fatal=True)
        vring.enabled = bool(state.num)
        return [EnableVring(state.index, vring.enabled)] if vring.started else []

    def _get_config(self, message: VhostUserMessage) -> list[Action]:
        if not self._protocol(ProtocolFeature.CONFIG):
            raise _Refuse("GET_CONFIG without the CONFIG protocol feature", fatal=True)
        request = self._payload(message, ConfigSpace)
        space = self._config.config_space
        end = request.offset + len(request.data)
        if end > len(space):
            raise _Refuse(f"config range {request.offset}+{len(request.data)} beyond the "
                          f"{len(space)}-byte config space", fatal=False)
        return [self._reply(message.request,
                            ConfigSpace(request.offset, space[request.offset:end],
                                        request.flags))]

    def _reset_device(self, message: VhostUserMessage) -> list[Action]:
        if not self._protocol(ProtocolFeature.RESET_DEVICE):
            raise _Refuse("RESET_DEVICE without the RESET_DEVICE protocol feature",
                          fatal=True)
        held = tuple(fd for v in self._vrings for fd in v.fds())
        self._vrings = [_Vring() for _ in range(self._config.num_queues)]
        self._features = 0
        self._features_set = False
        actions: list[Action] = [ResetDevice()]
        if held:
            actions.append(CloseFds(held))
        return actions


def _well_formed(message: VhostUserMessage) -> bool:
    """Whether ``message`` has the payload type and fd count the parser would accept."""
    rule = payload_rule(Channel.FRONTEND_REQUESTS, int(message.request))
    try:
        payload = rule.decode(message.payload.encode())
    except VhostUserProtocolError:
        return False
    return payload == message.payload and len(message.fds) in rule.fds(payload)


def _name(request: int) -> str:
    return getattr(request, "name", str(request))
