"""The VM's vhost-user front end (shell): it connects to its VF's socket, hands the VF
the guest memory (SCM_RIGHTS) and the virtqueues, kicks and waits.

Handshake (the order QEMU's vhost-user front end uses, driven by the sans-IO procedures
of :mod:`vfdirect.core.vhost.frontend` and :mod:`vfdirect.core.guest.frontend`):

1. connect (retrying until a deadline while the socket is missing or refuses: the VF
   may not be assigned to this process yet);
2. ``negotiate``: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (MQ,
   REPLY_ACK, CONFIG), GET_QUEUE_NUM, SET_OWNER;
3. GET_CONFIG: the virtio-scsi configuration (num_queues, cdb_size, sense_size,
   max_target...); defaults when the back end has no CONFIG;
4. ``start_device``: SET_FEATURES, SET_MEM_TABLE (one region: the whole memory file,
   guest-physical 0, fd by SCM_RIGHTS), then per vring SET_VRING_NUM, SET_VRING_BASE,
   SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL (eventfds by SCM_RIGHTS),
   SET_VRING_ENABLE.

Reconnect rule: every vring's base is the ``used.idx`` found in guest memory (the back
end completes every request it took before it drops a connection, so ``used.idx`` is
the available index it must resume from). A fresh guest and a restarted VM process
follow the same rule. It holds only if the device side completed, in its used ring,
everything it fetched: for a VM process started on a COPY of the memory (a migration's
destination) the copy must be taken after the source VF was quiesced and drained (or
after the mediated path finished what it fetched); requests published but never fetched
are then fetched by the new VF from there, exactly once.

Notifications: a kick is an 8-byte write of 1 to the vring's kick eventfd; the back
end's used-buffer notifications arrive on the call eventfds (non-blocking), which
:meth:`VhostUserFrontend.wait` sleeps on with ``poll(2)``, together with the socket so
that a back end that goes away wakes us.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import time
from collections.abc import Callable, Generator, Iterable
from typing import TypeVar, cast

from vfdirect.core.guest.frontend import (
    WANTED_FEATURES,
    WANTED_PROTOCOL_FEATURES,
    check_negotiated,
    read_config,
    request_queue_count,
)
from vfdirect.core.vhost.frontend import (
    FrontendVring,
    Negotiated,
    expects_reply,
    negotiate,
    start_device,
)
from vfdirect.core.vhost.messages import (
    MAX_FDS,
    Channel,
    MemoryRegionDesc,
    VhostUserMessage,
    VhostUserProtocolError,
)
from vfdirect.core.vhost.parser import MessageParser
from vfdirect.core.virtio.features import VirtioFeature, has
from vfdirect.core.virtio.scsi import CONTROLQ, EVENTQ, REQUESTQ_BASE, VirtioScsiConfig
from vfdirect.vm.guest import Guest

__all__ = ["ConnectError", "Disconnected", "VhostUserFrontend"]

_ONE = (1).to_bytes(8, "little")
_T = TypeVar("_T")


class ConnectError(Exception):
    """The VF could not be reached or refused this front end (before the deadline)."""


class Disconnected(Exception):
    """The back end closed the connection."""


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class VhostUserFrontend:
    """One connection to one VF (a vhost-user-scsi back end)."""

    def __init__(self, path: str | os.PathLike[str], *, io_timeout: float = 10.0) -> None:
        self.path = str(path)
        self.io_timeout = io_timeout
        self._sock: socket.socket | None = None
        self._parser: MessageParser | None = None
        self._kick: dict[int, int] = {}
        self._call: dict[int, int] = {}
        self._poller: select.poll | None = None
        self.negotiated: Negotiated | None = None
        self.config: VirtioScsiConfig | None = None
        self.request_queues = 0
        self.bases: dict[int, int] = {}
        self.kicks_sent = 0
        self.sleeps = 0

    # -- connection -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self, guest: Guest, *, deadline: float, retry_interval: float = 0.05,
                cancel: Callable[[], bool] | None = None) -> None:
        """Connect and start the device; retry until ``deadline`` (a ``time.monotonic``
        value) while the socket is absent or the back end refuses us, unless ``cancel()``
        says to give up."""
        last: Exception | None = None
        self.close()
        while True:
            try:
                self._connect_once(guest)
                return
            except (OSError, Disconnected, VhostUserProtocolError) as exc:
                last = exc  # not there yet, or not assigned to us yet: retry
                self.close()
            except BaseException:
                self.close()
                raise
            if time.monotonic() + retry_interval > deadline or (cancel is not None and cancel()):
                raise ConnectError(f"cannot start the VF at {self.path}: {last}")
            time.sleep(retry_interval)

    def _connect_once(self, guest: Guest) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock = sock
        sock.settimeout(self.io_timeout)
        sock.connect(self.path)
        self._parser = MessageParser(Channel.FRONTEND_REPLIES)
        negotiated = self._run(negotiate(WANTED_FEATURES, WANTED_PROTOCOL_FEATURES), 0)
        check_negotiated(negotiated)
        self.negotiated = negotiated
        config = self._run(read_config(negotiated), negotiated.protocol_features)
        self.config = config
        driver = guest.driver
        queues = request_queue_count(guest.layout.params.request_queues, config, negotiated)
        driver.configure(config, request_queues=queues,
                         indirect=has(negotiated.features, VirtioFeature.RING_INDIRECT_DESC))
        self.request_queues = queues
        vrings: list[FrontendVring] = []
        for index in (CONTROLQ, EVENTQ, *range(REQUESTQ_BASE, REQUESTQ_BASE + queues)):
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._kick[index] = kick
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._call[index] = call
            base = driver.used_index(index)  # the reconnect rule
            self.bases[index] = base
            vrings.append(FrontendVring(index, guest.layout.queues[index].queue_config(),
                                        kick, call, base))
        region = MemoryRegionDesc(0, guest.size, guest.user_addr, 0)
        self._run(start_device(negotiated, guest.memory, [(region, guest.shm.fd)], vrings),
                  negotiated.protocol_features)
        poller = select.poll()
        for fd in self._call.values():
            poller.register(fd, select.POLLIN)
        poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        self._poller = poller
        # Whatever the guest published while no back end ran: let the device look.
        self.kick(self._kick)

    def _run(self, gen: Generator[VhostUserMessage, VhostUserMessage | None, _T],
             protocol: int) -> _T:
        """Drive a sans-IO procedure: send what it yields, feed back the replies."""
        reply: VhostUserMessage | None = None
        try:
            message = gen.send(None)
            while True:
                self._send(message)
                reply = self._receive() if expects_reply(message, protocol) else None
                message = gen.send(reply)
        except StopIteration as stop:
            return cast("_T", stop.value)

    def _send(self, message: VhostUserMessage) -> None:
        sock = self._require()
        data = message.encode()
        if message.fds:
            fds = array.array("i", message.fds)
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        else:
            sock.sendall(data)

    def _receive(self) -> VhostUserMessage:
        sock = self._require()
        parser = self._parser
        assert parser is not None
        while True:
            data, ancdata, _flags, _addr = sock.recvmsg(
                4096, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize))
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                    fds.extend(got)
            if not data:
                _close_all(fds)
                raise Disconnected(f"{self.path}: the back end closed the connection")
            try:
                messages = parser.feed(data, fds)
            except VhostUserProtocolError as exc:
                _close_all(exc.fds)
                raise
            if messages:
                if len(messages) > 1:
                    raise VhostUserProtocolError("more than one reply to one request")
                _close_all(messages[0].fds)  # no reply we ask for carries an fd
                return messages[0]

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise Disconnected(f"{self.path}: not connected")
        return self._sock

    # -- notifications --------------------------------------------------------------------

    def kick(self, vrings: Iterable[int]) -> None:
        """Available buffer notification for each of ``vrings``."""
        for vring in vrings:
            fd = self._kick.get(vring)
            if fd is not None:
                os.write(fd, _ONE)
                self.kicks_sent += 1

    def drain_calls(self) -> None:
        """Consume pending used-buffer notifications (before re-checking the rings)."""
        for fd in self._call.values():
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 8)

    def wait(self, timeout: float) -> bool:
        """Sleep until a call eventfd fires or ``timeout`` seconds pass; True when
        notified. Raises :class:`Disconnected` when the back end went away."""
        poller = self._poller
        sock = self._sock
        if poller is None or sock is None:
            raise Disconnected(f"{self.path}: not connected")
        self.sleeps += 1
        events = poller.poll(max(0, int(timeout * 1000 + 0.999)))
        notified = False
        for fd, mask in events:
            if fd == sock.fileno():
                if mask & (select.POLLHUP | select.POLLERR):
                    raise Disconnected(f"{self.path}: the back end hung up")
                try:
                    peek = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                if not peek:
                    raise Disconnected(f"{self.path}: the back end closed the connection")
                raise VhostUserProtocolError("unsolicited data from the back end")
            notified = True
        return notified

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket and the eventfds (the back end then stops the vrings)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._poller = None
        _close_all(self._kick.values())
        _close_all(self._call.values())
        self._kick.clear()
        self._call.clear()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "closed"
        return f"VhostUserFrontend({self.path!r}, {state})"

