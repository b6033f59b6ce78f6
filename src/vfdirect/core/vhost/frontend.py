"""The front-end side of vhost-user (what our Python VM, or QEMU, does), sans-IO.

Rules of this module:

* each procedure is a generator: it yields the next request to send; the shell sends it
  (with its fds) and resumes the generator with the reply when :func:`expects_reply`
  says one is due, or with ``None``; the generator's return value is the result;
* a missing, mistyped or negative reply raises
  :class:`~vfdirect.core.vhost.messages.VhostUserProtocolError` (the back end broke the
  protocol or refused; the front end closes the connection, as QEMU does);
* when REPLY_ACK is negotiated, every request without its own reply is sent with
  NEED_REPLY so that a refusal is seen at once (vhost-user.rst "REPLY_ACK");
* the order follows QEMU's vhost-user front end: GET_FEATURES, GET_PROTOCOL_FEATURES,
  SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (with MQ), SET_OWNER; on start SET_FEATURES,
  SET_MEM_TABLE, then per vring SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR,
  SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ENABLE; to stop, GET_VRING_BASE per vring.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

from vfdirect.core.vhost.messages import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendRequest,
    MemoryRegionDesc,
    MemoryTable,
    Payload,
    ProtocolFeature,
    VhostUserMessage,
    VhostUserProtocolError,
    VringAddr,
    VringFile,
    VringState,
)
from vfdirect.core.virtio.errors import GuestMemoryError
from vfdirect.core.virtio.features import has
from vfdirect.core.virtio.layout import VirtqueueConfig
from vfdirect.core.virtio.memory import RegionMemory

__all__ = [
    "FrontendVring",
    "Negotiated",
    "Procedure",
    "expects_reply",
    "negotiate",
    "start_device",
    "stop_vrings",
]

_F = FrontendRequest

#: Requests whose reply exists regardless of NEED_REPLY.
_ALWAYS_REPLIED = frozenset({_F.GET_FEATURES, _F.GET_PROTOCOL_FEATURES, _F.GET_QUEUE_NUM,
                             _F.GET_VRING_BASE, _F.GET_CONFIG, _F.GET_INFLIGHT_FD,
                             _F.GET_MAX_MEM_SLOTS, _F.GET_STATUS, _F.IOTLB_MSG,
                             _F.POSTCOPY_ADVISE, _F.POSTCOPY_END, _F.GET_SHARED_OBJECT,
                             _F.SET_DEVICE_STATE_FD, _F.CHECK_DEVICE_STATE})

Procedure = Generator[VhostUserMessage, VhostUserMessage | None, object]


def expects_reply(message: VhostUserMessage, protocol_features: int) -> bool:
    """Whether the back end answers ``message`` (vhost-user.rst "Communication")."""
    if message.need_reply or int(message.request) in _ALWAYS_REPLIED:
        return True
    return int(message.request) == _F.SET_LOG_BASE and has(protocol_features,
                                                          ProtocolFeature.LOG_SHMFD)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The outcome of :func:`negotiate`."""

    features: int
    protocol_features: int
    num_queues: int | None


@dataclass(frozen=True, slots=True)
class FrontendVring:
    """One vring to start: its guest-physical configuration, its eventfds (None: poll),
    and the available index the back end resumes from."""

    index: int
    config: VirtqueueConfig
    kick_fd: int | None
    call_fd: int | None
    base: int = 0


def _expect(reply: VhostUserMessage | None, request: int, kind: type[Payload]) -> Payload:
    if reply is None:
        raise VhostUserProtocolError(f"no reply to {_F(request).name}")
    if int(reply.request) != int(request) or not reply.is_reply:
        raise VhostUserProtocolError(f"reply to {getattr(reply.request, 'name', reply.request)}"
                                     f" while waiting for {_F(request).name}")
    if not isinstance(reply.payload, kind):
        raise VhostUserProtocolError(f"{_F(request).name} reply carries "
                                     f"{type(reply.payload).__name__}")
    return reply.payload


def _acked(protocol_features: int, request: int, payload: Payload | None = None,
           fds: tuple[int, ...] = ()) -> Generator[VhostUserMessage,
                                                   VhostUserMessage | None, None]:
    """Send a request without its own reply; wait for the ack when REPLY_ACK is on."""
    need = has(protocol_features, ProtocolFeature.REPLY_ACK)
    message = VhostUserMessage.request_of(request, payload, need_reply=need, fds=fds)
    reply = yield message
    if need:
        ack = _expect(reply, request, U64)
        assert isinstance(ack, U64)
        if ack.value != 0:
            raise VhostUserProtocolError(f"back end refused {_F(request).name} "
                                         f"(status {ack.value})")


