"""The back-end session: QEMU's sequence, the refusal policy, deferred GET_VRING_BASE,
reset, and fd accounting (every fd released exactly once) under random input."""

from __future__ import annotations

from collections.abc import Generator
from itertools import count
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from vhost_strategies import messages

from vfdirect.core.vhost import frontend
from vfdirect.core.vhost.messages import (
    U64,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    Channel,
    ConfigSpace,
    Empty,
    FrontendRequest,
    InflightDescription,
    IotlbMessage,
    LogDescription,
    MemoryRegionDesc,
    MemoryTable,
    ProtocolFeature,
    RawPayload,
    VhostUserMessage,
    VringAddr,
    VringFile,
    VringState,
)
from vfdirect.core.vhost.parser import MessageParser
from vfdirect.core.vhost.session import (
    DEFAULT_PROTOCOL_FEATURES,
    Action,
    BackendConfig,
    BackendSession,
    CloseConnection,
    CloseFds,
    EnableVring,
    FeaturesChanged,
    MapMemory,
    Refused,
    ResetDevice,
    SendReply,
    SessionState,
    SetLogBase,
    SetVringCall,
    StartVring,
    StopVring,
    UpdateVringAddr,
)
from vfdirect.core.virtio import RegionMemory, VirtqueueError, legacy_layout
from vfdirect.core.virtio.features import VirtioFeature, mask

F = FrontendRequest
DEVICE_FEATURES = mask([VirtioFeature.VERSION_1, VirtioFeature.RING_EVENT_IDX,
                        VirtioFeature.RING_INDIRECT_DESC, 1])  # bit 1: VIRTIO_SCSI_F_HOTPLUG
CONFIG_SPACE = bytes(range(36))
USER_BASE = 0x7F00_0000_0000


def new_session(**kwargs: Any) -> BackendSession:
    params: dict[str, Any] = {"device_features": DEVICE_FEATURES, "num_queues": 3,
                              "config_space": CONFIG_SPACE}
    params.update(kwargs)
    return BackendSession(BackendConfig(**params))


class Link:
    """Front end -> parser -> session, collecting actions; replies checked by a
    front-end parser."""

    def __init__(self, session: BackendSession) -> None:
        self.session = session
        self.requests = MessageParser(Channel.FRONTEND_REQUESTS)
        self.replies = MessageParser(Channel.FRONTEND_REPLIES)
        self.actions: list[Action] = []
        self.fds = count(100)

    def send(self, request: int, payload: Any = None, *, need_reply: bool = False,
             nfds: int = 0) -> list[Action]:
        fds = tuple(next(self.fds) for _ in range(nfds))
        msg = VhostUserMessage.request_of(request, payload, need_reply=need_reply, fds=fds)
        return self.deliver(msg)

    def deliver(self, msg: VhostUserMessage) -> list[Action]:
        (parsed,) = self.requests.feed(msg.encode(), msg.fds)
        actions = self.session.handle(parsed)
        for action in actions:
            if isinstance(action, SendReply):
                (again,) = self.replies.feed(action.message.encode(), action.message.fds)
                assert again == action.message
        self.actions += actions
        return actions

    def run(self, procedure: Generator[VhostUserMessage, VhostUserMessage | None, Any],
            protocol: int = 0) -> Any:
        try:
            msg = next(procedure)
            while True:
                actions = self.deliver(msg)
                replies = [a.message for a in actions if isinstance(a, SendReply)]
                stops = [a for a in actions if isinstance(a, StopVring)]
                for stop in stops:  # the device stops at once with last_avail_idx 42
                    stopped = self.session.vring_stopped(stop.index, 42)
                    self.actions += stopped
                    replies += [a.message for a in stopped if isinstance(a, SendReply)]
                if frontend.expects_reply(msg, protocol):
                    assert len(replies) == 1, actions
                    msg = procedure.send(replies[0])
                else:
                    assert replies == [], actions
                    msg = procedure.send(None)
        except StopIteration as done:
            return done.value


def replies(actions: list[Action]) -> list[VhostUserMessage]:
    return [a.message for a in actions if isinstance(a, SendReply)]


def only(actions: list[Action], kind: type) -> Any:
    found = [a for a in actions if isinstance(a, kind)]
    assert len(found) == 1, actions
    return found[0]


