"""Hypothesis strategies and helpers for the migration stream tests."""

from __future__ import annotations

import itertools
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from vfdirect.core.migration.stream import (
    HEADER,
    MAGIC,
    PageKind,
    Section,
    SectionType,
    StreamDecoder,
    StreamEncoder,
)

S2D = "source-to-destination"
D2S = "destination-to-source"

def texts(min_size: int = 0, max_size: int = 8) -> st.SearchStrategy[str]:
    return st.text(st.characters(codec="utf-8"), min_size=min_size, max_size=max_size)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | texts()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(texts(), json_values, max_size=4)


@dataclass(frozen=True)
class Item:
    """One section to send: a JSON one (``obj``) or PAGES (``first``, ``count``, ``data``;
    ``data`` None for zero pages)."""

    type: SectionType
    obj: dict[str, Any] | None = None
    first: int = 0
    count: int = 0
    data: bytes | None = None


@st.composite
def hellos(draw: st.DrawFn) -> dict[str, Any]:
    page = draw(st.sampled_from([512, 1024, 4096]))
    pages = draw(st.integers(1, 24))
    size = draw(st.integers((pages - 1) * page + 1, pages * page))
    extra = draw(st.dictionaries(st.sampled_from(["host", "vcpus", "note"]), json_values,
                                 max_size=2))
    return {"migration": draw(texts(1, 6)),
            "vm": draw(texts(1, 6)),
            "memory_size": size, "page_size": page, **extra}


@st.composite
def source_streams(draw: st.DrawFn, max_body: int = 6, max_run: int = 3) -> list[Item]:
    """A valid source-to-destination section sequence (maybe cut short: END, COMMIT
    optional), or one that is just ABORT."""
    if draw(st.integers(0, 19)) == 0:
        return [Item(SectionType.ABORT, draw(json_objects))]
    hello = draw(hellos())
    page, pages = hello["page_size"], -(-hello["memory_size"] // hello["page_size"])
    items = [Item(SectionType.HELLO, hello)]
    for _ in range(draw(st.integers(0, max_body))):
        kind = draw(st.sampled_from([SectionType.PAGES, SectionType.PAGES,
                                     SectionType.ROUND, SectionType.STATE]))
        if kind is SectionType.PAGES:
            first = draw(st.integers(0, pages - 1))
            count = draw(st.integers(1, min(max_run, pages - first)))
            data = None if draw(st.booleans()) else draw(
                st.binary(min_size=count * page, max_size=count * page))
            items.append(Item(kind, first=first, count=count, data=data))
        else:
            items.append(Item(kind, draw(json_objects)))
    if draw(st.booleans()):
        items.append(Item(SectionType.END, {}))
        tail = draw(st.sampled_from([None, SectionType.COMMIT, SectionType.ABORT]))
        if tail is not None:
            items.append(Item(tail, draw(json_objects)))
    elif draw(st.booleans()):
        items.append(Item(SectionType.ABORT, {"reason": "test"}))
    return items


@st.composite
def destination_streams(draw: st.DrawFn) -> list[Item]:
    """A valid destination-to-source sequence."""
    items: list[Item] = []
    if draw(st.booleans()):
        items.append(Item(SectionType.READY, draw(json_objects)))
        tail = draw(st.sampled_from([None, SectionType.DONE, SectionType.ERROR,
                                     SectionType.ABORT]))
    else:
        tail = draw(st.sampled_from([None, SectionType.ERROR, SectionType.ABORT]))
    if tail is not None:
        items.append(Item(tail, draw(json_objects)))
    return items


def encode(items: list[Item], direction: str = S2D) -> tuple[bytes, list[int]]:
    """The stream's bytes and the offsets where each section (and the preamble) ends."""
    enc = StreamEncoder(direction)
    parts = [enc.preamble()]
    ends = [len(parts[0])]
    for item in items:
        if item.type is SectionType.PAGES:
            parts.append(enc.pages_header(item.first, item.count, item.data))
            if item.data is not None:
                parts.append(item.data)
        else:
            assert item.obj is not None
            parts.append(enc.json(item.type, item.obj))
        ends.append(sum(map(len, parts)))
    stream = b"".join(parts)
    assert enc.bytes_encoded == len(stream)
    return stream, ends


def matches(section: Section, item: Item, seq: int) -> bool:
    if section.type is not item.type or section.seq != seq:
        return False
    if item.type is SectionType.PAGES:
        data = b"" if item.data is None else item.data
        return (section.first_page, section.count, bytes(section.data)) == (
            item.first, item.count, data) and section.kind is (
            PageKind.ZERO if item.data is None else PageKind.RAW)
    return section.json == item.obj


def feed_chunked(dec: StreamDecoder, stream: bytes, cuts: list[int]) -> list[Section]:
    out: list[Section] = []
    bounds = sorted({0, len(stream), *(c for c in cuts if 0 < c < len(stream))})
    for a, b in itertools.pairwise(bounds):
        out += dec.feed(stream[a:b])
    return out


def raw_section(kind: int, seq: int, payload: bytes, *, flags: int = 0, reserved: int = 0,
                crc: int | None = None, length: int | None = None) -> bytes:
    """A section built by hand (to make broken ones)."""
    n = len(payload) if length is None else length
    head = HEADER.pack(kind, flags, reserved, seq, n, 0)[:12]
    if crc is None:
        crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


def preamble(version: int = 1, flags: int = 0) -> bytes:
    return MAGIC + struct.pack("<HH", version, flags)