def negotiate(wanted_features: int, wanted_protocol_features: int) -> Generator[
        VhostUserMessage, VhostUserMessage | None, Negotiated]:
    """Feature and protocol-feature negotiation, then SET_OWNER. The virtio features
    finally acknowledged are ``wanted & offered`` (sent later by :func:`start_device`)."""
    reply = yield VhostUserMessage.request_of(_F.GET_FEATURES)
    offered = _expect(reply, _F.GET_FEATURES, U64)
    assert isinstance(offered, U64)
    features = wanted_features & offered.value
    protocol = 0
    queues: int | None = None
    if has(offered.value, VHOST_USER_F_PROTOCOL_FEATURES):
        features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        reply = yield VhostUserMessage.request_of(_F.GET_PROTOCOL_FEATURES)
        offered_protocol = _expect(reply, _F.GET_PROTOCOL_FEATURES, U64)
        assert isinstance(offered_protocol, U64)
        protocol = wanted_protocol_features & offered_protocol.value
        # SET_PROTOCOL_FEATURES is sent before REPLY_ACK is in force (it is what turns it
        # on), so it is never acknowledged.
        yield VhostUserMessage.request_of(_F.SET_PROTOCOL_FEATURES, U64(protocol))
        if has(protocol, ProtocolFeature.MQ):
            reply = yield VhostUserMessage.request_of(_F.GET_QUEUE_NUM)
            count = _expect(reply, _F.GET_QUEUE_NUM, U64)
            assert isinstance(count, U64)
            queues = count.value
    yield from _acked(protocol, _F.SET_OWNER)
    return Negotiated(features, protocol, queues)


def start_device(negotiated: Negotiated, memory: RegionMemory,
                 table: Sequence[tuple[MemoryRegionDesc, int]],
                 vrings: Sequence[FrontendVring]) -> Generator[
                     VhostUserMessage, VhostUserMessage | None, None]:
    """SET_FEATURES, SET_MEM_TABLE (``table``: each region with its fd) and the vrings.
    Ring addresses are sent as user addresses, translated through ``memory``."""
    protocol = negotiated.protocol_features
    yield from _acked(protocol, _F.SET_FEATURES, U64(negotiated.features))
    regions = tuple(region for region, _ in table)
    yield from _acked(protocol, _F.SET_MEM_TABLE, MemoryTable(regions),
                      tuple(fd for _, fd in table))
    for vring in vrings:
        config = vring.config
        try:
            desc = memory.gpa_to_user(config.desc_addr)
            used = memory.gpa_to_user(config.used_addr)
            avail = memory.gpa_to_user(config.avail_addr)
        except GuestMemoryError as exc:
            raise VhostUserProtocolError(f"vring {vring.index}: {exc}") from exc
        yield from _acked(protocol, _F.SET_VRING_NUM, VringState(vring.index, config.size))
        yield from _acked(protocol, _F.SET_VRING_BASE, VringState(vring.index, vring.base))
        yield from _acked(protocol, _F.SET_VRING_ADDR,
                          VringAddr(vring.index, 0, desc, used, avail, 0))
        for request, fd in ((_F.SET_VRING_KICK, vring.kick_fd),
                            (_F.SET_VRING_CALL, vring.call_fd)):
            yield from _acked(protocol, request, VringFile(vring.index, fd is None),
                              () if fd is None else (fd,))
        if has(negotiated.features, VHOST_USER_F_PROTOCOL_FEATURES):
            yield from _acked(protocol, _F.SET_VRING_ENABLE, VringState(vring.index, 1))


def stop_vrings(indices: Sequence[int]) -> Generator[
        VhostUserMessage, VhostUserMessage | None, dict[int, int]]:
    """GET_VRING_BASE for each vring: the back end stops it and returns the index it will
    resume from. Returns ``{vring: base}``."""
    bases: dict[int, int] = {}
    for index in indices:
        reply = yield VhostUserMessage.request_of(_F.GET_VRING_BASE, VringState(index, 0))
        state = _expect(reply, _F.GET_VRING_BASE, VringState)
        assert isinstance(state, VringState)
        if state.index != index:
            raise VhostUserProtocolError(f"GET_VRING_BASE reply for vring {state.index}, "
                                         f"asked {index}")
        bases[index] = state.num
    return bases