def configured_link(*, protocol: int = DEFAULT_PROTOCOL_FEATURES,
                    start: bool = True) -> tuple[Link, frontend.Negotiated]:
    link = Link(new_session())
    negotiated = link.run(frontend.negotiate(DEVICE_FEATURES, protocol))
    if start:
        memory = RegionMemory.from_table([(0, USER_BASE, bytearray(0x10000))])
        table = [(MemoryRegionDesc(0, 0x10000, USER_BASE, 0), 7)]
        vrings = [frontend.FrontendVring(i, legacy_layout(0x1000 * (i + 1), 64, align=64),
                                         20 + i, 30 + i) for i in range(3)]
        link.run(frontend.start_device(negotiated, memory, table, vrings),
                 negotiated.protocol_features)
    return link, negotiated


# -- QEMU's sequence -------------------------------------------------------------------------


def test_qemu_like_start_and_stop() -> None:
    link, negotiated = configured_link()
    session = link.session
    assert negotiated.num_queues == 3
    assert negotiated.protocol_features == DEFAULT_PROTOCOL_FEATURES
    assert session.features == DEVICE_FEATURES | 1 << VHOST_USER_F_PROTOCOL_FEATURES
    assert session.owner
    mapped = only(link.actions, MapMemory)
    assert mapped.fds == (7,) and mapped.regions[0].userspace_addr == USER_BASE
    starts = [a for a in link.actions if isinstance(a, StartVring)]
    assert [s.setup.index for s in starts] == [0, 1, 2]
    setup = starts[2].setup
    assert setup.num == 64 and setup.enabled is False  # PROTOCOL_FEATURES: start disabled
    assert setup.kick_fd == 22 and setup.call_fd is None  # call comes after the kick
    memory = RegionMemory.from_table([(0, USER_BASE, bytearray(0x10000))])
    assert setup.queue_config(memory) == legacy_layout(0x3000, 64, align=64,
                                                       indirect=True)
    assert [a for a in link.actions if isinstance(a, SetVringCall)][2].fd == 32
    assert [a for a in link.actions if isinstance(a, EnableVring)][2] == EnableVring(2, True)
    assert session.vring(2).started and session.vring(2).enabled
    # GET_VRING_BASE stops a ring; the reply waits for the device.
    bases = link.run(frontend.stop_vrings([0, 2]), negotiated.protocol_features)
    assert bases == {0: 42, 2: 42}
    assert not session.vring(2).started
    closed = [fd for a in link.actions if isinstance(a, CloseFds) for fd in a.fds]
    assert sorted(closed) == [20, 22, 30, 32]  # kick and call of the stopped rings


def test_restart_after_stop_resumes_from_the_base() -> None:
    link, negotiated = configured_link()
    link.run(frontend.stop_vrings([2]), negotiated.protocol_features)
    memory = RegionMemory.from_table([(0, USER_BASE, bytearray(0x10000))])
    vring = frontend.FrontendVring(2, legacy_layout(0x3000, 64, align=64), 50, 51, base=42)
    link.actions.clear()
    table = [(MemoryRegionDesc(0, 0x10000, USER_BASE, 0), 8)]
    link.run(frontend.start_device(negotiated, memory, table, [vring]),
             negotiated.protocol_features)
    start = only(link.actions, StartVring)
    assert start.setup.base == 42 and start.setup.kick_fd == 50
    assert start.setup.enabled is True  # still enabled from before


def test_without_protocol_features_rings_start_enabled() -> None:
    link = Link(new_session())
    negotiated = frontend.Negotiated(DEVICE_FEATURES, 0, None)  # a legacy front end
    memory = RegionMemory.from_table([(0, USER_BASE, bytearray(0x10000))])
    table = [(MemoryRegionDesc(0, 0x10000, USER_BASE, 0), 7)]
    vrings = [frontend.FrontendVring(0, legacy_layout(0x1000, 64, align=64), None, None)]
    link.run(frontend.start_device(negotiated, memory, table, vrings))
    start = only(link.actions, StartVring)
    assert start.setup.enabled is True and start.setup.kick_fd is None  # polling


def test_get_features_offers_log_all_only_with_log_shmfd() -> None:
    link = Link(new_session())
    (reply,) = replies(link.send(F.GET_FEATURES))
    assert isinstance(reply.payload, U64)
    assert reply.payload.value == DEVICE_FEATURES | 1 << 30 | 1 << VHOST_F_LOG_ALL
    link = Link(new_session(protocol_features=1 << ProtocolFeature.REPLY_ACK))
    (reply,) = replies(link.send(F.GET_FEATURES))
    assert isinstance(reply.payload, U64)
    assert reply.payload.value == DEVICE_FEATURES | 1 << 30


