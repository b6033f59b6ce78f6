"""The live-migration stream: framing, section payloads and ordering (pure, sans-IO).

One TCP connection carries a migration; both directions use this framing. Nothing here
touches a socket: the shell sends what :class:`StreamEncoder` returns and passes what it
receives to :meth:`StreamDecoder.feed`, which returns whole, checked :class:`Section` s.

Wire format (all integers little-endian):

* **Preamble** (12 bytes, once per direction): :data:`MAGIC` ``b"VFDMIG\\r\\n"``, u16
  version (:data:`VERSION` = 1), u16 flags (0). A wrong magic is
  :class:`BadPreamble` ("not a vfdirect migration stream"), another version
  :class:`UnsupportedVersion` (naming both versions), nonzero flags :class:`BadPreamble`.
* **Sections**, each a 16-byte header ``<BBHIII`` then ``length`` payload bytes:
  type u8 (:class:`SectionType`), flags u8 (0), reserved u16 (0), seq u32 (0 for the first
  section of a direction, +1 per section), length u32 (at most :data:`MAX_PAYLOAD`,
  16 MiB), crc u32 = ``zlib.crc32`` over the header's first 12 bytes and the payload.
* **JSON sections** (every type but PAGES): a compact UTF-8 JSON object. HELLO must have
  ``migration`` (non-empty str), ``vm`` (non-empty str), ``memory_size`` (int > 0) and
  ``page_size`` (a power of two, 512..65536); other keys are free and returned as sent.
* **PAGES**: a 16-byte sub-header ``<QII`` first_page u64, count u32 (>= 1), kind u32
  (:class:`PageKind`: 0 RAW, ``count * page_size`` bytes of page data follow; 1 ZERO, no
  data: the pages are all zero). ``first_page + count`` must not pass the last page of
  HELLO's memory (``ceil(memory_size / page_size)`` pages).

Ordering (:class:`Direction`; :class:`UnexpectedSection` otherwise):

* ``source-to-destination``: HELLO first; then PAGES, ROUND and STATE in any order; then
  END; after END only COMMIT or ABORT. ABORT is allowed at any time (even first). Nothing
  may follow COMMIT or ABORT.
* ``destination-to-source``: ROUND (the echo of a source's ROUND: everything before it
  is applied), READY, DONE, ERROR and ABORT only; ROUND only before READY, READY at most
  once, DONE only after READY; nothing may follow DONE, ERROR or ABORT.

Checks happen in this order: a header announcing more than :data:`MAX_PAYLOAD` fails as
soon as the header is in (:class:`SectionTooLarge`); once the whole section is in, the
checksum (:class:`ChecksumMismatch`), then the header fields (:class:`MalformedSection`),
the sequence number (:class:`SequenceError`), the order (:class:`UnexpectedSection`) and
the payload (:class:`MalformedSection`). Every error is a :class:`StreamError`; after one
the decoder refuses further input. Whether a stream ended early (END missing) is the
caller's to judge with :attr:`StreamDecoder.finished`; :meth:`StreamDecoder.close` raises
:class:`TruncatedStream` if a partial preamble or section is left over.

The encoder raises :class:`ValueError` for misuse (a payload over the limit, PAGES before
HELLO or outside the memory, data of the wrong length, and, given a direction, a section
out of order): a caller bug, never the peer's. :meth:`StreamEncoder.pages_header` returns
only the headers so page data can go out with ``sendmsg([header, data])`` uncopied.
The decoder keeps one bytearray and an offset (compacted every MiB), copies each payload
once and checksums with ``zlib.crc32``: linear in the bytes received, however chunked.
"""

from __future__ import annotations

import json as _json
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_PAYLOAD",
    "MAX_SEQ",
    "PAGES_HEADER",
    "PREAMBLE",
    "VERSION",
    "BadPreamble",
    "ChecksumMismatch",
    "Direction",
    "MalformedSection",
    "PageKind",
    "Section",
    "SectionTooLarge",
    "SectionType",
    "SequenceError",
    "StreamDecoder",
    "StreamEncoder",
    "StreamError",
    "TruncatedStream",
    "UnexpectedSection",
    "UnsupportedVersion",
    "validate_hello",
]

