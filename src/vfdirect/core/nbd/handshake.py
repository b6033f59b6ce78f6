"""The server side of the NBD fixed newstyle handshake, sans-IO.

The shell feeds whatever the socket gave to :meth:`ServerHandshake.receive`, sends
:meth:`ServerHandshake.data_to_send`, and watches :attr:`ServerHandshake.phase`:

* ``TRANSMISSION``: an export was chosen (``NBD_OPT_EXPORT_NAME`` or ``NBD_OPT_GO``);
  :attr:`export` says which, :meth:`take_rest` hands over the bytes the client already
  sent for the transmission phase;
* ``CLOSED``: the session must end once the pending bytes are sent (``NBD_OPT_ABORT``,
  or ``NBD_OPT_EXPORT_NAME`` of an export that does not exist, which cannot be refused
  with an error reply); :attr:`close_reason` says why.

A client breaking a mandatory rule (unknown client flags, a bad option magic) makes
:meth:`receive` raise :class:`NbdProtocolError`: the shell drops the connection (a hard
disconnect, which the protocol allows). Options the server does not implement are
answered ``NBD_REP_ERR_UNSUP`` (``STARTTLS``, ``STRUCTURED_REPLY``, metadata contexts,
extended headers, anything unknown); options whose data is longer than
``max_option_data`` are skipped and answered ``NBD_REP_ERR_TOO_BIG``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vfdirect.core.nbd.constants import (
    CLIENT_FLAGS_KNOWN,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    InfoType,
    Option,
    OptionReply,
)
from vfdirect.core.nbd.errors import NbdProtocolError

__all__ = [
    "MAX_NAME_BYTES",
    "ExportInfo",
    "HandshakePhase",
    "ServerHandshake",
    "encode_option",
]

#: The protocol's limit on strings (export names, messages).
MAX_NAME_BYTES = 4096
_OPTION_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QII")


@dataclass(frozen=True)
class ExportInfo:
    """What the server says about one export (``NBD_INFO_EXPORT``, ``NBD_INFO_BLOCK_SIZE``)."""

    name: str
    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 << 20
    description: str = ""

    def __post_init__(self) -> None:
        if not (1 <= self.min_block <= 1 << 16) or self.min_block & (self.min_block - 1):
            raise ValueError(f"minimum block size {self.min_block} is not a power of two "
                             f"from 1 to 64 KiB")
        if self.preferred_block < self.min_block or \
                self.preferred_block & (self.preferred_block - 1):
            raise ValueError(f"preferred block size {self.preferred_block} is not a power "
                             f"of two at least the minimum")
        if self.max_block < self.min_block or self.max_block % self.min_block or \
                self.max_block >= 1 << 32:
            raise ValueError(f"maximum block size {self.max_block} is not a multiple of "
                             f"{self.min_block} below 2^32")
        if not 0 <= self.size < 1 << 64 or not 0 <= self.flags < 1 << 16:
            raise ValueError("size or flags out of range")


class HandshakePhase(enum.Enum):
    CLIENT_FLAGS = "client_flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


def encode_option(option: int, data: bytes = b"") -> bytes:
    """A client option (tests, clients)."""
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def _reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply) + \
        struct.pack(">I", len(data)) + data


class ServerHandshake:
    """One connection's handshake; ``lookup(name)`` gives the export of that name (or
    ``None``), ``names()`` the exports ``NBD_OPT_LIST`` shows."""

    def __init__(self, lookup: Callable[[str], ExportInfo | None],
                 names: Callable[[], Sequence[str]], *, max_option_data: int = 65536) -> None:
        self._lookup = lookup
        self._names = names
        self._max_option_data = max_option_data
        self._buf = bytearray()
        self._out = bytearray(struct.pack(
            ">QQH", NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        self.phase = HandshakePhase.CLIENT_FLAGS
        self.export: ExportInfo | None = None
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.close_reason: str | None = None
        #: options handled, by name (for logs)
        self.options: list[str] = []
        self._skip = 0
        self._skip_option = 0

    # -- driving --------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def take_rest(self) -> bytes:
        """The bytes received after the option that entered transmission."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def receive(self, data: bytes) -> None:
        """Consume client bytes; may raise :class:`NbdProtocolError`."""
        self._buf += data
        while True:
            if self.phase == HandshakePhase.CLIENT_FLAGS:
                if len(self._buf) < 4:
                    return
                (flags,) = struct.unpack_from(">I", self._buf)
                del self._buf[:4]
                if flags & ~CLIENT_FLAGS_KNOWN:
                    raise NbdProtocolError(f"unknown client flags {flags:#x}")
                self.fixed_newstyle = bool(flags & ClientFlag.FIXED_NEWSTYLE)
                self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
                self.phase = HandshakePhase.OPTIONS
            elif self.phase == HandshakePhase.OPTIONS:
                if not self._step_option():
                    return
            else:
                return

    def _step_option(self) -> bool:
        buf = self._buf
        if self._skip:
            n = min(self._skip, len(buf))
            del buf[:n]
            self._skip -= n
            if self._skip:
                return False
            self._error(self._skip_option, OptionReply.ERR_TOO_BIG,
                        f"option data longer than {self._max_option_data} bytes")
            return True
        if len(buf) < _OPTION_HEADER.size:
            return False
        magic, option, length = _OPTION_HEADER.unpack_from(buf)
        if magic != IHAVEOPT:
            raise NbdProtocolError(f"bad option magic {magic:#018x}")
        if length > self._max_option_data:
            del buf[:_OPTION_HEADER.size]
            self._skip, self._skip_option = length, option
            self.options.append(_option_name(option))
            return True
        end = _OPTION_HEADER.size + length
        if len(buf) < end:
            return False
        data = bytes(buf[_OPTION_HEADER.size:end])
        del buf[:end]
        self.options.append(_option_name(option))
        self._option(option, data)
        return True

    # -- options --------------------------------------------------------------------------

    def _option(self, option: int, data: bytes) -> None:
        if option == Option.EXPORT_NAME:
            self._export_name(data)
        elif option == Option.ABORT:
            self._out += _reply(option, OptionReply.ACK)
            self._close("the client sent NBD_OPT_ABORT")
        elif option == Option.LIST:
            if data:
                self._error(option, OptionReply.ERR_INVALID, "NBD_OPT_LIST takes no data")
                return
            for name in self._names():
                raw = name.encode()
                self._out += _reply(option, OptionReply.SERVER, struct.pack(">I", len(raw)) + raw)
            self._out += _reply(option, OptionReply.ACK)
        elif option in (Option.INFO, Option.GO):
            self._info(option, data)
        elif option == Option.STRUCTURED_REPLY:
            self._error(option, OptionReply.ERR_UNSUP,
                        "structured replies are not implemented: simple replies only")
        elif option == Option.STARTTLS:
            self._error(option, OptionReply.ERR_UNSUP, "TLS is not supported")
        else:
            self._error(option, OptionReply.ERR_UNSUP, f"option {option} is not supported")

    def _export_name(self, data: bytes) -> None:
        name = _decode_name(data)
        export = None if name is None else self._lookup(name)
        if export is None:
            # This option cannot be answered with an error: the session must end.
            self._close(f"NBD_OPT_EXPORT_NAME of an unknown export {data[:64]!r}")
            return
        self._out += struct.pack(">QH", export.size, export.flags)
        if not self.no_zeroes:
            self._out += bytes(124)
        self._enter(export)

    def _info(self, option: int, data: bytes) -> None:
        if len(data) < 6:
            self._error(option, OptionReply.ERR_INVALID, "option data too short")
            return
        (name_len,) = struct.unpack_from(">I", data)
        if name_len > len(data) - 6:
            self._error(option, OptionReply.ERR_INVALID, "name length beyond the option")
            return
        raw = data[4:4 + name_len]
        (count,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count:
            self._error(option, OptionReply.ERR_INVALID,
                        f"{count} information requests do not fill the option")
            return
        requests = set(struct.unpack_from(f">{count}H", data, 6 + name_len))
        name = _decode_name(raw)
        if name is None:
            self._error(option, OptionReply.ERR_INVALID, "export name is not a valid string")
            return
        export = self._lookup(name)
        if export is None:
            self._error(option, OptionReply.ERR_UNKNOWN, f"no export named {name!r}")
            return
        self._out += _reply(option, OptionReply.INFO, struct.pack(
            ">HQH", InfoType.EXPORT, export.size, export.flags))
        if InfoType.NAME in requests:
            self._out += _reply(option, OptionReply.INFO,
                                struct.pack(">H", InfoType.NAME) + export.name.encode())
        if InfoType.DESCRIPTION in requests and export.description:
            self._out += _reply(option, OptionReply.INFO, struct.pack(
                ">H", InfoType.DESCRIPTION) + export.description.encode()[:MAX_NAME_BYTES])
        # Sent whether asked or not (the protocol allows it): clients learn the alignment.
        self._out += _reply(option, OptionReply.INFO, struct.pack(
            ">HIII", InfoType.BLOCK_SIZE, export.min_block, export.preferred_block,
            export.max_block))
        self._out += _reply(option, OptionReply.ACK)
        if option == Option.GO:
            self._enter(export)

    # -- outcomes -------------------------------------------------------------------------

    def _error(self, option: int, reply: OptionReply, message: str) -> None:
        self._out += _reply(option, reply, message.encode()[:MAX_NAME_BYTES])

    def _enter(self, export: ExportInfo) -> None:
        self.export = export
        self.phase = HandshakePhase.TRANSMISSION

    def _close(self, why: str) -> None:
        self.close_reason = why
        self.phase = HandshakePhase.CLOSED


def _decode_name(raw: bytes) -> str | None:
    if len(raw) > MAX_NAME_BYTES or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _option_name(option: int) -> str:
    try:
        return Option(option).name
    except ValueError:
        return str(option)