def test_get_config_serves_the_config_space() -> None:
    link, _ = configured_link(start=False)
    (reply,) = replies(link.send(F.GET_CONFIG, ConfigSpace(4, bytes(8))))
    assert reply.payload == ConfigSpace(4, CONFIG_SPACE[4:12])
    (reply,) = replies(link.send(F.GET_CONFIG, ConfigSpace(30, bytes(8))))
    assert reply.payload == Empty()  # beyond the space: the zero-length error form


def test_migration_messages_while_running() -> None:
    link, negotiated = configured_link()
    actions = link.send(F.SET_LOG_BASE, LogDescription(0x1000, 0), need_reply=True, nfds=1)
    log = only(actions, SetLogBase)
    assert log.log == LogDescription(0x1000, 0)
    assert [r.payload for r in replies(actions)] == [U64(0)]  # one reply, not two
    actions = link.send(F.SET_FEATURES, U64(negotiated.features | 1 << VHOST_F_LOG_ALL),
                        need_reply=True)
    assert only(actions, FeaturesChanged).features & 1 << VHOST_F_LOG_ALL
    addr = VringAddr(1, VringAddr.F_LOG, USER_BASE + 0x2000, USER_BASE + 0x2488,
                     USER_BASE + 0x2400, 0x2488)
    actions = link.send(F.SET_VRING_ADDR, addr, need_reply=True)
    assert only(actions, UpdateVringAddr).addr.log_enabled
    again = link.send(F.SET_LOG_BASE, LogDescription(0x2000, 0), nfds=1)
    assert only(again, CloseFds).fds == (log.fd,)  # the old log is released


def test_reset_device() -> None:
    link, _ = configured_link()
    actions = link.send(F.RESET_DEVICE, need_reply=True)
    only(actions, ResetDevice)
    assert sorted(only(actions, CloseFds).fds) == [20, 21, 22, 30, 31, 32]
    assert not any(link.session.vring(i).started for i in range(3))
    assert link.session.features == 0
    assert replies(actions)[-1].payload == U64(0)


# -- the refusal policy ----------------------------------------------------------------------


def test_unsupported_fire_and_forget_is_ignored() -> None:
    link, _ = configured_link(start=False)
    actions = link.send(F.SEND_RARP, U64(0))
    assert [type(a) for a in actions] == [Refused]
    assert link.session.state is SessionState.OPEN


def test_unsupported_with_need_reply_gets_a_non_zero_ack() -> None:
    link, _ = configured_link(start=False)
    actions = link.send(F.SET_VRING_ENDIAN, VringState(0, 0), need_reply=True)
    assert [r.payload for r in replies(actions)] == [U64(1)]
    assert link.session.state is SessionState.OPEN


@pytest.mark.parametrize(("request_", "payload", "nfds"), [
    (F.SET_VRING_NUM, VringState(0, 3), 0),  # not a power of 2
    (F.SET_VRING_NUM, VringState(0, 2048), 0),  # beyond max_queue_size
    (F.SET_VRING_NUM, VringState(3, 64), 0),  # no vring 3
    (F.SET_VRING_BASE, VringState(0, 0x10000), 0),
    (F.SET_VRING_ADDR, VringAddr(0, 2, 0, 0, 0), 0),  # unknown flag
    (F.SET_VRING_KICK, VringFile(0), 1),  # before size and addresses
    (F.SET_VRING_ENABLE, VringState(0, 2), 0),
    (F.SET_FEATURES, U64(1 << 40), 0),  # never offered
    (F.SET_PROTOCOL_FEATURES, U64(1 << ProtocolFeature.INFLIGHT_SHMFD), 0),
    (F.SET_MEM_TABLE, MemoryTable((MemoryRegionDesc(0, 0x1000, 0, 0),
                                   MemoryRegionDesc(0x800, 0x1000, 0x5000, 0))), 2),
    (F.SET_MEM_TABLE, MemoryTable((MemoryRegionDesc(0, 0, 0, 0),)), 1),
    (F.RESET_DEVICE, None, 0),  # with RESET_DEVICE not negotiated (see below)
])
@pytest.mark.parametrize("need_reply", [False, True])
def test_invalid_supported_requests(request_: int, payload: Any, nfds: int,
                                    need_reply: bool) -> None:
    link, _ = configured_link(start=False, protocol=1 << ProtocolFeature.REPLY_ACK)
    actions = link.send(request_, payload, need_reply=need_reply, nfds=nfds)
    assert any(isinstance(a, Refused) for a in actions)
    if nfds:
        assert len(only(actions, CloseFds).fds) == nfds
    if need_reply:  # a clean refusal, the connection stays
        assert [r.payload for r in replies(actions)] == [U64(1)]
        assert link.session.state is SessionState.OPEN
    else:  # the front end would believe it worked: close this connection
        only(actions, CloseConnection)
        assert link.session.state is SessionState.CLOSED


