"""What the VM's front end asks for and decides (sans-IO): GET_CONFIG and its refusal,
the required features, the request queue count; and the whole front-end conversation
against the core's back-end session, in memory."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vfdirect.core.guest.frontend import (
    WANTED_FEATURES,
    WANTED_PROTOCOL_FEATURES,
    FrontendError,
    check_negotiated,
    read_config,
    request_queue_count,
)
from vfdirect.core.vhost.frontend import FrontendVring, Negotiated, negotiate, start_device
from vfdirect.core.vhost.messages import (
    ConfigSpace,
    Empty,
    FrontendRequest,
    MemoryRegionDesc,
    ProtocolFeature,
    VhostUserMessage,
    VhostUserProtocolError,
)
from vfdirect.core.vhost.session import (
    BackendConfig,
    BackendSession,
    SendReply,
    StartVring,
)
from vfdirect.core.virtio import RegionMemory
from vfdirect.core.virtio.features import VirtioFeature, bit, has, mask
from vfdirect.core.virtio.scsi import VirtioScsiConfig

GET_CONFIG = FrontendRequest.GET_CONFIG
CONFIG = bit(ProtocolFeature.CONFIG)
REQUIRED = mask((VirtioFeature.VERSION_1, VirtioFeature.RING_EVENT_IDX))


def run(gen, replies):  # type: ignore[no-untyped-def]
    sent = [next(gen)]
    try:
        for reply in replies:
            sent.append(gen.send(reply))
    except StopIteration as stop:
        return sent, stop.value
    raise AssertionError("procedure did not finish")


def test_read_config_decodes_the_space() -> None:
    cfg = VirtioScsiConfig(num_queues=3, max_target=7, sense_size=64)
    sent, got = run(read_config(Negotiated(REQUIRED, CONFIG, None)),
                    [VhostUserMessage.reply_to(GET_CONFIG, ConfigSpace(0, cfg.encode()))])
    assert got == cfg
    assert sent[0].request == GET_CONFIG and len(sent[0].payload.encode()) == 12 + 36


def test_read_config_refused_or_not_negotiated_is_none() -> None:
    _, got = run(read_config(Negotiated(REQUIRED, CONFIG, None)),
                 [VhostUserMessage.reply_to(GET_CONFIG, Empty())])
    assert got is None
    gen = read_config(Negotiated(REQUIRED, 0, None))
    with pytest.raises(StopIteration) as info:
        next(gen)
    assert info.value.value is None


def test_read_config_bad_replies() -> None:
    for reply in (None, VhostUserMessage.reply_to(FrontendRequest.GET_FEATURES),
                  VhostUserMessage.reply_to(GET_CONFIG, ConfigSpace(0, bytes(8)))):
        gen = read_config(Negotiated(REQUIRED, CONFIG, None))
        next(gen)
        with pytest.raises(VhostUserProtocolError):
            gen.send(reply)


def test_required_features_and_queue_count() -> None:
    check_negotiated(Negotiated(WANTED_FEATURES, 0, None))
    with pytest.raises(FrontendError, match="RING_EVENT_IDX"):
        check_negotiated(Negotiated(bit(VirtioFeature.VERSION_1), 0, None))
    n = Negotiated(REQUIRED, 0, 4)
    assert request_queue_count(4, VirtioScsiConfig(num_queues=8), n) == 2
    assert request_queue_count(2, None, Negotiated(REQUIRED, 0, None)) == 2
    assert request_queue_count(4, VirtioScsiConfig(num_queues=1), n) == 1
    with pytest.raises(FrontendError):
        request_queue_count(2, None, Negotiated(REQUIRED, 0, 2))


def test_the_conversation_with_a_backend_session() -> None:
    """negotiate, GET_CONFIG, start_device against BackendSession, message by message."""
    cfg = VirtioScsiConfig(num_queues=2)
    session = BackendSession(BackendConfig(
        device_features=WANTED_FEATURES, num_queues=4, config_space=cfg.encode()))

    def answer(message: VhostUserMessage) -> VhostUserMessage | None:
        replies = [a.message for a in session.handle(message) if isinstance(a, SendReply)]
        return replies[0] if replies else None

    def drive(gen):  # type: ignore[no-untyped-def]
        reply = None
        try:
            while True:
                reply = answer(gen.send(reply))
        except StopIteration as stop:
            return stop.value

    negotiated = drive(negotiate(WANTED_FEATURES, WANTED_PROTOCOL_FEATURES))
    assert has(negotiated.protocol_features, ProtocolFeature.REPLY_ACK)
    assert negotiated.num_queues == 4
    assert drive(read_config(negotiated)) == cfg
    memory = RegionMemory.from_table([(0, 0x7F0000000000, bytearray(1 << 16))])
    from vfdirect.core.virtio.driver import DriverLayout  # noqa: PLC0415

    layouts = [DriverLayout.plan(0x1000 * (i + 1), 8) for i in range(4)]
    vrings = [FrontendVring(i, lay.queue_config(), None, None, base=5 * i)
              for i, lay in enumerate(layouts)]
    started = []
    gen = start_device(negotiated, memory, [(MemoryRegionDesc(0, 1 << 16, 0x7F0000000000, 0),
                                             3)], vrings)
    reply = None
    try:
        while True:
            message = gen.send(reply)
            actions = session.handle(message)
            started += [a.setup for a in actions if isinstance(a, StartVring)]
            replies = [a.message for a in actions if isinstance(a, SendReply)]
            reply = replies[0] if replies else None
    except StopIteration:
        pass
    assert [(s.index, s.base, s.num) for s in started] == [(i, 5 * i, 8) for i in range(4)]
    # user addresses translate back to the guest addresses (indirect: as negotiated)
    assert started[2].queue_config(memory) == replace(layouts[2].queue_config(),
                                                      indirect=True)
