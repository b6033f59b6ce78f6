"""The streaming parser: any chunking, fds attached by position, errors never anything
but VhostUserProtocolError (with every fd it held)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vhost_strategies import messages

from vfdirect.core.vhost.messages import (
    U64,
    Channel,
    FrontendRequest,
    VhostUserMessage,
    VhostUserProtocolError,
    VringFile,
)
from vfdirect.core.vhost.parser import MessageParser


def feed_chunked(parser: MessageParser, msgs: list[VhostUserMessage],
                 cuts: list[int]) -> list[VhostUserMessage]:
    """Send ``msgs`` as one stream cut at ``cuts``; each message's fds ride with the chunk
    holding its first byte (what the kernel does with SCM_RIGHTS)."""
    stream = b""
    starts: dict[int, tuple[int, ...]] = {}
    for msg in msgs:
        starts[len(stream)] = msg.fds
        stream += msg.encode()
    # A read stops right after a message that brought fds (Linux unix_stream_read_generic).
    ends, pos = set(), 0
    for msg in msgs:
        pos += len(msg.encode())
        if msg.fds:
            ends.add(pos)
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)} | ends)
    out: list[VhostUserMessage] = []
    for a, b in itertools.pairwise(bounds):
        fds = tuple(fd for off, group in starts.items() if a <= off < b for fd in group)
        out += parser.feed(stream[a:b], fds)
    return out


@pytest.mark.parametrize("channel", list(Channel))
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_any_chunking_yields_the_same_messages(channel: Channel, data: st.DataObject) -> None:
    msgs = data.draw(st.lists(messages(channel), min_size=1, max_size=8))
    cuts = data.draw(st.lists(st.integers(0, 1 << 16), max_size=20))
    parser = MessageParser(channel)
    assert feed_chunked(parser, msgs, cuts) == msgs
    assert parser.buffered == 0 and parser.held_fds() == ()
    parser.close()


def test_fds_of_the_next_message_in_a_merged_read() -> None:
    # One read returns the tail of message 1 and the start of message 2 with its fd.
    first = VhostUserMessage.request_of(FrontendRequest.SET_FEATURES, U64(5))
    second = VhostUserMessage.request_of(FrontendRequest.SET_VRING_CALL, VringFile(0),
                                         fds=(9,))
    a, b = first.encode(), second.encode()
    parser = MessageParser(Channel.FRONTEND_REQUESTS)
    assert parser.feed(a[:10]) == []
    assert parser.feed(a[10:] + b[:3], [9]) == [first]
    assert parser.held_fds() == (9,)
    assert parser.feed(b[3:]) == [second]


@pytest.mark.parametrize(("chunks", "channel"), [
    ([(bytes.fromhex("01000000 00000000 00000000"), ())], Channel.FRONTEND_REQUESTS),
    ([(bytes.fromhex("01000000 05000000 00000000"), ())], Channel.FRONTEND_REQUESTS),
    ([(bytes.fromhex("01000000 01000000 00000100"), ())], Channel.FRONTEND_REQUESTS),
    ([(bytes.fromhex("01000000 01000000 08000000") + bytes(8), ())],
     Channel.FRONTEND_REQUESTS),
    ([(bytes.fromhex("0c000000 01000000 08000000") + bytes(8), ())],
     Channel.FRONTEND_REQUESTS),  # SET_VRING_KICK without its fd
    ([(bytes.fromhex("03000000 01000000 00000000"), (4, 5))],
     Channel.FRONTEND_REQUESTS),  # SET_OWNER with fds
    ([(b"", (4,))], Channel.FRONTEND_REQUESTS),  # fds without data
    ([(bytes.fromhex("0f000000 01000000 00000000"), tuple(range(9)))],
     Channel.FRONTEND_REQUESTS),  # nine fds
    ([(bytes.fromhex("01000000 01000000 08000000"), ())], Channel.FRONTEND_REPLIES),
])
def test_malformed_streams(chunks: list[tuple[bytes, tuple[int, ...]]],
                           channel: Channel) -> None:
    parser = MessageParser(channel)
    fed: set[int] = set()

    def feed_all() -> None:
        for data, fds in chunks:
            fed.update(fds)
            parser.feed(data, fds)

    with pytest.raises(VhostUserProtocolError) as info:
        feed_all()
    assert set(info.value.fds) == fed  # every fd handed back for closing
    with pytest.raises(VhostUserProtocolError) as again:
        parser.feed(b"\x01", [77])  # a dead parser stays dead and returns new fds
    assert again.value.fds == (77,)


def test_error_returns_fds_of_messages_completed_in_the_same_feed() -> None:
    good = VhostUserMessage.request_of(FrontendRequest.SET_VRING_CALL, VringFile(0),
                                       fds=(8,))
    raw = good.encode()
    parser = MessageParser(Channel.FRONTEND_REQUESTS)
    assert parser.feed(raw[:5], [8]) == []
    with pytest.raises(VhostUserProtocolError) as info:
        parser.feed(raw[5:] + bytes(12))  # the message completes, then a version-0 header
    assert info.value.fds == (8,)


def test_close_reports_a_truncated_message() -> None:
    parser = MessageParser(Channel.FRONTEND_REQUESTS)
    raw = VhostUserMessage.request_of(FrontendRequest.SET_FEATURES, U64(1)).encode()
    parser.feed(raw[:15], [3])
    with pytest.raises(VhostUserProtocolError) as info:
        parser.close()
    assert info.value.fds == (3,)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Channel)),
       st.lists(st.tuples(st.binary(min_size=1, max_size=60), st.integers(0, 3)),
                max_size=12),
       st.booleans())
def test_random_bytes_never_raise_anything_else(channel: Channel,
                                                chunks: list[tuple[bytes, int]],
                                                plausible: bool) -> None:
    parser = MessageParser(channel)
    next_fd = 100
    fed: list[int] = []
    delivered: list[int] = []
    try:
        for raw, nfds in chunks:
            data = raw
            if plausible:  # a valid-looking header first: reach the payload decoders
                flags = 5 if channel.is_reply else 1
                data = (raw[0] % 45).to_bytes(4, "little") + flags.to_bytes(4, "little") \
                    + (len(raw) - 1).to_bytes(4, "little") + raw[1:]
            fds = list(range(next_fd, next_fd + nfds))
            next_fd += nfds
            fed += fds
            for msg in parser.feed(data, fds):
                delivered += msg.fds
    except VhostUserProtocolError as exc:
        leftover = list(exc.fds)
    else:
        leftover = list(parser.held_fds())
    # Every fd is accounted for exactly once: delivered with a message, or returned.
    assert sorted(delivered + leftover) == sorted(fed)