@pytest.mark.parametrize(("request_", "payload", "expect"), [
    (F.IOTLB_MSG, IotlbMessage(0, 0, 0, 0, 2), U64(1)),
    (F.SET_LOG_BASE, LogDescription(0, 0), U64(1)),  # LOG_SHMFD not negotiated
    (F.GET_CONFIG, ConfigSpace(0, bytes(4)), Empty()),  # CONFIG not negotiated
    (F.CHECK_DEVICE_STATE, None, U64(1)),
])
def test_refusals_with_a_failure_reply(request_: int, payload: Any, expect: Any) -> None:
    link, _ = configured_link(start=False, protocol=0)
    nfds = 1 if request_ == F.SET_LOG_BASE else 0
    actions = link.send(request_, payload, nfds=nfds)
    assert [r.payload for r in replies(actions)] == [expect]
    assert link.session.state is SessionState.OPEN


@pytest.mark.parametrize(("request_", "payload"), [
    (F.GET_INFLIGHT_FD, InflightDescription(0, 0, 3, 64)),
    (F.GET_STATUS, None),
    (F.GET_MAX_MEM_SLOTS, None),
    (F.GET_VRING_BASE, VringState(9, 0)),
])
def test_refused_requests_without_a_failure_form_close(request_: int, payload: Any) -> None:
    link, _ = configured_link(start=False)
    actions = link.send(request_, payload, need_reply=True)
    only(actions, CloseConnection)
    assert replies(actions) == []


def test_unknown_request_with_fds() -> None:
    link, _ = configured_link(start=False)
    actions = link.deliver(VhostUserMessage.request_of(99, RawPayload(b"xyz"), fds=(5, 6)))
    assert only(actions, CloseFds).fds == (5, 6)
    assert only(actions, Refused).request == 99
    assert link.session.state is SessionState.OPEN


@pytest.mark.parametrize("msg", [
    VhostUserMessage.request_of(F.SET_VRING_KICK, VringFile(0)),  # fd missing
    VhostUserMessage.request_of(F.SET_LOG_BASE, LogDescription(0, 0)),  # fd missing
    VhostUserMessage.request_of(F.SET_FEATURES, VringState(0, 0)),  # wrong payload type
    VhostUserMessage.request_of(F.GET_FEATURES, fds=(4,)),
])
def test_hand_built_malformed_messages_close(msg: VhostUserMessage) -> None:
    session = new_session()
    actions = session.handle(msg)
    only(actions, CloseConnection)
    assert [fd for a in actions if isinstance(a, CloseFds) for fd in a.fds] == list(msg.fds)


def test_request_while_awaiting_vring_base_closes() -> None:
    link, _ = configured_link()
    actions = link.send(F.GET_VRING_BASE, VringState(1, 0))
    assert only(actions, StopVring).index == 1
    assert link.session.awaiting_vring_base == 1
    with pytest.raises(ValueError):
        link.session.vring_stopped(0, 1)
    actions = link.send(F.GET_FEATURES)
    only(actions, CloseConnection)
    assert link.session.state is SessionState.CLOSED
    assert link.send(F.GET_FEATURES) == []  # closed: ignored


def test_disconnect_releases_every_held_fd() -> None:
    link, _ = configured_link()
    link.send(F.SET_LOG_BASE, LogDescription(0x1000, 0), nfds=1)
    link.send(F.SET_VRING_ERR, VringFile(1), nfds=1)
    released = only(link.session.disconnected(), CloseFds).fds
    assert sorted(released) == sorted([20, 21, 22, 30, 31, 32, 100, 101])


