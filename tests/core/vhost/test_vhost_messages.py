"""vhost-user codec: golden vectors, round trips of every message type on every channel,
and the decoder invariant (a payload or VhostUserProtocolError, nothing else)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vhost_strategies import PAYLOADS, codes, messages

from vfdirect.core.vhost.messages import (
    HEADER_SIZE,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    Channel,
    ConfigSpace,
    FrontendRequest,
    MemoryRegionDesc,
    MemoryTable,
    ProtocolFeature,
    VhostUserMessage,
    VhostUserProtocolError,
    VringAddr,
    VringFile,
    VringState,
    decode_body,
    decode_header,
    payload_rule,
)
from vfdirect.core.vhost.parser import MessageParser

# -- golden vectors ---------------------------------------------------------------------------


def test_golden_get_features_request_and_reply() -> None:
    request = VhostUserMessage.request_of(FrontendRequest.GET_FEATURES)
    assert request.encode() == bytes.fromhex(
        "01000000"  # request 1, VHOST_USER_GET_FEATURES
        "01000000"  # flags: version 1
        "00000000")  # size 0: no payload
    # VERSION_1 (bit 32) | PROTOCOL_FEATURES (bit 30) | EVENT_IDX (29) | INDIRECT (28)
    features = 1 << 32 | 1 << VHOST_USER_F_PROTOCOL_FEATURES | 1 << 29 | 1 << 28
    reply = VhostUserMessage.reply_to(FrontendRequest.GET_FEATURES, U64(features))
    assert reply.encode() == bytes.fromhex(
        "01000000"  # request 1 (the reply repeats the request code)
        "05000000"  # flags: version 1 | REPLY (bit 2)
        "08000000"  # size 8
        "00000070 01000000")  # u64 0x1_7000_0000, little-endian


def test_golden_set_vring_addr() -> None:
    msg = VhostUserMessage.request_of(
        FrontendRequest.SET_VRING_ADDR,
        VringAddr(2, 0, 0x7F0000001000, 0x7F0000001488, 0x7F0000001400, 0),
        need_reply=True)
    assert msg.encode() == bytes.fromhex(
        "09000000"  # request 9, SET_VRING_ADDR
        "09000000"  # flags: version 1 | NEED_REPLY (bit 3)
        "28000000"  # size 40 = struct vhost_vring_addr
        "02000000"  # index 2 (the first request queue of virtio-scsi)
        "00000000"  # flags: no VHOST_VRING_F_LOG
        "0010000000 7f0000"  # descriptor table user address
        "8814000000 7f0000"  # used ring user address
        "0014000000 7f0000"  # available ring user address
        "0000000000000000")  # log_guest_addr


def test_golden_set_mem_table_one_region() -> None:
    msg = VhostUserMessage.request_of(
        FrontendRequest.SET_MEM_TABLE,
        MemoryTable((MemoryRegionDesc(0x0, 0x4000_0000, 0x7F12_0000_0000, 0),)), fds=(7,))
    assert msg.encode() == bytes.fromhex(
        "05000000 01000000 28000000"  # SET_MEM_TABLE, version 1, size 8 + 32
        "01000000 00000000"  # nregions 1, padding
        "0000000000000000"  # guest_phys_addr 0
        "0000004000000000"  # memory_size 1 GiB
        "00000000127f0000"  # userspace_addr 0x7f12_0000_0000
        "0000000000000000")  # mmap_offset (the fd rides in SCM_RIGHTS)
    parsed = MessageParser(Channel.FRONTEND_REQUESTS).feed(msg.encode(), [7])
    assert parsed == [msg]


def test_golden_set_vring_kick_without_fd() -> None:
    msg = VhostUserMessage.request_of(FrontendRequest.SET_VRING_KICK, VringFile(1, True))
    assert msg.encode()[HEADER_SIZE:] == bytes.fromhex("0101000000000000")  # 1 | NOFD 0x100


def test_wire_numbers() -> None:
    assert FrontendRequest.GET_CONFIG == 24 and FrontendRequest.RESET_DEVICE == 34
    assert FrontendRequest.GET_INFLIGHT_FD == 31 and FrontendRequest.SET_INFLIGHT_FD == 32
    assert FrontendRequest.CHECK_DEVICE_STATE == 43
    assert ProtocolFeature.CONFIG == 9 and ProtocolFeature.INFLIGHT_SHMFD == 12
    assert ProtocolFeature.RESET_DEVICE == 13 and ProtocolFeature.DEVICE_STATE == 19


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", list(Channel))
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_every_message_type_round_trips(channel: Channel, data: st.DataObject) -> None:
    request = data.draw(st.sampled_from(codes(channel)))
    msg = data.draw(messages(channel, request))
    raw = msg.encode()
    assert len(raw) == HEADER_SIZE + len(msg.payload.encode())
    request_, flags, size = decode_header(raw[:HEADER_SIZE], channel)
    assert (request_, flags, size) == (int(msg.request), msg.flags, len(raw) - HEADER_SIZE)
    assert decode_body(channel, request_, flags, raw[HEADER_SIZE:], msg.fds) == msg


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Channel)), st.integers(0, 60), st.binary(max_size=300),
       st.integers(0, 3))
def test_body_decoders_raise_only_protocol_errors(channel: Channel, request: int,
                                                  body: bytes, nfds: int) -> None:
    fds = tuple(range(nfds))
    flags = 1 | (4 if channel.is_reply else 0)
    try:
        msg = decode_body(channel, request, flags, body, fds)
    except VhostUserProtocolError as exc:
        error: VhostUserProtocolError | None = exc
    else:
        error = None
    if error is not None:
        assert error.fds == fds  # the caller gets every fd back to close
        return
    encoded = msg.payload.encode()  # equal to ``body`` up to padding bytes
    assert decode_body(channel, request, msg.flags, encoded, fds) == msg


@pytest.mark.parametrize("kind", sorted(PAYLOADS, key=lambda k: k.__name__))
@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=300))
def test_payload_decoders(kind: type, data: bytes) -> None:
    try:
        payload = kind.decode(data)  # type: ignore[attr-defined]
    except VhostUserProtocolError:
        return
    encoded = payload.encode()  # equal to ``data`` up to padding bytes
    assert len(encoded) == len(data)
    assert kind.decode(encoded) == payload  # type: ignore[attr-defined]


@pytest.mark.parametrize(("raw", "channel"), [
    ("01000000 00000000 00000000", Channel.FRONTEND_REQUESTS),  # version 0
    ("01000000 02000000 00000000", Channel.FRONTEND_REQUESTS),  # version 2
    ("01000000 11000000 00000000", Channel.FRONTEND_REQUESTS),  # unknown flag bit 4
    ("01000000 05000000 00000000", Channel.FRONTEND_REQUESTS),  # REPLY on a request
    ("01000000 01000000 08000000", Channel.FRONTEND_REPLIES),  # reply without REPLY
    ("01000000 0d000000 08000000", Channel.FRONTEND_REPLIES),  # reply with NEED_REPLY
    ("01000000 01000000 01100000", Channel.FRONTEND_REQUESTS),  # 4097-byte payload
    ("010000 01000000 00000000", Channel.FRONTEND_REQUESTS),  # short header
])
def test_bad_headers(raw: str, channel: Channel) -> None:
    with pytest.raises(VhostUserProtocolError):
        decode_header(bytes.fromhex(raw), channel)


@pytest.mark.parametrize(("request_", "body", "fds"), [
    (FrontendRequest.GET_FEATURES, "00" * 8, ()),  # GET_FEATURES carries nothing
    (FrontendRequest.SET_FEATURES, "00" * 4, ()),  # u64 cut short
    (FrontendRequest.SET_VRING_ADDR, "00" * 32, ()),
    (FrontendRequest.SET_VRING_KICK, "0100000000000000", ()),  # fd missing
    (FrontendRequest.SET_VRING_KICK, "0101000000000000", (3,)),  # NOFD but an fd came
    (FrontendRequest.SET_VRING_CALL, "0102000000000000", (3,)),  # unknown bit 9
    (FrontendRequest.SET_MEM_TABLE, "02000000 00000000" + "00" * 64, (3,)),  # 2 regions
    (FrontendRequest.SET_MEM_TABLE, "09000000 00000000" + "00" * 288, tuple(range(9))),
    (FrontendRequest.SET_MEM_TABLE, "01000000 00000000" + "00" * 40, (3,)),  # size off
    (FrontendRequest.SET_LOG_BASE, "00" * 16, ()),  # the log fd is missing
    (FrontendRequest.GET_CONFIG, "00000000 04000000 00000000 000000", ()),  # 3 of 4 bytes
    (FrontendRequest.GET_CONFIG, "00000000 01010000 00000000" + "00" * 257, ()),  # > 256
    (FrontendRequest.SET_OWNER, "", (3,)),  # an fd where none belongs
])
def test_bad_bodies(request_: int, body: str, fds: tuple[int, ...]) -> None:
    with pytest.raises(VhostUserProtocolError) as info:
        decode_body(Channel.FRONTEND_REQUESTS, request_, 1, bytes.fromhex(body), fds)
    assert info.value.fds == fds


def test_unknown_requests_are_opaque_not_errors() -> None:
    msg = decode_body(Channel.FRONTEND_REQUESTS, 200, 1, b"abc", (5,))
    assert msg.request == 200 and msg.payload.encode() == b"abc" and msg.fds == (5,)


def test_reply_rules() -> None:
    # A REPLY_ACK answer to a request that has no reply of its own is a u64.
    rule = payload_rule(Channel.FRONTEND_REPLIES, FrontendRequest.SET_VRING_NUM)
    assert isinstance(rule.decode(bytes(8)), U64)
    rule = payload_rule(Channel.FRONTEND_REPLIES, FrontendRequest.GET_VRING_BASE)
    assert isinstance(rule.decode(bytes(8)), VringState)
    rule = payload_rule(Channel.FRONTEND_REPLIES, FrontendRequest.GET_CONFIG)
    assert rule.decode(b"").encode() == b""  # zero-length: the back end's error form
    assert isinstance(rule.decode(ConfigSpace(0, b"ab").encode()), ConfigSpace)


def test_encoders_refuse_what_cannot_be_sent() -> None:
    for bad in (lambda: VringFile(256).encode(), lambda: U64(-1).encode(),
                lambda: MemoryTable((MemoryRegionDesc(0, 1, 0, 0),) * 9).encode(),
                lambda: ConfigSpace(0, bytes(257)).encode(),
                lambda: VhostUserMessage.request_of(1, fds=tuple(range(9))).encode()):
        with pytest.raises(VhostUserProtocolError):
            bad()
