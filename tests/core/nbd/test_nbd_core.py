"""The sans-IO NBD server core: the fixed newstyle handshake, request decoding and
request checks; decoders fed arbitrary bytes raise nothing but NbdProtocolError."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.nbd import (
    CommandFlag,
    CommandType,
    Errno,
    ExportInfo,
    HandshakePhase,
    InfoType,
    NbdProtocolError,
    Option,
    OptionReply,
    Request,
    RequestDecoder,
    ServerHandshake,
    TransmissionFlag,
    check_request,
    encode_option,
    encode_request,
    simple_reply,
)
from vfdirect.core.nbd.constants import IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC
from vfdirect.core.nbd.exports import ExportSpec, ExportSpecError

FLAGS = int(TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
            | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_WRITE_ZEROES)
SDA = ExportInfo("sda", 1 << 20, FLAGS, min_block=512, preferred_block=4096,
                 max_block=1 << 16, description="disk a")
EXPORTS = {"sda": SDA, "": SDA}


def server() -> ServerHandshake:
    return ServerHandshake(EXPORTS.get, lambda: ["sda"])


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, option, kind, length = struct.unpack_from(">QIII", data)
        assert magic == OPTION_REPLY_MAGIC
        out.append((option, kind, data[20:20 + length]))
        data = data[20 + length:]
    return out


def go_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos),
                                                           *infos)


def test_greeting_and_client_flags() -> None:
    hs = server()
    assert hs.data_to_send() == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    hs.receive(b"\0\0")
    assert hs.phase == HandshakePhase.CLIENT_FLAGS
    hs.receive(b"\0\x03")
    assert hs.phase == HandshakePhase.OPTIONS and hs.no_zeroes and hs.fixed_newstyle
    with pytest.raises(NbdProtocolError, match="client flags"):
        server().receive(struct.pack(">I", 4))


def test_go_info_list_and_unsupported_options() -> None:
    hs = server()
    hs.data_to_send()
    hs.receive(struct.pack(">I", 1))
    hs.receive(encode_option(Option.LIST) + encode_option(Option.STRUCTURED_REPLY)
               + encode_option(77, b"abc") + encode_option(Option.STARTTLS)
               + encode_option(Option.INFO, go_data("nope")))
    got = replies(hs.data_to_send())
    assert [(o, k) for o, k, _ in got] == [
        (Option.LIST, OptionReply.SERVER), (Option.LIST, OptionReply.ACK),
        (Option.STRUCTURED_REPLY, OptionReply.ERR_UNSUP), (77, OptionReply.ERR_UNSUP),
        (Option.STARTTLS, OptionReply.ERR_UNSUP), (Option.INFO, OptionReply.ERR_UNKNOWN)]
    assert got[0][2] == struct.pack(">I", 3) + b"sda"
    hs.receive(encode_option(Option.GO, go_data("sda", InfoType.NAME, InfoType.DESCRIPTION))
               + b"tail")
    got = replies(hs.data_to_send())
    assert got[0][2] == struct.pack(">HQH", InfoType.EXPORT, 1 << 20, FLAGS)
    assert got[1][2] == struct.pack(">H", InfoType.NAME) + b"sda"
    assert got[2][2] == struct.pack(">H", InfoType.DESCRIPTION) + b"disk a"
    assert got[3][2] == struct.pack(">HIII", InfoType.BLOCK_SIZE, 512, 4096, 1 << 16)
    assert got[4][1] == OptionReply.ACK
    assert hs.phase == HandshakePhase.TRANSMISSION and hs.export == SDA
    assert hs.take_rest() == b"tail"


def test_export_name_with_and_without_zeroes_and_unknown() -> None:
    for flags, pad in ((1, 124), (3, 0)):
        hs = server()
        hs.data_to_send()
        hs.receive(struct.pack(">I", flags) + encode_option(Option.EXPORT_NAME, b"sda"))
        assert hs.data_to_send() == struct.pack(">QH", 1 << 20, FLAGS) + bytes(pad)
        assert hs.phase == HandshakePhase.TRANSMISSION
    hs = server()
    hs.receive(struct.pack(">I", 1) + encode_option(Option.EXPORT_NAME, b"nope"))
    assert hs.phase == HandshakePhase.CLOSED and "unknown export" in (hs.close_reason or "")


def test_abort_malformed_and_oversized_options() -> None:
    hs = ServerHandshake(EXPORTS.get, lambda: ["sda"], max_option_data=16)
    hs.data_to_send()
    hs.receive(struct.pack(">I", 1))
    hs.receive(encode_option(Option.GO, b"\0\0\0\x09ab\0\0"))  # name longer than the data
    hs.receive(encode_option(Option.GO, go_data("sda", 1)[:-1]))  # info count mismatch
    hs.receive(encode_option(Option.LIST, b"x"))
    hs.receive(encode_option(Option.INFO, b"z" * 40)[:30])
    hs.receive(b"z" * 26)
    hs.receive(encode_option(Option.ABORT))
    kinds = [k for _, k, _ in replies(hs.data_to_send())]
    assert kinds == [OptionReply.ERR_INVALID, OptionReply.ERR_INVALID, OptionReply.ERR_INVALID,
                     OptionReply.ERR_TOO_BIG, OptionReply.ACK]
    assert hs.phase == HandshakePhase.CLOSED
    s = server()
    with pytest.raises(NbdProtocolError, match="option magic"):
        s.receive(struct.pack(">I", 1) + b"X" * 16)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8), st.booleans())
def test_handshake_never_raises_anything_else(chunks: list[bytes], valid_start: bool) -> None:
    hs = server()
    if valid_start:
        chunks = [struct.pack(">I", 1), struct.pack(">QI", IHAVEOPT, 7), *chunks]
    try:
        for chunk in chunks:
            hs.receive(chunk)
            hs.data_to_send()
    except NbdProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([o.value for o in Option] + [0, 99, 1 << 31]),
                          st.binary(max_size=40)), max_size=6), st.integers(1, 7))
def test_handshake_options_split_anywhere(options: list[tuple[int, bytes]], cut: int) -> None:
    """Any split of a valid option stream gives the same replies."""
    stream = struct.pack(">I", 3) + b"".join(encode_option(o, d) for o, d in options)
    whole, split = server(), server()
    whole.receive(stream)
    for i in range(0, len(stream), cut):
        split.receive(stream[i:i + cut])
    assert whole.data_to_send() == split.data_to_send()
    assert whole.phase == split.phase


def test_request_decoder_and_replies() -> None:
    dec = RequestDecoder(max_payload=1024)
    stream = (encode_request(CommandType.WRITE, 7, 512, 4, flags=CommandFlag.FUA,
                             payload=b"abcd")
              + encode_request(CommandType.READ, 8, 0, 512)
              + encode_request(CommandType.WRITE, 9, 0, 2000, payload=b"q" * 2000)
              + encode_request(CommandType.FLUSH, 10, 0, 0))
    got: list[Request] = []
    for i in range(0, len(stream), 5):
        got.extend(dec.feed(stream[i:i + 5]))
    assert got[0] == Request(CommandFlag.FUA, CommandType.WRITE, 7, 512, 4, b"abcd")
    assert got[1] == Request(0, CommandType.READ, 8, 0, 512)
    assert got[2].discarded and got[2].payload is None and got[2].cookie == 9
    assert got[3].type == CommandType.FLUSH and dec.idle
    with pytest.raises(NbdProtocolError, match="request magic"):
        dec.feed(b"\0" * 28)
    assert simple_reply(5, 22) == struct.pack(">IIQ", 0x67446698, 22, 5)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=10), st.integers(0, 100))
def test_request_decoder_never_raises_anything_else(chunks: list[bytes], limit: int) -> None:
    dec = RequestDecoder(max_payload=limit)
    try:
        for chunk in chunks:
            for request in dec.feed(chunk):
                assert request.payload is None or len(request.payload) == request.length
                check_request(request, SDA)
    except NbdProtocolError:
        pass


@given(st.lists(st.tuples(st.sampled_from(list(CommandType)), st.integers(0, 1 << 64 - 1),
                          st.integers(0, 1 << 22), st.integers(0, 3000)), max_size=8),
       st.integers(1, 50))
@settings(max_examples=300, deadline=None)
def test_request_stream_round_trip(reqs: list[tuple[int, int, int, int]], cut: int) -> None:
    stream = b"".join(encode_request(t, c, o, n, payload=b"p" * n if t == CommandType.WRITE
                                     else b"") for t, c, o, n in reqs)
    dec = RequestDecoder(max_payload=2048)
    got = []
    for i in range(0, len(stream), cut):
        got.extend(dec.feed(stream[i:i + cut]))
    assert [(r.type, r.cookie, r.offset, r.length) for r in got] == reqs
    for r in got:
        if r.type == CommandType.WRITE:
            assert r.discarded == (r.length > 2048)
    assert dec.idle


@pytest.mark.parametrize(("request_", "errno"), [
    (Request(0, CommandType.READ, 0, 0, 512), Errno.OK),
    (Request(0, CommandType.READ, 0, (1 << 20) - 512, 1024), Errno.EINVAL),
    (Request(0, CommandType.WRITE, 0, (1 << 20) - 512, 1024, b"x" * 1024), Errno.ENOSPC),
    (Request(0, CommandType.WRITE_ZEROES, 0, 1 << 20, 512), Errno.ENOSPC),
    (Request(0, CommandType.READ, 0, 100, 512), Errno.EINVAL),
    (Request(0, CommandType.READ, 0, 0, 100), Errno.EINVAL),
    (Request(0, CommandType.READ, 0, 0, 1 << 17), Errno.EINVAL),
    (Request(0, CommandType.WRITE_ZEROES, 0, 0, 1 << 18), Errno.OK),
    (Request(CommandFlag.FUA, CommandType.WRITE, 0, 0, 512, b"x" * 512), Errno.OK),
    (Request(CommandFlag.DF, CommandType.READ, 0, 0, 512), Errno.EINVAL),
    (Request(CommandFlag.FAST_ZERO, CommandType.WRITE_ZEROES, 0, 0, 512), Errno.EINVAL),
    (Request(CommandFlag.NO_HOLE, CommandType.WRITE_ZEROES, 0, 0, 512), Errno.OK),
    (Request(0, CommandType.WRITE, 0, 0, 1 << 17, discarded=True), Errno.EINVAL),
    (Request(0, CommandType.FLUSH, 0, 0, 0), Errno.OK),
    (Request(0, CommandType.TRIM, 0, 0, 512), Errno.EINVAL),
    (Request(0, CommandType.BLOCK_STATUS, 0, 0, 512), Errno.EINVAL),
    (Request(0, 200, 0, 0, 512), Errno.EINVAL),
])
def test_check_request(request_: Request, errno: Errno) -> None:
    assert check_request(request_, SDA) == errno


def test_export_info_rejects_bad_block_sizes() -> None:
    with pytest.raises(ValueError, match="minimum"):
        ExportInfo("x", 0, 1, min_block=3)
    with pytest.raises(ValueError, match="preferred"):
        ExportInfo("x", 0, 1, min_block=4096, preferred_block=512)
    with pytest.raises(ValueError, match="maximum"):
        ExportInfo("x", 0, 1, min_block=512, preferred_block=512, max_block=1000)


def test_export_spec_round_trip_and_refusals() -> None:
    unix = ExportSpec(disk="sdb", unix="/tmp/x.sock")
    assert unix.address == "unix:/tmp/x.sock"
    assert unix.uri == "nbd+unix:///sdb?socket=/tmp/x.sock"
    tcp = ExportSpec(disk="007:01", port=10809)
    assert tcp.disk == "7:1" and tcp.address == "tcp:127.0.0.1:10809"
    for spec in (unix, tcp):
        assert ExportSpec.load(spec.dump()) == spec
    for bad, match in (({"disk": "hda", "port": 1}, "neither"),
                       ({"disk": "sda"}, "either"),
                       ({"disk": "sda", "unix": "/x", "port": 2}, "either"),
                       ({"disk": "sda", "port": 0}, "1..65535"),
                       ({"disk": "sda", "port": True}, "1..65535"),
                       ({"disk": "sda", "unix": "/" + "x" * 200}, "Unix socket path"),
                       ({"disk": "sda", "unix": "/a\0b"}, "Unix socket path"),
                       ({"disk": "300:0", "port": 5}, "target"),
                       ({"disk": "sda", "port": 5, "host": "0.0.0.0"}, "loopback"),
                       ({"disk": "sda", "port": 5, "extra": 1}, "unknown keys"),
                       ("sda", "object")):
        with pytest.raises(ExportSpecError, match=match):
            ExportSpec.load(bad)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["disk", "unix", "port", "host", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
                       max_size=5))
def test_export_spec_load_raises_only_its_error(data: dict[str, object]) -> None:
    with contextlib.suppress(ExportSpecError):
        ExportSpec.load(data)
