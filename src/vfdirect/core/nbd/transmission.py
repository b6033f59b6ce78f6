"""The NBD transmission phase, server side, sans-IO: request decoding, request checks,
simple replies.

:class:`RequestDecoder` turns the client's byte stream into :class:`Request` objects
(``NBD_CMD_WRITE`` with its payload). A write whose payload is longer than
``max_payload`` is not buffered: the payload is read and thrown away, and the request
comes out with ``discarded=True`` so the server can answer ``EINVAL`` and keep the stream
in step. A bad request magic raises :class:`NbdProtocolError` (the stream cannot be
resynchronised: the server drops the client).

:func:`check_request` says which error a request gets before it reaches the disk
(``Errno.OK`` when it may go ahead): unsupported commands or flags, lengths above the
maximum block size, offsets or lengths not aligned to the minimum block size (the
protocol lets a server that advertised a minimum answer ``EINVAL``), and ranges beyond
the end (``EINVAL`` for reads, ``ENOSPC`` for writes).

Only simple replies are used (structured replies are refused during the handshake): a
failed read is answered with the error and no data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vfdirect.core.nbd.constants import (
    REQUEST_HEADER_SIZE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    CommandFlag,
    CommandType,
    Errno,
    TransmissionFlag,
)
from vfdirect.core.nbd.errors import NbdProtocolError
from vfdirect.core.nbd.handshake import ExportInfo

__all__ = [
    "Request",
    "RequestDecoder",
    "check_request",
    "encode_request",
    "simple_reply",
]

_HEADER = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


@dataclass(frozen=True)
class Request:
    """One transmission request."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    payload: bytes | None = None
    #: a write payload longer than the decoder's limit, read and dropped
    discarded: bool = False

    @property
    def name(self) -> str:
        try:
            return CommandType(self.type).name
        except ValueError:
            return str(self.type)


def encode_request(type: int, cookie: int, offset: int, length: int, *, flags: int = 0,
                   payload: bytes = b"") -> bytes:
    """A client request (tests, clients)."""
    return _HEADER.pack(REQUEST_MAGIC, flags, type, cookie, offset, length) + payload


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """The header of a simple reply (a successful read's data follows it)."""
    return _REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


class RequestDecoder:
    """Incremental request decoder."""

    def __init__(self, max_payload: int) -> None:
        if max_payload < 0:
            raise ValueError("max_payload must not be negative")
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0
        self._header: tuple[int, int, int, int, int] | None = None
        self._skip = 0
        self.requests = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of a request."""
        return len(self._buf) - self._pos

    @property
    def idle(self) -> bool:
        """Whether the stream is at a request boundary (nothing partial)."""
        return self.buffered == 0 and self._header is None and not self._skip

    def feed(self, data: bytes) -> list[Request]:
        """Consume bytes; returns the requests completed. Raises
        :class:`NbdProtocolError` on a bad magic."""
        out: list[Request] = []
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._buf += data
        buf = self._buf
        while True:
            if self._skip:
                n = min(self._skip, len(buf) - self._pos)
                self._skip -= n
                self._pos += n
                if self._skip:
                    break
            avail = len(buf) - self._pos
            if self._header is None:
                if avail < REQUEST_HEADER_SIZE:
                    break
                magic, flags, type_, cookie, offset, length = _HEADER.unpack_from(buf, self._pos)
                if magic != REQUEST_MAGIC:
                    raise NbdProtocolError(f"bad request magic {magic:#010x}")
                self._pos += REQUEST_HEADER_SIZE
                avail -= REQUEST_HEADER_SIZE
                if type_ != CommandType.WRITE:
                    out.append(Request(flags, type_, cookie, offset, length))
                    self.requests += 1
                    continue
                if length > self.max_payload:
                    self._skip = length
                    out.append(Request(flags, type_, cookie, offset, length, discarded=True))
                    self.requests += 1
                    continue
                self._header = (flags, type_, cookie, offset, length)
            flags, type_, cookie, offset, length = self._header
            if avail < length:
                break
            payload = bytes(buf[self._pos:self._pos + length])
            self._pos += length
            self._header = None
            out.append(Request(flags, type_, cookie, offset, length, payload))
            self.requests += 1
        if self._pos:
            del buf[:self._pos]
            self._pos = 0
        return out


def check_request(request: Request, export: ExportInfo) -> Errno:
    """The error ``request`` gets before any IO, or ``Errno.OK``."""
    kind = request.type
    flags = request.flags
    allowed = 0
    if export.flags & TransmissionFlag.SEND_FUA:
        allowed |= CommandFlag.FUA
    if kind == CommandType.WRITE_ZEROES:
        if not export.flags & TransmissionFlag.SEND_WRITE_ZEROES:
            return Errno.EINVAL
        allowed |= CommandFlag.NO_HOLE
    elif kind == CommandType.FLUSH:
        return Errno.OK if export.flags & TransmissionFlag.SEND_FLUSH and \
            not flags & ~allowed else Errno.EINVAL
    elif kind == CommandType.DISC:
        return Errno.OK
    elif kind not in (CommandType.READ, CommandType.WRITE):
        return Errno.EINVAL
    if flags & ~allowed:
        return Errno.EINVAL
    if request.discarded:
        return Errno.EINVAL
    writing = kind != CommandType.READ
    if writing and export.flags & TransmissionFlag.READ_ONLY:
        return Errno.EPERM
    if kind != CommandType.WRITE_ZEROES and request.length > export.max_block:
        return Errno.EINVAL
    if request.offset + request.length > export.size:
        return Errno.ENOSPC if writing else Errno.EINVAL
    if request.offset % export.min_block or request.length % export.min_block:
        return Errno.EINVAL
    return Errno.OK