MAGIC = b"VFDMIG\r\n"
VERSION = 1
PREAMBLE = struct.Struct("<8sHH")
HEADER = struct.Struct("<BBHIII")
PAGES_HEADER = struct.Struct("<QII")
MAX_PAYLOAD = 16 * 1024 * 1024
MAX_SEQ = 0xFFFFFFFF
_MIN_PAGE = 512
_MAX_PAGE = 65536
_U64 = 0xFFFFFFFFFFFFFFFF
#: The decoder compacts its buffer once this many consumed bytes sit at its front.
_COMPACT_AT = 1 << 20


class SectionType(IntEnum):
    HELLO = 1
    PAGES = 2
    ROUND = 3
    STATE = 4
    END = 5
    READY = 6
    COMMIT = 7
    DONE = 8
    ABORT = 9
    ERROR = 10


class PageKind(IntEnum):
    RAW = 0
    ZERO = 1


class Direction(StrEnum):
    SOURCE_TO_DESTINATION = "source-to-destination"
    DESTINATION_TO_SOURCE = "destination-to-source"


_S2D_TYPES = frozenset({SectionType.HELLO, SectionType.PAGES, SectionType.ROUND,
                        SectionType.STATE, SectionType.END, SectionType.COMMIT,
                        SectionType.ABORT})
_D2S_TYPES = frozenset({SectionType.READY, SectionType.DONE, SectionType.ERROR,
                        SectionType.ABORT, SectionType.ROUND})


