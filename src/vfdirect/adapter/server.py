"""The PF admin channel: a Unix SOCK_SEQPACKET socket served with asyncio.

Rules of this module:

* the socket (``pf.sock`` in the host's run directory) is created with mode 0600 (bound
  under umask 0177, then chmod-ed), so only its owner can even connect;
* each accepted connection's peer credentials (SO_PEERCRED) are checked against the
  hypervisor the adapter serves (configured pid and/or uid); a stranger gets one
  ``PERMISSION_DENIED`` error packet, a log line naming it, and a closed connection;
* one JSON-RPC message per packet; file descriptors ride along with SCM_RIGHTS, at most
  :data:`~vfdirect.core.adapter.methods.MAX_FDS` per packet (the kernel closes any past
  that and flags MSG_CTRUNC, answered ``BAD_FDS``); packets over
  :data:`~vfdirect.core.rpc.MAX_MESSAGE_BYTES` are answered ``INVALID_REQUEST``;
* requests run one at a time on a single worker thread (the loop stays free to accept
  and to refuse); requests of one connection are answered in order;
* every wait is bounded: a peer that does not read its reply within
  :data:`SEND_TIMEOUT_S` is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vfdirect.adapter.log import log_event
from vfdirect.adapter.service import AdapterService, close_fds
from vfdirect.core.adapter.methods import MAX_FDS
from vfdirect.core.rpc import MAX_MESSAGE_BYTES, ErrorCode, RpcError, encode_error

#: Most admin connections served at once (the hypervisor needs one or two).
MAX_CONNECTIONS = 8
#: Longest wait for a peer to make room for its reply.
SEND_TIMEOUT_S = 5.0
#: Socket buffer asked for, so that a large message fits in one packet.
SOCKET_BUFFER_BYTES = 4 << 20
_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """Who may use the PF: the hypervisor's pid and/or uid."""

    pid: int | None = None
    uid: int | None = None

    def refusal(self, pid: int, uid: int) -> str | None:
        """Why a peer is refused, or None if it is the hypervisor."""
        if self.pid is not None and pid != self.pid:
            return f"peer pid {pid} is not the hypervisor's pid {self.pid}"
        if self.uid is not None and uid != self.uid:
            return f"peer uid {uid} is not the hypervisor's uid {self.uid}"
        return None


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def enlarge_buffers(sock: socket.socket, size: int = SOCKET_BUFFER_BYTES) -> None:
    """Ask for send/receive buffers that hold the largest message (SO_*BUFFORCE as root,
    else whatever the system's maximum allows)."""
    for force, plain in ((getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
                         (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF)):
        try:
            if force is None:
                raise PermissionError
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)


def bind_seqpacket(path: Path) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at ``path``, mode 0600, non-blocking."""
    sock = socket.socket(socket.AF_UNIX,
                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(MAX_CONNECTIONS)
    except BaseException:
        sock.close()
        raise
    return sock


def _discard_and_close(conn: socket.socket) -> None:
    """Close a refused connection; drop (and close the fds of) what it sent already, so
    that the kernel does not turn the unread data into a reset that hides our answer."""
    conn.shutdown(socket.SHUT_RD)
    for _ in range(MAX_CONNECTIONS):
        try:
            data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE_BYTES, MAX_FDS,
                                              socket.MSG_DONTWAIT)
        except OSError:
            break
        close_fds(fds)
        if not data:
            break
    conn.close()


class PfServer:
    """Serves the PF admin channel of one adapter until told to stop."""

    def __init__(self, service: AdapterService, path: Path, policy: PeerPolicy,
                 logger: logging.Logger) -> None:
        self._service = service
        self._path = path
        self._policy = policy
        self._log = logger
        self._sock = bind_seqpacket(path)
        self._inode = os.stat(path).st_ino
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pf-admin")
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def path(self) -> Path:
        return self._path

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self._sock.fileno(), self._on_accept)
        try:
            await stop.wait()
        finally:
            loop.remove_reader(self._sock.fileno())
            self.close_listener()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=SEND_TIMEOUT_S)
            self._executor.shutdown(wait=True, cancel_futures=True)

    def close_listener(self) -> None:
        """Close the socket and unlink it (only if the path is still ours)."""
        if self._sock.fileno() >= 0:
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self._path).st_ino == self._inode:
                self._path.unlink()

    # -- connections -------------------------------------------------------------------

    def _on_accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log_event(self._log, "pf_accept_failed", level=logging.WARNING, error=str(exc))
                return
            conn.setblocking(False)
            try:
                pid, uid, gid = peer_credentials(conn)
            except OSError as exc:
                log_event(self._log, "pf_refused", level=logging.WARNING,
                          reason=f"no peer credentials: {exc}")
                conn.close()
                continue
            reason = self._policy.refusal(pid, uid)
            if reason is None and len(self._tasks) >= MAX_CONNECTIONS:
                reason = f"{MAX_CONNECTIONS} connections are open already"
            if reason is not None:
                log_event(self._log, "pf_refused", level=logging.WARNING, pid=pid, uid=uid,
                          gid=gid, reason=reason)
                with contextlib.suppress(OSError):
                    conn.send(encode_error(None, RpcError(ErrorCode.PERMISSION_DENIED,
                                                          f"PF refused: {reason}")))
                _discard_and_close(conn)
                continue
            enlarge_buffers(conn)
            log_event(self._log, "pf_connect", pid=pid, uid=uid)
            task = loop.create_task(self._serve(conn, pid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, pid: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._ready(conn, write=False)
                try:
                    data, fds, flags, _ = socket.recv_fds(conn, MAX_MESSAGE_BYTES, MAX_FDS)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    break
                if not data and not fds:
                    break  # the peer closed the connection
                reply, out_fds = await loop.run_in_executor(
                    self._executor, self._service.handle_packet, data, fds, flags
                )
                if reply is not None and not await self._send(conn, reply, out_fds):
                    break
        finally:
            conn.close()
            log_event(self._log, "pf_disconnect", pid=pid)

    async def _ready(self, conn: socket.socket, *, write: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        fd = conn.fileno()
        if write:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await fut
        finally:
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    async def _send(self, conn: socket.socket, data: bytes, fds: tuple[int, ...]) -> bool:
        try:
            while True:
                try:
                    if fds:
                        socket.send_fds(conn, [data], list(fds))
                    else:
                        conn.send(data)
                    return True
                except (BlockingIOError, InterruptedError):
                    try:
                        await asyncio.wait_for(self._ready(conn, write=True), SEND_TIMEOUT_S)
                    except TimeoutError:
                        log_event(self._log, "pf_send_timeout", level=logging.WARNING)
                        return False
                except OSError as exc:
                    if exc.errno == errno.EMSGSIZE:
                        log_event(self._log, "pf_reply_too_large", level=logging.ERROR,
                                  bytes=len(data))
                        err = RpcError(ErrorCode.INTERNAL_ERROR,
                                       f"reply of {len(data)} bytes does not fit in a packet")
                        with contextlib.suppress(OSError):
                            conn.send(encode_error(None, err))
                        return True
                    return False
        finally:
            close_fds(fds)
