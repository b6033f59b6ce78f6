"""Fuzz target ``migration_stream``: the live-migration stream decoder and a loader that
applies its PAGES sections to a guest memory image, as a destination does.

Each input is one stream of one direction: a preamble (valid or mutated), then sections
framed with a correct checksum and sequence number (or with a mutated header field),
whose types, payloads (HELLO with fuzzed fields, PAGES sub-headers, ROUND/STATE/... JSON,
raw bytes) come from the input, fed to :class:`StreamDecoder` in chunks of fuzzed sizes,
then closed. Invariants (a violation is a crash input):

* ``feed``/``close`` return whole sections or raise a :class:`StreamError` (nothing
  else); after an error the decoder refuses input with a ``StreamError``;
* sections come out numbered 0, 1, 2...; HELLO comes first (source to destination) and
  sets the page size; a PAGES section lies within HELLO's memory, RAW data is exactly
  ``count * page_size`` bytes, ZERO carries none; applying them to the memory image never
  writes past its end.

Run: ``.venv/bin/python fuzz/fuzz_migration_stream.py -max_total_time=60 -seed=1 [corpus]``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from typing import Any

import atheris
import fuzzlib
from fuzzlib import Stats, Violation

with atheris.instrument_imports(include=["vfdirect"]):
    from vfdirect.core.migration.stream import (
        HEADER,
        MAGIC,
        PAGES_HEADER,
        PREAMBLE,
        VERSION,
        Direction,
        PageKind,
        SectionType,
        StreamDecoder,
        StreamError,
    )

TARGET = "migration_stream"
#: Largest memory image the loader keeps (bigger HELLOs are decoded, not applied).
MAX_IMAGE = 1 << 20


def _frame(kind: int, seq: int, payload: bytes, *, flags: int = 0, reserved: int = 0,
           length: int | None = None, bad_crc: bool = False) -> bytes:
    head = HEADER.pack(kind & 0xFF, flags & 0xFF, reserved & 0xFFFF, seq & 0xFFFFFFFF,
                       (len(payload) if length is None else length) & 0xFFFFFFFF, 0)[:12]
    crc = zlib.crc32(payload, zlib.crc32(head)) ^ (1 if bad_crc else 0)
    return head + crc.to_bytes(4, "little") + payload


def _json_value(fdp: Any) -> Any:
    return fdp.PickValueInList([
        None, True, 0, -1, 1 << 64, 4096, 512, 65536, 3, "", "x", "vm0", [], {},
        fdp.ConsumeInt(8), fdp.ConsumeUnicodeNoSurrogates(12), fdp.ConsumeFloat()])


def _payload(fdp: Any, kind: int, page_size: int, pages: int) -> bytes:
    choice = fdp.ConsumeIntInRange(0, 5)
    if choice == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
    if kind == SectionType.PAGES or choice == 1:
        first = fdp.PickValueInList([0, 1, max(pages - 1, 0), pages, fdp.ConsumeInt(8) & (
            (1 << 64) - 1)])
        count = fdp.PickValueInList([1, 2, 0, fdp.ConsumeInt(4) & 0xFFFFFFFF])
        pkind = fdp.PickValueInList([int(PageKind.RAW), int(PageKind.ZERO),
                                     fdp.ConsumeInt(4) & 0xFFFFFFFF])
        want = count * page_size if pkind == PageKind.RAW and count <= 4 else 0
        data = fdp.ConsumeBytes(want if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 600))
        return PAGES_HEADER.pack(first & ((1 << 64) - 1), count & 0xFFFFFFFF,
                                 pkind & 0xFFFFFFFF) + data
    obj: dict[str, Any] = {}
    if kind == SectionType.HELLO or choice == 2:
        obj = {"migration": "mig-fuzz", "vm": "vm0",
               "memory_size": fdp.PickValueInList([1 << 16, 1 << 20, 4095, 1 << 40]),
               "page_size": fdp.PickValueInList([4096, 512, 65536, 1024])}
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            obj[fdp.PickValueInList(["migration", "vm", "memory_size", "page_size",
                                     "extra"])] = _json_value(fdp)
    else:
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            obj[fdp.ConsumeUnicodeNoSurrogates(6)] = _json_value(fdp)
    try:
        raw = json.dumps(obj, separators=(",", ":")).encode()
    except ValueError:
        raw = b"{}"
    if choice == 3 and raw:  # a JSON payload with one byte changed
        pos = fdp.ConsumeIntInRange(0, len(raw) - 1)
        raw = raw[:pos] + bytes([fdp.ConsumeIntInRange(0, 255)]) + raw[pos + 1:]
    return raw


def setup() -> Callable[[bytes], None]:
    stats = Stats(TARGET)
    kinds = [int(k) for k in SectionType]

    def test_one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        direction = fdp.PickValueInList(list(Direction))
        stats.add("inputs")
        stream = bytearray()
        if fdp.ConsumeIntInRange(0, 7):
            stream += PREAMBLE.pack(MAGIC, VERSION, 0)
        else:
            stream += PREAMBLE.pack(fdp.ConsumeBytes(8).ljust(8, b"\0"),
                                    fdp.ConsumeIntInRange(0, 3), fdp.ConsumeIntInRange(0, 3))
        page_size, pages = 4096, 16
        for seq in range(fdp.ConsumeIntInRange(0, 8)):
            kind = fdp.PickValueInList(kinds) if fdp.ConsumeIntInRange(0, 9) else \
                fdp.ConsumeIntInRange(0, 255)
            if seq == 0 and direction is Direction.SOURCE_TO_DESTINATION and fdp.ConsumeBool():
                kind = int(SectionType.HELLO)
            payload = _payload(fdp, kind, page_size, pages)
            if kind == SectionType.HELLO:
                try:
                    obj = json.loads(payload)
                    page_size = int(obj["page_size"]) if 512 <= obj["page_size"] <= 65536 \
                        else page_size
                    pages = -(-int(obj["memory_size"]) // page_size)
                except (ValueError, TypeError, KeyError, ZeroDivisionError, OverflowError):
                    pass
            mutate = fdp.ConsumeIntInRange(0, 15)
            stream += _frame(kind, seq + (1 if mutate == 1 else 0), payload,
                             flags=1 if mutate == 2 else 0, reserved=1 if mutate == 3 else 0,
                             length=len(payload) + 1 if mutate == 4 else
                             (1 << 31 if mutate == 5 else None), bad_crc=mutate == 6)
        stream += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
        _decode(direction, bytes(stream), fdp, stats)
        stats.tick()

    return test_one


def _decode(direction: Direction, stream: bytes, fdp: Any, stats: Stats) -> None:
    decoder = StreamDecoder(direction)
    image: bytearray | None = None
    sections = []
    pos = 0
    failed: StreamError | None = None
    try:
        while pos < len(stream):
            step = fdp.ConsumeIntInRange(1, 64) if fdp.remaining_bytes() else len(stream)
            got = decoder.feed(stream[pos:pos + step])
            pos += step
            for section in got:
                sections.append(section)
                image = _apply(decoder, section, image, stats)
        decoder.close()
    except StreamError as exc:
        failed = exc
    except Violation:
        raise
    except Exception as exc:
        stats.flush()
        raise Violation(f"the decoder raised {exc!r}, not a StreamError") from exc
    if [s.seq for s in sections] != list(range(len(sections))):
        raise Violation(f"sections out of sequence: {[s.seq for s in sections]}")
    stats.add("sections", len(sections))
    stats.add("stream_checks")  # the sequence, and each section against HELLO
    if failed is None:
        stats.add("processed")
        if decoder.finished:
            stats.add("finished_streams")
        return
    stats.add("rejected")
    stats.add(f"error_{type(failed).__name__}")
    try:
        decoder.feed(b"\0")
    except StreamError:
        pass
    except Exception as exc:
        raise Violation(f"a failed decoder raised {exc!r}") from exc
    else:
        raise Violation("a failed decoder took more input")


def _apply(decoder: StreamDecoder, section: Any, image: bytearray | None,
           stats: Stats) -> bytearray | None:
    """The loader: check a section against HELLO and write its pages into the image."""
    if section.type is SectionType.HELLO:
        if decoder.direction is not Direction.SOURCE_TO_DESTINATION or section.seq != 0:
            raise Violation(f"HELLO accepted at seq {section.seq} in {decoder.direction}")
        size = int(section.json["memory_size"])
        return bytearray(size) if size <= MAX_IMAGE else None
    if section.type is not SectionType.PAGES:
        if not isinstance(section.json, dict):
            raise Violation(f"{section.type.name} without a JSON object")
        return image
    ps, pages = decoder.page_size, decoder.pages
    if ps is None or pages is None:
        raise Violation("PAGES accepted before HELLO")
    if section.count < 1 or section.first_page + section.count > pages:
        raise Violation(f"PAGES {section.first_page}+{section.count} beyond {pages} pages")
    expect = section.count * ps if section.kind is PageKind.RAW else 0
    if section.data.nbytes != expect:
        raise Violation(f"PAGES {section.kind} carries {section.data.nbytes} bytes, "
                        f"expected {expect}")
    stats.add("pages_applied", section.count)
    if image is not None:
        start = section.first_page * ps
        end = start + section.count * ps
        if end > len(image) + ps - 1:  # the last page may be partial
            raise Violation(f"pages end at {end}, past the {len(image)}-byte memory")
        if section.kind is PageKind.RAW:
            image[start:min(end, len(image))] = section.data[:min(end, len(image)) - start]
        else:
            image[start:min(end, len(image))] = bytes(min(end, len(image)) - start)
    return image



if __name__ == "__main__":
    fuzzlib.main(TARGET, setup)