def test_vring_setup_translation_errors_are_virtqueue_errors() -> None:
    link, _ = configured_link()
    setup = next(a for a in link.actions if isinstance(a, StartVring)).setup
    elsewhere = RegionMemory.from_table([(0, USER_BASE + (1 << 30), bytearray(0x10000))])
    with pytest.raises(VirtqueueError):
        setup.queue_config(elsewhere)


# -- fd accounting under random input --------------------------------------------------------

SETUP_REQUESTS = [F.SET_VRING_NUM, F.SET_VRING_ADDR, F.SET_VRING_BASE, F.SET_VRING_KICK,
                  F.SET_VRING_CALL, F.SET_VRING_ERR, F.SET_VRING_ENABLE, F.GET_VRING_BASE,
                  F.SET_LOG_BASE, F.SET_LOG_FD, F.SET_MEM_TABLE, F.RESET_DEVICE,
                  F.SET_FEATURES, F.SET_PROTOCOL_FEATURES, F.GET_CONFIG, F.RESET_OWNER]
small_index = st.integers(0, 3)


def _ring_setup(index: int, nofd: bool) -> list[VhostUserMessage]:
    return [VhostUserMessage.request_of(F.SET_VRING_NUM, VringState(index, 8)),
            VhostUserMessage.request_of(F.SET_VRING_ADDR, VringAddr(
                index, 0, USER_BASE, USER_BASE + 0x800, USER_BASE + 0x400)),
            VhostUserMessage.request_of(F.SET_VRING_CALL, VringFile(index), fds=(-1,)),
            VhostUserMessage.request_of(F.SET_VRING_KICK, VringFile(index, nofd),
                                        fds=() if nofd else (-1,))]


ring_setup = st.builds(_ring_setup, st.integers(0, 2), st.booleans())
single = st.one_of(
    st.builds(lambda i, n: VhostUserMessage.request_of(F.SET_VRING_NUM, VringState(i, n)),
              small_index, st.sampled_from([8, 64, 3])),
    st.builds(lambda i: VhostUserMessage.request_of(
        F.SET_VRING_ADDR, VringAddr(i, 0, USER_BASE, USER_BASE + 0x800, USER_BASE + 0x400)),
        small_index),
    st.builds(lambda i, nofd: VhostUserMessage.request_of(
        F.SET_VRING_KICK, VringFile(i, nofd), fds=() if nofd else (-1,)),
        small_index, st.booleans()),
    st.builds(lambda i: VhostUserMessage.request_of(F.GET_VRING_BASE, VringState(i, 0)),
              small_index),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(ring_setup, ring_setup, single.map(lambda m: [m]),
                          messages(Channel.FRONTEND_REQUESTS).map(lambda m: [m]),
                          st.sampled_from(SETUP_REQUESTS).flatmap(
                              lambda r: messages(Channel.FRONTEND_REQUESTS, r)).map(
                                  lambda m: [m])),
                max_size=15).flatmap(lambda groups: ring_setup.map(
                    lambda first: first + [m for g in groups for m in g])),
       st.sampled_from([0, DEFAULT_PROTOCOL_FEATURES]), st.integers(0, 0xFFFF))
def test_random_sessions_release_each_fd_once(script: list[VhostUserMessage], protocol: int,
                                              base: int) -> None:
    session = new_session()
    if protocol:
        session.handle(VhostUserMessage.request_of(F.SET_PROTOCOL_FEATURES, U64(protocol)))
    numbers = count(1)
    fed: list[int] = []
    released: list[int] = []
    reply_parser = MessageParser(Channel.FRONTEND_REPLIES)
    started = False

    def account(actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, CloseFds | MapMemory):
                released.extend(action.fds)
            elif isinstance(action, SendReply):
                assert reply_parser.feed(action.message.encode()) == [action.message]

    for template in script:
        fds = tuple(next(numbers) for _ in template.fds)
        fed.extend(fds)
        msg = VhostUserMessage(template.request, template.payload, template.flags, fds)
        actions = session.handle(msg)
        started = started or any(isinstance(a, StartVring) for a in actions)
        account(actions)
        for stop in [a for a in actions if isinstance(a, StopVring)]:
            account(session.vring_stopped(stop.index, base))
    account(session.disconnected())
    assert sorted(released) == sorted(fed)
    event(f"state before disconnect reached: {len(fed)} fds, "
          f"{'started' if started else 'no ring started'}")
