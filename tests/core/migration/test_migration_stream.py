"""The migration stream: round trips at any chunking, every single-byte corruption and
every truncation detected, and each rule's specific error."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from migration_strategies import (
    D2S,
    S2D,
    Item,
    destination_streams,
    encode,
    feed_chunked,
    hellos,
    matches,
    preamble,
    raw_section,
    source_streams,
)

from vfdirect.core.migration.stream import (
    MAX_PAYLOAD,
    BadPreamble,
    ChecksumMismatch,
    MalformedSection,
    PageKind,
    Section,
    SectionTooLarge,
    SectionType,
    SequenceError,
    StreamDecoder,
    StreamEncoder,
    StreamError,
    TruncatedStream,
    UnexpectedSection,
    UnsupportedVersion,
)

HELLO = {"migration": "m1", "vm": "vm1", "memory_size": 8 * 512, "page_size": 512}
cut_lists = st.lists(st.integers(0, 1 << 16), max_size=12)


def js(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def hello_stream(*more: bytes) -> bytes:
    return preamble() + raw_section(SectionType.HELLO, 0, js(HELLO)) + b"".join(more)


def decode_all(stream: bytes, direction: str = S2D) -> list[Section]:
    dec = StreamDecoder(direction)
    out = dec.feed(stream)
    dec.close()
    return out


# -- round trips ------------------------------------------------------------------------

@given(source_streams(), cut_lists)
def test_source_stream_round_trips_at_any_chunking(items: list[Item], cuts: list[int]) -> None:
    stream, _ = encode(items)
    dec = StreamDecoder(S2D)
    out = feed_chunked(dec, stream, cuts)
    dec.close()
    assert len(out) == len(items)
    assert all(matches(s, it, i) for i, (s, it) in enumerate(zip(out, items, strict=True)))
    assert dec.finished == any(it.type is SectionType.END for it in items)
    assert dec.terminated == (items[-1].type in (SectionType.COMMIT, SectionType.ABORT))
    assert dec.bytes_fed == len(stream) and dec.buffered == 0
    if items[0].type is SectionType.HELLO:
        assert dec.hello == items[0].obj
        assert dec.page_size == items[0].obj["page_size"]  # type: ignore[index]


@given(destination_streams(), cut_lists)
def test_destination_stream_round_trips(items: list[Item], cuts: list[int]) -> None:
    stream, _ = encode(items, D2S)
    dec = StreamDecoder(D2S)
    out = feed_chunked(dec, stream, cuts)
    dec.close()
    assert [s.json for s in out] == [it.obj for it in items]
    assert dec.finished == (bool(items) and items[-1].type is not SectionType.READY)


def test_one_byte_at_a_time_and_pages_data_is_a_view() -> None:
    enc = StreamEncoder(S2D)
    data = bytes(range(256)) * 4
    stream = (enc.preamble() + enc.json(SectionType.HELLO, HELLO)
              + enc.pages_header(2, 2, memoryview(data)) + data + enc.zero_pages(0, 8)
              + enc.json(SectionType.END, {}))
    dec = StreamDecoder(S2D)
    out = [s for i in range(len(stream)) for s in dec.feed(stream[i:i + 1])]
    assert [s.type for s in out] == [SectionType.HELLO, SectionType.PAGES,
                                     SectionType.PAGES, SectionType.END]
    pages = out[1]
    assert (pages.first_page, pages.count, pages.kind) == (2, 2, PageKind.RAW)
    assert isinstance(pages.data, memoryview) and pages.data.readonly
    assert pages.data == data
    assert (out[2].kind, len(out[2].data)) == (PageKind.ZERO, 0)
    with pytest.raises(TypeError, match="PAGES section carries no JSON"):
        _ = pages.json
    assert dec.finished and not dec.terminated


@pytest.mark.timeout(120)
def test_maximal_section_fed_in_small_chunks() -> None:
    """A 16 MiB section arriving 4 KiB at a time: linear buffering (a quadratic one would
    copy terabytes and time out)."""
    page = 4096
    count = (MAX_PAYLOAD - 16) // page
    enc = StreamEncoder(S2D)
    hello = {**HELLO, "memory_size": count * page, "page_size": page}
    data = bytes(range(256)) * (count * page // 256)
    stream = (enc.preamble() + enc.json(SectionType.HELLO, hello)
              + enc.pages_header(0, count, data) + data)
    dec = StreamDecoder(S2D)
    out: list[Section] = []
    for at in range(0, len(stream), 4096):
        out += dec.feed(stream[at:at + 4096])
    assert [s.type for s in out] == [SectionType.HELLO, SectionType.PAGES]
    assert out[1].count == count and out[1].data == data
    dec.close()


# -- corruption and truncation ----------------------------------------------------------

def check_corrupted(stream: bytes, items: list[Item], direction: str = S2D) -> None:
    """Decoding must fail with a StreamError, and every section delivered before the
    failure must be one that was sent."""
    dec = StreamDecoder(direction)
    got: list[Section] = []

    def run() -> None:
        for at in range(0, len(stream), 97):
            got.extend(dec.feed(stream[at:at + 97]))
        dec.close()

    with pytest.raises(StreamError) as info:
        run()
    got += info.value.sections
    assert all(matches(s, it, i) for i, (s, it) in enumerate(zip(got, items, strict=False)))
    assert len(got) <= len(items)


@given(source_streams(max_body=4, max_run=2), st.data())
@settings(max_examples=300)
def test_any_single_byte_corruption_is_detected(items: list[Item], data: st.DataObject) -> None:
    stream, _ = encode(items)
    at = data.draw(st.integers(0, len(stream) - 1), label="at")
    flip = data.draw(st.integers(1, 255), label="xor")
    bad = bytearray(stream)
    bad[at] ^= flip
    check_corrupted(bytes(bad), items)


def test_every_byte_position_of_a_stream_is_covered() -> None:
    items = [Item(SectionType.HELLO, HELLO), Item(SectionType.PAGES, first=1, count=1,
                                                  data=bytes(range(256)) * 2),
             Item(SectionType.PAGES, first=3, count=2), Item(SectionType.STATE, {"cpu": [1]}),
             Item(SectionType.END, {}), Item(SectionType.COMMIT, {})]
    stream, _ = encode(items)
    for at in range(len(stream)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(stream)
            bad[at] ^= flip
            check_corrupted(bytes(bad), items)


@given(source_streams(max_body=4), st.data())
def test_truncation_is_detected_unless_at_a_section_boundary(items: list[Item],
                                                              data: st.DataObject) -> None:
    stream, ends = encode(items)
    cut = data.draw(st.integers(0, len(stream) - 1), label="cut")
    dec = StreamDecoder(S2D)
    out = dec.feed(stream[:cut])
    if cut == 0 or cut in ends:
        dec.close()
        assert len(out) == (ends.index(cut) if cut else 0)
    else:
        with pytest.raises(TruncatedStream, match="bytes left over"):
            dec.close()
        assert len(out) == sum(1 for end in ends[1:] if end <= cut)
    assert len(out) < len(items)


@given(st.binary(max_size=200))
def test_garbage_after_a_preamble_only_raises_stream_errors(junk: bytes) -> None:
    dec = StreamDecoder(S2D)
    try:
        dec.feed(preamble() + junk)
        dec.close()
    except StreamError:
        pass


@given(hellos(), st.binary(min_size=1, max_size=64))
def test_garbage_pages_payloads_only_raise_stream_errors(hello: dict[str, object],
                                                         junk: bytes) -> None:
    stream = preamble() + raw_section(SectionType.HELLO, 0, js(hello)) + raw_section(
        SectionType.PAGES, 1, junk)
    with pytest.raises(MalformedSection):
        decode_all(stream)


# -- preamble ---------------------------------------------------------------------------

def test_bad_magic_is_refused_as_soon_as_it_differs() -> None:
    dec = StreamDecoder(S2D)
    assert dec.feed(b"VFD") == []
    with pytest.raises(BadPreamble, match="not a vfdirect migration stream"):
        dec.feed(b"X")
    with pytest.raises(StreamError, match="already failed"):
        dec.feed(b"MIG")


def test_http_is_not_a_migration_stream() -> None:
    with pytest.raises(BadPreamble, match="not a vfdirect migration stream"):
        decode_all(b"GET / HTTP/1.1\r\n\r\n")


def test_other_version_names_both_versions() -> None:
    with pytest.raises(UnsupportedVersion, match=r"version 2 is not supported.*version 1"):
        decode_all(preamble(version=2))


def test_preamble_flags_must_be_zero() -> None:
    with pytest.raises(BadPreamble, match="flags 0x0001"):
        decode_all(preamble(flags=1))


def test_truncated_preamble() -> None:
    dec = StreamDecoder(S2D)
    dec.feed(preamble()[:10])
    with pytest.raises(TruncatedStream, match="inside the preamble"):
        dec.close()


def test_empty_stream_closes_cleanly_but_is_not_finished() -> None:
    dec = StreamDecoder(S2D)
    dec.close()
    assert not dec.finished


# -- section headers --------------------------------------------------------------------

def test_checksum_mismatch_names_the_seq() -> None:
    stream = hello_stream(raw_section(SectionType.STATE, 1, js({}), crc=1234))
    with pytest.raises(ChecksumMismatch, match="seq 1") as info:
        decode_all(stream)
    assert info.value.seq == 1
    assert [s.type for s in info.value.sections] == [SectionType.HELLO]


def test_oversized_section_is_refused_from_its_header_alone() -> None:
    dec = StreamDecoder(S2D)
    dec.feed(hello_stream())
    header = raw_section(SectionType.PAGES, 1, b"", length=MAX_PAYLOAD + 1)
    with pytest.raises(SectionTooLarge, match=f"{MAX_PAYLOAD + 1} payload bytes"):
        dec.feed(header)


def test_sequence_gap() -> None:
    with pytest.raises(SequenceError, match=r"seq 2 out of order \(expected 1\)"):
        decode_all(hello_stream(raw_section(SectionType.END, 2, js({}))))


def test_first_section_must_have_seq_zero() -> None:
    with pytest.raises(SequenceError, match="expected 0"):
        decode_all(preamble() + raw_section(SectionType.HELLO, 5, js(HELLO)))


@pytest.mark.parametrize(("kind", "flags", "reserved", "message"), [
    (0, 0, 0, "unknown type 0"),
    (11, 0, 0, "unknown type 11"),
    (SectionType.END, 1, 0, "flags 0x01"),
    (SectionType.END, 0, 7, "reserved 0x0007"),
])
def test_malformed_headers(kind: int, flags: int, reserved: int, message: str) -> None:
    with pytest.raises(MalformedSection, match=message):
        decode_all(hello_stream(raw_section(kind, 1, js({}), flags=flags,
                                            reserved=reserved)))


# -- ordering ---------------------------------------------------------------------------

def sections(direction: str, *kinds: SectionType) -> bytes:
    out = preamble()
    for seq, kind in enumerate(kinds):
        payload = js(HELLO) if kind is SectionType.HELLO else (
            struct.pack("<QII", 0, 1, PageKind.ZERO) if kind is SectionType.PAGES
            else js({}))
        out += raw_section(kind, seq, payload)
    return out


T = SectionType


@pytest.mark.parametrize(("kinds", "message"), [
    ((T.PAGES,), "PAGES before HELLO"),
    ((T.END,), "END before HELLO"),
    ((T.HELLO, T.HELLO), "a second HELLO"),
    ((T.HELLO, T.COMMIT), "COMMIT before END"),
    ((T.HELLO, T.END, T.PAGES), "PAGES after END"),
    ((T.HELLO, T.END, T.END), "END after END"),
    ((T.HELLO, T.END, T.COMMIT, T.ABORT), "ABORT after COMMIT"),
    ((T.ABORT, T.HELLO), "HELLO after ABORT"),
    ((T.HELLO, T.READY), "READY is not sent source-to-destination"),
    ((T.HELLO, T.DONE), "DONE is not sent"),
])
def test_source_ordering_violations(kinds: tuple[SectionType, ...], message: str) -> None:
    with pytest.raises(UnexpectedSection, match=message):
        decode_all(sections(S2D, *kinds), S2D)


@pytest.mark.parametrize("kinds", [
    (T.ABORT,), (T.HELLO, T.ABORT), (T.HELLO, T.PAGES, T.ROUND, T.STATE, T.PAGES, T.END),
    (T.HELLO, T.STATE, T.END, T.ABORT), (T.HELLO, T.END, T.COMMIT), (T.HELLO,),
])
def test_source_orderings_allowed(kinds: tuple[SectionType, ...]) -> None:
    assert [s.type for s in decode_all(sections(S2D, *kinds), S2D)] == list(kinds)


@pytest.mark.parametrize(("kinds", "message"), [
    ((T.HELLO,), "HELLO is not sent destination-to-source"),
    ((T.COMMIT,), "COMMIT is not sent"),
    ((T.DONE,), "DONE before READY"),
    ((T.READY, T.READY), "a second READY"),
    ((T.READY, T.DONE, T.ABORT), "ABORT after DONE"),
    ((T.ERROR, T.READY), "READY after ERROR"),
])
def test_destination_ordering_violations(kinds: tuple[SectionType, ...],
                                         message: str) -> None:
    with pytest.raises(UnexpectedSection, match=message):
        decode_all(sections(D2S, *kinds), D2S)


def test_unknown_direction() -> None:
    with pytest.raises(ValueError, match="sideways"):
        StreamDecoder("sideways")


# -- payloads ---------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    ({"migration": ""}, "'migration' must be a non-empty string"),
    ({"vm": 3}, "'vm' must be a non-empty string"),
    ({"memory_size": 0}, "'memory_size' must be a positive integer"),
    ({"memory_size": True}, "'memory_size' must be a positive integer"),
    ({"memory_size": 1.5}, "'memory_size' must be a positive integer"),
    ({"page_size": 256}, "'page_size' must be a power of two from 512 to 65536"),
    ({"page_size": 131072}, "'page_size' must be a power of two"),
    ({"page_size": 3000}, "'page_size' must be a power of two"),
])
def test_bad_hello(change: dict[str, object], message: str) -> None:
    stream = preamble() + raw_section(T.HELLO, 0, js({**HELLO, **change}))
    with pytest.raises(MalformedSection, match=message):
        decode_all(stream)
    with pytest.raises(ValueError, match=message):
        StreamEncoder().json(T.HELLO, {**HELLO, **change})


def test_hello_missing_key() -> None:
    hello = {k: v for k, v in HELLO.items() if k != "memory_size"}
    with pytest.raises(MalformedSection, match="'memory_size'"):
        decode_all(preamble() + raw_section(T.HELLO, 0, js(hello)))


def test_hello_extra_keys_are_returned_as_sent() -> None:
    hello = {**HELLO, "vcpus": 2, "source": {"host": "a"}}
    assert decode_all(preamble() + raw_section(T.HELLO, 0, js(hello)))[0].json == hello


@pytest.mark.parametrize(("payload", "message"), [
    (b"[1]", "not a JSON object"),
    (b"\xff{}", "not UTF-8 JSON"),
    (b'{"a": NaN}', "not UTF-8 JSON"),
    (b"{", "not UTF-8 JSON"),
    (b"", "not UTF-8 JSON"),
])
def test_bad_json_payloads(payload: bytes, message: str) -> None:
    with pytest.raises(MalformedSection, match=message):
        decode_all(hello_stream(raw_section(T.STATE, 1, payload)))


@pytest.mark.parametrize(("first", "count", "kind", "data", "message"), [
    (0, 0, 0, b"", "a count of 0 pages"),
    (7, 2, 1, b"", r"pages 7\+2 pass the memory's 8 pages"),
    (2**63, 1, 1, b"", "pass the memory"),
    (0, 1, 2, b"", "unknown page kind 2"),
    (0, 1, 0, b"x" * 511, "carry 511 bytes of data, expected 512"),
    (0, 1, 1, b"x", "ZERO pages 0\\+1 carry 1 bytes of data, expected 0"),
])
def test_bad_pages(first: int, count: int, kind: int, data: bytes, message: str) -> None:
    payload = struct.pack("<QII", first, count, kind) + data
    with pytest.raises(MalformedSection, match=message):
        decode_all(hello_stream(raw_section(T.PAGES, 1, payload)))


def test_short_pages_payload() -> None:
    with pytest.raises(MalformedSection, match="shorter than the 16-byte pages header"):
        decode_all(hello_stream(raw_section(T.PAGES, 1, b"\0" * 15)))


def test_memory_not_a_whole_number_of_pages_has_a_partial_last_page() -> None:
    enc = StreamEncoder(S2D)
    stream = enc.preamble() + enc.json(T.HELLO, {**HELLO, "memory_size": 1025})
    stream += enc.zero_pages(0, 3)
    assert enc.pages == 3
    assert decode_all(stream)[1].count == 3
    with pytest.raises(ValueError, match="outside the memory's 3 pages"):
        enc.zero_pages(3, 1)


# -- encoder misuse ---------------------------------------------------------------------

def test_encoder_refuses_misuse() -> None:
    enc = StreamEncoder(S2D)
    with pytest.raises(ValueError, match="PAGES before HELLO"):
        enc.zero_pages(0, 1)
    with pytest.raises(ValueError, match="cannot send END before HELLO"):
        enc.json(T.END, {})
    enc.json(T.HELLO, HELLO)
    with pytest.raises(ValueError, match="need 1024 bytes of data, got 10"):
        enc.pages_header(0, 2, b"x" * 10)
    with pytest.raises(ValueError, match="outside the memory"):
        enc.zero_pages(0, 0)
    with pytest.raises(ValueError, match="not a JSON section"):
        enc.json(T.PAGES, {})
    with pytest.raises(ValueError, match="carries a JSON object, not list"):
        enc.json(T.STATE, [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Out of range float"):
        enc.json(T.STATE, {"x": float("nan")})
    with pytest.raises(ValueError, match="over the 16777216-byte section limit"):
        enc.section(T.STATE, b" " * (MAX_PAYLOAD + 1))
    with pytest.raises(ValueError, match="not a section type"):
        enc.section(99, b"")  # type: ignore[arg-type]
    assert enc.next_seq == 1  # refused sections took no sequence number


def test_encoder_without_direction_does_not_check_order() -> None:
    enc = StreamEncoder()
    stream = enc.preamble() + enc.json(T.DONE, {}) + enc.section(T.ROUND, b"{}")
    with pytest.raises(UnexpectedSection):
        decode_all(stream, D2S)
    assert StreamEncoder().section(T.HELLO, js(HELLO)).endswith(js(HELLO))


def test_encoder_sequence_numbers_count_per_direction() -> None:
    enc = StreamEncoder(D2S)
    enc.preamble()
    enc.json(T.READY, {})
    enc.json(T.DONE, {})
    assert enc.next_seq == 2