class StreamError(Exception):
    """The peer's bytes break the stream rules. ``sections`` holds the sections the failing
    :meth:`StreamDecoder.feed` call decoded before the error (they are valid)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.sections: list[Section] = []


class BadPreamble(StreamError):
    """The first 12 bytes are not a vfdirect migration preamble we accept."""


class UnsupportedVersion(BadPreamble):
    def __init__(self, version: int) -> None:
        super().__init__(f"migration stream version {version} is not supported "
                         f"(this side speaks version {VERSION})")
        self.version = version


class ChecksumMismatch(StreamError):
    def __init__(self, seq: int, expected: int, actual: int) -> None:
        super().__init__(f"section seq {seq}: checksum mismatch (header says "
                         f"{expected:#010x}, data gives {actual:#010x})")
        self.seq = seq


class SequenceError(StreamError):
    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"section seq {got} out of order (expected {expected})")
        self.expected = expected
        self.got = got


class SectionTooLarge(StreamError):
    def __init__(self, seq: int, length: int) -> None:
        super().__init__(f"section seq {seq} announces {length} payload bytes, more than "
                         f"the {MAX_PAYLOAD} allowed")
        self.length = length


class UnexpectedSection(StreamError):
    """A section of a type not allowed here (wrong direction or out of order)."""


class MalformedSection(StreamError):
    """A section whose header fields or payload break the format."""


class TruncatedStream(StreamError):
    """The stream ended inside the preamble or a section."""


@dataclass(frozen=True)
class Section:
    """One checked section. JSON sections have ``fields`` (the object, see :attr:`json`);
    PAGES sections have ``first_page``, ``count``, ``kind`` and ``data`` (a read-only view
    of ``payload`` past the sub-header; empty for ZERO pages)."""

    type: SectionType
    seq: int
    payload: bytes = field(repr=False)
    fields: dict[str, Any] | None = field(default=None, hash=False)
    first_page: int = 0
    count: int = 0
    kind: PageKind | None = None
    data: memoryview = field(default=memoryview(b""), repr=False, compare=False,
                             hash=False)

    @property
    def json(self) -> dict[str, Any]:
        """The JSON object of a non-PAGES section."""
        if self.fields is None:
            raise TypeError(f"a {self.type.name} section carries no JSON")
        return self.fields


def _check_seq(seq: int) -> None:
    if seq > MAX_SEQ:
        raise ValueError("the stream has run out of sequence numbers")


def validate_hello(obj: dict[str, Any]) -> tuple[int, int]:
    """Check a HELLO object; return ``(memory_size, page_size)``. Raises
    :class:`MalformedSection` naming the offending key."""
    for key in ("migration", "vm"):
        value = obj.get(key)
        if not isinstance(value, str) or not value:
            raise MalformedSection(f"HELLO: {key!r} must be a non-empty string, "
                                   f"got {value!r}")
    size = obj.get("memory_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= _U64:
        raise MalformedSection(f"HELLO: 'memory_size' must be a positive integer, "
                               f"got {size!r}")
    page = obj.get("page_size")
    if (not isinstance(page, int) or isinstance(page, bool) or page & (page - 1)
            or not _MIN_PAGE <= page <= _MAX_PAGE):
        raise MalformedSection(f"HELLO: 'page_size' must be a power of two from "
                               f"{_MIN_PAGE} to {_MAX_PAGE}, got {page!r}")
    return size, page


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _Order:
    """The ordering rules of one direction; :meth:`check` returns why a section type may
    not come now (or None) and :meth:`advance` records that it came."""

    def __init__(self, direction: Direction) -> None:
        self.direction = direction
        self.allowed = (_S2D_TYPES if direction is Direction.SOURCE_TO_DESTINATION
                        else _D2S_TYPES)
        self.seen: set[SectionType] = set()
        self.terminal: SectionType | None = None

    def check(self, kind: SectionType) -> str | None:
        if kind not in self.allowed:
            return f"{kind.name} is not sent {self.direction.value}"
        if self.terminal is not None:
            return f"{kind.name} after {self.terminal.name}"
        if kind is SectionType.ABORT:
            return None
        if self.direction is Direction.SOURCE_TO_DESTINATION:
            seen = self.seen
            if kind is SectionType.HELLO:
                return "a second HELLO" if SectionType.HELLO in seen else None
            if SectionType.HELLO not in seen:
                return f"{kind.name} before HELLO"
            if kind is SectionType.COMMIT:
                return None if SectionType.END in seen else "COMMIT before END"
            if SectionType.END in seen:
                return f"{kind.name} after END"
            return None
        if kind is SectionType.READY and SectionType.READY in self.seen:
            return "a second READY"
        if kind is SectionType.DONE and SectionType.READY not in self.seen:
            return "DONE before READY"
        if kind is SectionType.ROUND and SectionType.READY in self.seen:
            return "ROUND after READY"
        return None

    def advance(self, kind: SectionType) -> None:
        self.seen.add(kind)
        if kind in (SectionType.COMMIT, SectionType.ABORT, SectionType.DONE,
                    SectionType.ERROR):
            self.terminal = kind

    @property
    def finished(self) -> bool:
        if self.direction is Direction.SOURCE_TO_DESTINATION:
            return SectionType.END in self.seen
        return self.terminal is not None


class StreamEncoder:
    """Builds one direction of a stream. ``direction`` (optional) makes the encoder refuse,
    with :class:`ValueError`, sections the peer's decoder would reject for their order;
    misuse (a bad payload, PAGES before HELLO, pages outside the memory) is always a
    :class:`ValueError`. ``bytes_encoded`` counts every byte produced, page data given to
    :meth:`pages_header` included."""

    def __init__(self, direction: Direction | str | None = None) -> None:
        self._order = None if direction is None else _Order(Direction(direction))
        self.next_seq = 0
        self.bytes_encoded = 0
        self.page_size: int | None = None
        self.pages: int | None = None

    def preamble(self) -> bytes:
        self.bytes_encoded += PREAMBLE.size
        return PREAMBLE.pack(MAGIC, VERSION, 0)

    def _header(self, kind: SectionType, length: int, *parts: bytes | memoryview) -> bytes:
        if not isinstance(kind, SectionType):
            raise ValueError(f"{kind!r} is not a section type")
        if length > MAX_PAYLOAD:
            raise ValueError(f"a {length}-byte payload is over the {MAX_PAYLOAD}-byte "
                             f"section limit")
        _check_seq(self.next_seq)
        if self._order is not None:
            why = self._order.check(kind)
            if why is not None:
                raise ValueError(f"cannot send {why}")
            self._order.advance(kind)
        head = HEADER.pack(kind, 0, 0, self.next_seq, length, 0)[:12]
        crc = zlib.crc32(head)
        for part in parts:
            crc = zlib.crc32(part, crc)
        self.next_seq += 1
        self.bytes_encoded += HEADER.size + length
        return head + crc.to_bytes(4, "little")

    def section(self, kind: SectionType, payload: bytes) -> bytes:
        """A whole section. For PAGES prefer :meth:`pages_header` (it checks the payload)."""
        hello = None
        if kind is SectionType.HELLO:
            try:
                obj = _json.loads(payload)
                hello = validate_hello(obj) if isinstance(obj, dict) else None
            except (ValueError, MalformedSection) as exc:
                raise ValueError(f"not a valid HELLO: {exc}") from None
            if hello is None:
                raise ValueError("not a valid HELLO: not a JSON object")
        out = self._header(kind, len(payload), payload) + payload
        if hello is not None:
            self.page_size = hello[1]
            self.pages = -(-hello[0] // hello[1])
        return out

    def json(self, kind: SectionType, obj: dict[str, Any]) -> bytes:
        """A JSON section (compact, UTF-8; NaN and infinities refused). A HELLO object is
        validated and its page size and memory size kept for :meth:`pages_header`."""
        if kind is SectionType.PAGES:
            raise ValueError("PAGES is not a JSON section")
        if not isinstance(obj, dict):
            raise ValueError(f"a {kind.name} section carries a JSON object, "
                             f"not {type(obj).__name__}")
        payload = _json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False).encode()
        hello = None
        if kind is SectionType.HELLO:
            try:
                hello = validate_hello(obj)
            except MalformedSection as exc:
                raise ValueError(str(exc)) from None
        out = self._header(kind, len(payload), payload) + payload
        if hello is not None:
            self.page_size = hello[1]
            self.pages = -(-hello[0] // hello[1])
        return out

    def pages_header(self, first_page: int, count: int,
                     data: bytes | bytearray | memoryview | None) -> bytes:
        """The section header and PAGES sub-header for ``count`` pages from ``first_page``;
        the caller sends ``data`` (``count * page_size`` bytes, RAW) right after them, e.g.
        ``sendmsg([header, data])``. ``data=None`` makes ZERO pages (nothing follows). The
        checksum covers ``data`` as it is now: it must not change until sent (copy live
        guest memory first, or the destination sees a checksum mismatch)."""
        if self.page_size is None or self.pages is None:
            raise ValueError("PAGES before HELLO: the page size is not known yet")
        if count < 1 or first_page < 0 or first_page + count > self.pages:
            raise ValueError(f"pages {first_page}+{count} are outside the memory's "
                             f"{self.pages} pages")
        if data is None:
            sub = PAGES_HEADER.pack(first_page, count, PageKind.ZERO)
            return self._header(SectionType.PAGES, len(sub), sub) + sub
        view = memoryview(data)
        if view.nbytes != count * self.page_size:
            raise ValueError(f"{count} pages of {self.page_size} bytes need "
                             f"{count * self.page_size} bytes of data, got {view.nbytes}")
        sub = PAGES_HEADER.pack(first_page, count, PageKind.RAW)
        return self._header(SectionType.PAGES, PAGES_HEADER.size + view.nbytes,
                            sub, view) + sub

    def zero_pages(self, first_page: int, count: int) -> bytes:
        """A whole PAGES section saying ``count`` pages from ``first_page`` are zero."""
        return self.pages_header(first_page, count, None)


class StreamDecoder:
    """Decodes one direction of a stream, fed in chunks of any size. ``hello`` (the HELLO
    object), ``page_size`` and ``pages`` are set once HELLO is in."""

    def __init__(self, direction: Direction | str) -> None:
        self.direction = Direction(direction)
        self._order = _Order(self.direction)
        self._buf = bytearray()
        self._off = 0
        self._preamble_done = False
        self._failed: StreamError | None = None
        self.next_seq = 0
        self.bytes_fed = 0
        self.hello: dict[str, Any] | None = None
        self.page_size: int | None = None
        self.pages: int | None = None

    @property
    def finished(self) -> bool:
        """``source-to-destination``: END came; ``destination-to-source``: DONE, ERROR or
        ABORT came."""
        return self._order.finished

    @property
    def terminated(self) -> bool:
        """No section may follow (COMMIT, ABORT, DONE or ERROR came)."""
        return self._order.terminal is not None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole section."""
        return len(self._buf) - self._off

    def feed(self, data: bytes | bytearray | memoryview) -> list[Section]:
        """Take the next received bytes; return the sections they complete, in order."""
        if self._failed is not None:
            raise StreamError(f"the stream already failed: {self._failed}")
        self._buf += data
        self.bytes_fed += memoryview(data).nbytes
        out: list[Section] = []
        try:
            if not self._preamble_done and not self._preamble():
                return out
            while True:
                section = self._next()
                if section is None:
                    break
                out.append(section)
        except StreamError as exc:
            exc.sections = out
            self._failed = exc
            raise
        finally:
            if self._off >= _COMPACT_AT or self._off == len(self._buf):
                del self._buf[:self._off]
                self._off = 0
        return out

    def close(self) -> None:
        """The peer closed its side: raise :class:`TruncatedStream` if a partial preamble
        or section is left over."""
        left = self.buffered
        if left and self._failed is None:
            where = "the preamble" if not self._preamble_done else "a section"
            self._failed = TruncatedStream(f"the stream ended inside {where} "
                                           f"({left} bytes left over)")
            raise self._failed

    def _preamble(self) -> bool:
        have = bytes(self._buf[:PREAMBLE.size])
        if not MAGIC.startswith(have[:len(MAGIC)]):
            raise BadPreamble("not a vfdirect migration stream")
        if len(have) < PREAMBLE.size:
            return False
        _, version, flags = PREAMBLE.unpack(have)
        if version != VERSION:
            raise UnsupportedVersion(version)
        if flags:
            raise BadPreamble(f"preamble flags {flags:#06x} are not supported")
        self._off = PREAMBLE.size
        self._preamble_done = True
        return True

    def _next(self) -> Section | None:
        buf, off = self._buf, self._off
        if len(buf) - off < HEADER.size:
            return None
        kind_no, flags, reserved, seq, length, crc = HEADER.unpack_from(buf, off)
        if length > MAX_PAYLOAD:
            raise SectionTooLarge(seq, length)
        end = off + HEADER.size + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            actual = zlib.crc32(view[off + HEADER.size:end],
                                zlib.crc32(view[off:off + 12]))
            if actual != crc:
                raise ChecksumMismatch(seq, crc, actual)
            payload = view[off + HEADER.size:end].tobytes()
        self._off = end
        try:
            kind = SectionType(kind_no)
        except ValueError:
            raise MalformedSection(f"section seq {seq}: unknown type {kind_no}") from None
        if flags or reserved:
            raise MalformedSection(f"section seq {seq} ({kind.name}): flags {flags:#04x} "
                                   f"and reserved {reserved:#06x} must be zero")
        if seq != self.next_seq:
            raise SequenceError(self.next_seq, seq)
        why = self._order.check(kind)
        if why is not None:
            raise UnexpectedSection(f"section seq {seq}: {why} "
                                    f"({self.direction.value})")
        section = self._pages(seq, payload) if kind is SectionType.PAGES \
            else self._json(kind, seq, payload)
        self._order.advance(kind)
        self.next_seq += 1
        return section

    def _json(self, kind: SectionType, seq: int, payload: bytes) -> Section:
        try:
            obj = _json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise MalformedSection(f"section seq {seq} ({kind.name}): payload is not "
                                   f"UTF-8 JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise MalformedSection(f"section seq {seq} ({kind.name}): payload is not a "
                                   f"JSON object")
        if kind is SectionType.HELLO:
            size, page = validate_hello(obj)
            self.hello, self.page_size = obj, page
            self.pages = -(-size // page)
        return Section(kind, seq, payload, fields=obj)

    def _pages(self, seq: int, payload: bytes) -> Section:
        where = f"section seq {seq} (PAGES)"
        if len(payload) < PAGES_HEADER.size:
            raise MalformedSection(f"{where}: {len(payload)} bytes, shorter than the "
                                   f"{PAGES_HEADER.size}-byte pages header")
        first, count, kind_no = PAGES_HEADER.unpack_from(payload)
        assert self.page_size is not None and self.pages is not None  # HELLO came first
        try:
            kind = PageKind(kind_no)
        except ValueError:
            raise MalformedSection(f"{where}: unknown page kind {kind_no}") from None
        if count < 1:
            raise MalformedSection(f"{where}: a count of 0 pages")
        if first + count > self.pages:
            raise MalformedSection(f"{where}: pages {first}+{count} pass the memory's "
                                   f"{self.pages} pages")
        want = count * self.page_size if kind is PageKind.RAW else 0
        got = len(payload) - PAGES_HEADER.size
        if got != want:
            raise MalformedSection(f"{where}: {kind.name} pages {first}+{count} carry "
                                   f"{got} bytes of data, expected {want}")
        data = memoryview(payload)[PAGES_HEADER.size:]
        return Section(SectionType.PAGES, seq, payload, first_page=first, count=count,
                       kind=kind, data=data)
