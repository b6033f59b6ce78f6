"""A streaming vhost-user parser (sans-IO, after h11): fed bytes and the fds that came
with them, it returns whole messages.

Rules of this module:

* the shell calls :meth:`MessageParser.feed` with whatever one ``recvmsg`` returned: the
  bytes and the SCM_RIGHTS fds. Bytes may arrive in any chunking;
* fds are attached to a message by position. The sender passes a message's fds with
  the ``sendmsg`` that carries the whole message (QEMU does), and a Unix stream read
  returns them with the read holding that message's first byte; a read may glue
  fd-less data *before* such a message, but stops right after it (Linux
  ``unix_stream_read_generic``). So the fds of one ``feed`` belong to the LAST message
  that starts within that chunk; fds with a chunk in which no message starts are an
  error;
* any malformed input raises :class:`~vfdirect.core.vhost.messages.VhostUserProtocolError`
  whose ``fds`` lists every fd the parser still held (the caller closes them); the
  parser is then dead and raises again on further use. Nothing else escapes;
* :meth:`MessageParser.close` reports a message cut short by the end of the stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from vfdirect.core.vhost.messages import (
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD_SIZE,
    Channel,
    VhostUserMessage,
    VhostUserProtocolError,
    decode_body,
    decode_header,
)

__all__ = ["MessageParser"]


class MessageParser:
    """Turns a byte stream plus fds into :class:`VhostUserMessage` s for one channel."""

    def __init__(self, channel: Channel, *, max_payload: int = MAX_PAYLOAD_SIZE) -> None:
        self._channel = channel
        self._max_payload = max_payload
        self._buffer = bytearray()
        self._consumed = 0  # stream offset of self._buffer[0]
        # (chunk start offset, chunk end offset, fds), in stream order
        self._fd_groups: deque[tuple[int, int, tuple[int, ...]]] = deque()
        self._header: tuple[int, int, int] | None = None
        self._dead: VhostUserProtocolError | None = None

    @property
    def channel(self) -> Channel:
        return self._channel

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned message."""
        return len(self._buffer)

    def held_fds(self) -> tuple[int, ...]:
        """Fds received but not yet handed out with a message."""
        return tuple(fd for _, _, group in self._fd_groups for fd in group)

    def _fail(self, message: str, fds: tuple[int, ...] = ()) -> VhostUserProtocolError:
        held = tuple(dict.fromkeys(fds + self.held_fds()))
        self._fd_groups.clear()
        self._dead = VhostUserProtocolError(message, fds=held)
        return self._dead

    def feed(self, data: bytes | bytearray | memoryview,
             fds: Sequence[int] = ()) -> list[VhostUserMessage]:
        """Add received bytes and fds; return the messages now complete. When this raises,
        messages completed earlier in the same call are dropped (the connection is done
        for) and their fds are in the error's ``fds`` too."""
        messages: list[VhostUserMessage] = []
        try:
            return self._feed(data, fds, messages)
        except VhostUserProtocolError as exc:
            if messages:
                exc.fds = tuple(dict.fromkeys(
                    exc.fds + tuple(fd for m in messages for fd in m.fds)))
            raise

    def _feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int],
              messages: list[VhostUserMessage]) -> list[VhostUserMessage]:
        if self._dead is not None:
            raise VhostUserProtocolError(f"parser already failed: {self._dead}",
                                         fds=tuple(fds))
        chunk = bytes(data)
        if fds:
            if not chunk:
                raise self._fail("file descriptors arrived without data", tuple(fds))
            start = self._consumed + len(self._buffer)
            self._fd_groups.append((start, start + len(chunk), tuple(fds)))
        self._buffer += chunk
        while True:
            if self._header is None:
                if len(self._buffer) < HEADER_SIZE:
                    break
                try:
                    self._header = decode_header(bytes(self._buffer[:HEADER_SIZE]),
                                                 self._channel,
                                                 max_payload=self._max_payload)
                except VhostUserProtocolError as exc:
                    raise self._fail(str(exc)) from exc
            request, flags, size = self._header
            total = HEADER_SIZE + size
            if len(self._buffer) < total:
                break
            start = self._consumed
            own: list[int] = []
            while self._fd_groups and self._fd_groups[0][0] <= start:
                _, chunk_end, group = self._fd_groups[0]
                if chunk_end <= start:
                    raise self._fail("file descriptors arrived with data that starts no "
                                     "message")
                if start + total < chunk_end:
                    break  # another message starts later in that chunk: the fds are its
                own.extend(group)
                self._fd_groups.popleft()
            if len(own) > MAX_FDS:
                raise self._fail(f"{len(own)} fds with one message (max {MAX_FDS})",
                                 tuple(own))
            body = bytes(self._buffer[HEADER_SIZE:total])
            del self._buffer[:total]
            self._consumed += total
            self._header = None
            try:
                messages.append(decode_body(self._channel, request, flags, body, tuple(own)))
            except VhostUserProtocolError as exc:
                raise self._fail(str(exc), tuple(own)) from exc
        return messages

    def close(self) -> None:
        """The stream ended: raise if a message was cut short or fds are left over."""
        if self._dead is not None:
            return
        if self._buffer or self._fd_groups:
            raise self._fail(f"stream ended inside a message ({len(self._buffer)} bytes "
                             "buffered)")
