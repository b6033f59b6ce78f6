"""NBD exports of the VM's disks, served by the VM process itself through its VF (shell).

Each export names one disk of the VM's :class:`~vfdirect.vm.block.BlockLayer` (``sda``
or ``target:lun``) and an address (a Unix socket path, or a loopback TCP port); exports
at the same address share one listening socket. Every NBD request becomes
``Disk.submit_read`` / ``submit_write`` (FUA as SCSI FUA) / ``submit_flush`` on that
layer: the data goes through the guest's virtqueues and the VF like any other guest IO,
never to the backing files.

The server is single-threaded and non-blocking: :meth:`NbdServer.run_step` reaps the
block layer's completions and services the sockets (a ``selectors`` selector), and the
VM's main loop calls it until it stops. Protocol work is done by the sans-IO core
(:mod:`vfdirect.core.nbd`); this module only moves bytes and IOs.

Robustness: a client that breaks the protocol (garbage, a bad magic), or that goes away
mid-request, is dropped alone; IOs it had in flight complete and are discarded. Each
connection has at most ``MAX_ACTIVE`` requests in progress and stops being read while
its replies pile up (``MAX_OUTPUT`` bytes), so one client cannot starve the others.

The exports file (``vm-run --exports-file``) is JSON: ``{"exports": [{"disk": "sda",
"unix": "/run/x.sock"}, {"disk": "0:1", "port": 10809}]}``; the VM re-reads it on
SIGHUP (:meth:`NbdServer.configure`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfdirect.core.nbd import (
    CommandFlag,
    CommandType,
    Errno,
    ExportInfo,
    HandshakePhase,
    NbdProtocolError,
    Request,
    RequestDecoder,
    ServerHandshake,
    TransmissionFlag,
    check_request,
    simple_reply,
)
from vfdirect.core.nbd.exports import ExportSpec, ExportSpecError, parse_disk_ref
from vfdirect.core.scsi.sense import SenseKey
from vfdirect.vm.block import BlockLayer, CheckConditionError, Disk, IoError, IoRequest
from vfdirect.vm.log import log_event

__all__ = [
    "ExportSpec",
    "ExportSpecError",
    "NbdServer",
    "load_exports",
    "parse_disk_ref",
    "serve_exports",
]

#: Largest READ/WRITE (advertised as the maximum block size).
MAX_BLOCK = 32 << 20
#: Requests in progress per connection; chunks (one SCSI command each) per request.
MAX_ACTIVE = 32
CHUNK_WINDOW = 8
#: A connection is not read while this many reply bytes wait to be sent.
MAX_OUTPUT = 8 << 20
RECV_SIZE = 256 << 10
#: Seconds between two attempts to open an export's address that could not be opened.
RETRY_S = 1.0
TRANSMISSION_FLAGS = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
                      | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_WRITE_ZEROES
                      | TransmissionFlag.CAN_MULTI_CONN)


def load_exports(path: Path) -> list[ExportSpec]:
    """The exports of an exports file; a missing file is no exports."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ExportSpecError(f"{path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ExportSpecError(f"{path}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("exports", []), list):
        raise ExportSpecError(f"{path}: expected {{\"exports\": [...]}}")
    specs = [ExportSpec.load(item) for item in doc.get("exports", [])]
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        key = (spec.disk, spec.address)
        if key in seen:
            raise ExportSpecError(f"{path}: {spec.disk} is exported twice at {spec.address}")
        seen.add(key)
    return specs


def _errno_of(error: IoError) -> Errno:
    if isinstance(error, CheckConditionError) and error.sense is not None:
        key = error.sense.sense.key
        if key == SenseKey.DATA_PROTECT:
            return Errno.EPERM
        if key == SenseKey.VOLUME_OVERFLOW:
            return Errno.ENOSPC
    return Errno.EIO


# -- listeners ------------------------------------------------------------------------------


class _Listener:
    def __init__(self, spec: ExportSpec) -> None:
        self.address = spec.address
        self.unix = spec.unix
        self.refs: list[str] = []
        self._inode: tuple[int, int] | None = None
        if spec.unix is not None:
            self.sock = self._bind_unix(spec.unix)
        else:
            family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
            host = "127.0.0.1" if spec.host == "localhost" else spec.host
            self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self.sock.bind((host, spec.port))
            except OSError:
                self.sock.close()
                raise
        self.sock.listen(16)
        self.sock.setblocking(False)

    def _bind_unix(self, path: str) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            mode = os.lstat(path).st_mode
            if not stat.S_ISSOCK(mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.settimeout(0.5)
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: nobody listens there
            else:
                raise OSError(errno.EADDRINUSE, f"{path}: another process listens there")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        st = os.stat(path)
        self._inode = (st.st_dev, st.st_ino)
        return sock

    def close(self) -> None:
        self.sock.close()
        if self.unix is not None and self._inode is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.unix)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.unix)


# -- connections ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Op:
    """One NBD request in progress: its chunks (one SCSI command each)."""

    request: Request
    disk: Disk
    kind: str
    chunks: list[tuple[int, int]]
    data: bytearray | None = None
    next: int = 0
    outstanding: int = 0
    error: Errno = Errno.OK
    started: float = field(default_factory=time.monotonic)


class _Conn:
    def __init__(self, server: NbdServer, sock: socket.socket, listener: _Listener,
                 peer: str) -> None:
        self.server = server
        self.sock = sock
        self.listener = listener
        self.peer = peer
        self.id = server.next_id()
        self.handshake: ServerHandshake | None = ServerHandshake(
            lambda name: server.lookup(listener, name), lambda: server.names(listener))
        self.decoder: RequestDecoder | None = None
        self.disk: Disk | None = None
        self.out: deque[memoryview] = deque()
        self.out_bytes = 0
        self.waiting: deque[Request] = deque()
        self.active = 0
        self.disconnecting = False
        self.close_after_send = False
        self.closed = False
        self.requests = 0
        self.mask = 0
        self._queue(self.handshake.data_to_send())

    # -- output -----------------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        if data:
            self.out.append(memoryview(data))
            self.out_bytes += len(data)

    def reply(self, cookie: int, error: Errno, data: bytes | bytearray | None = None) -> None:
        if self.closed:
            return
        self._queue(simple_reply(cookie, int(error)))
        if data is not None and error == Errno.OK:
            self._queue(bytes(data))
        self.flush_out()

    def flush_out(self) -> None:
        while self.out and not self.closed:
            head = self.out[0]
            try:
                sent = self.sock.send(head)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.server.drop(self, f"send failed: {exc}")
                return
            self.out_bytes -= sent
            if sent == len(head):
                self.out.popleft()
            else:
                self.out[0] = head[sent:]
                break
        self.update()

    # -- input ------------------------------------------------------------------------

    @property
    def reading(self) -> bool:
        return not (self.disconnecting or self.close_after_send or self.waiting
                    or self.out_bytes >= MAX_OUTPUT)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.server.drop(self, f"receive failed: {exc}")
            return
        if not data:
            why = "client closed the connection"
            if self.active or (self.decoder is not None and not self.decoder.idle):
                why += " mid-request"
            self.server.drop(self, why, level=logging.INFO)
            return
        try:
            if self.handshake is not None:
                self._handshake(data)
            elif self.decoder is not None:
                self.waiting.extend(self.decoder.feed(data))
        except NbdProtocolError as exc:
            self.server.drop(self, f"protocol error: {exc}")
            return
        self.pump()

    def _handshake(self, data: bytes) -> None:
        hs = self.handshake
        assert hs is not None
        hs.receive(data)
        self._queue(hs.data_to_send())
        if hs.phase == HandshakePhase.CLOSED:
            log_event(self.server.log, "nbd_handshake_closed", conn=self.id,
                      reason=hs.close_reason, options=hs.options)
            self.close_after_send = True
        elif hs.phase == HandshakePhase.TRANSMISSION:
            assert hs.export is not None
            self.disk = self.server.disk_for(self.listener, hs.export.name)
            self.decoder = RequestDecoder(MAX_BLOCK)
            rest = hs.take_rest()
            self.handshake = None
            log_event(self.server.log, "nbd_client_ready", conn=self.id,
                      export=hs.export.name, peer=self.peer, options=hs.options)
            if rest:
                self.waiting.extend(self.decoder.feed(rest))
        self.flush_out()

    # -- requests ---------------------------------------------------------------------

    def pump(self) -> None:
        """Start waiting requests while the connection has room."""
        while self.waiting and self.active < MAX_ACTIVE and not self.closed:
            self.start(self.waiting.popleft())
        self.flush_out()
        self.maybe_finish()

    def start(self, request: Request) -> None:
        self.requests += 1
        disk = self.disk
        if self.disconnecting:
            return  # nothing may follow NBD_CMD_DISC
        if request.type == CommandType.DISC:
            self.disconnecting = True
            self.waiting.clear()
            return
        if disk is None or not disk.present:
            self.reply(request.cookie, Errno.EIO)
            return
        info = self.server.export_info(disk)
        err = Errno.EIO if info is None else check_request(request, info)
        if err != Errno.OK:
            self.server.count("refused")
            self.reply(request.cookie, err)
            return
        bs = disk.block_size
        per = disk.max_blocks
        lba, blocks = request.offset // bs, request.length // bs
        chunks = [(lba + i, min(per, blocks - i)) for i in range(0, blocks, per)]
        if request.type == CommandType.READ:
            op = _Op(request, disk, "read", chunks, bytearray(request.length))
        elif request.type == CommandType.WRITE:
            op = _Op(request, disk, "write", chunks)
        elif request.type == CommandType.WRITE_ZEROES:
            op = _Op(request, disk, "zero", chunks)
        else:
            op = _Op(request, disk, "flush", [(0, 0)])
        if not chunks:
            self.reply(request.cookie, Errno.OK, b"" if op.kind == "read" else None)
            return
        self.active += 1
        self._submit(op)

    def _submit(self, op: _Op) -> None:
        disk = op.disk
        fua = bool(op.request.flags & CommandFlag.FUA)
        while op.next < len(op.chunks) and op.outstanding < CHUNK_WINDOW and \
                op.error == Errno.OK:
            lba, blocks = op.chunks[op.next]
            base = op.chunks[0][0]

            def done(io: IoRequest, op: _Op = op, at: int = (lba - base) * disk.block_size
                     ) -> None:
                self._chunk_done(op, io, at)

            try:
                if op.kind == "read":
                    disk.submit_read(lba, blocks, callback=done)
                elif op.kind == "write":
                    payload = op.request.payload or b""
                    start = (lba - base) * disk.block_size
                    disk.submit_write(lba, payload[start:start + blocks * disk.block_size],
                                      fua=fua, callback=done)
                elif op.kind == "zero":
                    disk.submit_write(lba, self.server.zeroes(blocks * disk.block_size),
                                      fua=fua, callback=done)
                else:
                    disk.submit_flush(callback=done)
            except ValueError:
                op.error = Errno.EINVAL  # the disk shrank under the client
                break
            except IoError:
                op.error = Errno.EIO
                break
            op.next += 1
            op.outstanding += 1
        if op.outstanding == 0:
            self._finish(op)

    def _chunk_done(self, op: _Op, io: IoRequest, at: int) -> None:
        op.outstanding -= 1
        if io.error is not None:
            if op.error == Errno.OK:
                op.error = _errno_of(io.error)
                log_event(self.server.log, "nbd_io_error", level=logging.WARNING,
                          conn=self.id, disk=op.disk.name, op=op.kind,
                          error=str(io.error), errno=op.error.name)
        elif op.data is not None and io.data is not None:
            op.data[at:at + len(io.data)] = io.data
        if self.closed:
            if op.outstanding == 0:
                self.server.orphans -= 1
            return
        self._submit(op)

    def _finish(self, op: _Op) -> None:
        self.active -= 1
        self.server.count(op.kind if op.error == Errno.OK else "errors")
        self.reply(op.request.cookie, op.error, op.data)
        self.pump()

    # -- state ------------------------------------------------------------------------

    def maybe_finish(self) -> None:
        if self.closed:
            return
        if (self.disconnecting or self.close_after_send) and not self.active and \
                not self.out:
            self.server.drop(self, "client sent NBD_CMD_DISC" if self.disconnecting
                             else "handshake ended", level=logging.INFO)

    def update(self) -> None:
        if self.closed:
            return
        mask = selectors.EVENT_READ if self.reading else 0
        if self.out:
            mask |= selectors.EVENT_WRITE
        if mask != self.mask:
            sel = self.server.selector
            if self.mask and mask:
                sel.modify(self.sock, mask, self)
            elif mask:
                sel.register(self.sock, mask, self)
            else:
                sel.unregister(self.sock)
            self.mask = mask


# -- server ---------------------------------------------------------------------------------


class NbdServer:
    """The VM's NBD exports over its block layer."""

    def __init__(self, layer: BlockLayer, *, logger: logging.Logger | None = None) -> None:
        self.layer = layer
        self.log = logger or logging.getLogger("vfdirect.vm")
        self.selector = selectors.DefaultSelector()
        self.listeners: dict[str, _Listener] = {}
        self.conns: set[_Conn] = set()
        self.specs: list[ExportSpec] = []
        self.specs_wanted: list[ExportSpec] = []
        self.stats: dict[str, int] = {}
        #: the last :meth:`configure` outcome
        self.status: list[dict[str, Any]] = []
        #: connections dropped while their IOs were still in flight
        self.orphans = 0
        self._ids = 0
        self._zero = b""

    # -- exports ----------------------------------------------------------------------

    def configure(self, specs: list[ExportSpec], *, retry: bool = False) -> list[dict[str, Any]]:
        """Serve exactly ``specs``: open the new addresses, close the ones gone (their
        clients are dropped). Returns one status per export (``error`` when its address
        could not be opened). ``retry``: a retry of addresses that failed, logged only
        when the outcome changed."""
        self.specs_wanted = list(specs)
        wanted: dict[str, list[ExportSpec]] = {}
        for spec in specs:
            wanted.setdefault(spec.address, []).append(spec)
        for address in list(self.listeners):
            if address not in wanted:
                self._close_listener(address)
        status: list[dict[str, Any]] = []
        self.specs = []
        for address, group in wanted.items():
            listener = self.listeners.get(address)
            error = None
            if listener is None:
                try:
                    listener = _Listener(group[0])
                except (OSError, ValueError) as exc:
                    error = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
                else:
                    self.listeners[address] = listener
                    self.selector.register(listener.sock, selectors.EVENT_READ, listener)
            if listener is not None:
                listener.refs = [s.disk for s in group]
                self.specs.extend(group)
            for spec in group:
                disk = self._resolve(spec.disk)
                entry = {"disk": spec.disk, "name": disk.name if disk else None,
                         "address": address, "uri": spec.uri}
                if error is not None:
                    entry["error"] = error
                status.append(entry)
        if not retry or status != self.status:
            log_event(self.log, "nbd_exports", exports=status, level=logging.WARNING
                      if any("error" in s for s in status) else logging.INFO)
        self.status = status
        return status

    def _close_listener(self, address: str) -> None:
        listener = self.listeners.pop(address)
        self.selector.unregister(listener.sock)
        listener.close()
        for conn in [c for c in self.conns if c.listener is listener]:
            self.drop(conn, "export removed", level=logging.INFO)

    def _resolve(self, ref: str) -> Disk | None:
        if ":" in ref:
            target, lun = (int(x) for x in ref.split(":"))
            return self.layer.disk_at(target, lun)
        disk = self.layer.disks.get(ref)
        return disk if disk is not None and disk.present else None

    def disk_for(self, listener: _Listener, name: str) -> Disk | None:
        """The disk export ``name`` of ``listener`` serves: a name or reference it
        exports; the empty (default) name when it exports one disk."""
        if name == "" and len(listener.refs) == 1:
            return self._resolve(listener.refs[0])
        for ref in listener.refs:
            disk = self._resolve(ref)
            if disk is not None and name in (ref, disk.name):
                return disk
        return None

    def export_info(self, disk: Disk) -> ExportInfo | None:
        """What NBD says about ``disk`` (``None``: a block size NBD cannot express)."""
        bs = disk.block_size
        if not 1 <= bs <= 1 << 16 or bs & (bs - 1):
            return None
        return ExportInfo(
            name=disk.name, size=disk.capacity_bytes, flags=int(TRANSMISSION_FLAGS),
            min_block=bs, preferred_block=max(bs, 4096), max_block=MAX_BLOCK // bs * bs,
            description=f"vfdirect disk {disk.name} (target {disk.target} LUN {disk.lun}"
                        f"{', serial ' + disk.serial if disk.serial else ''})")

    def lookup(self, listener: _Listener, name: str) -> ExportInfo | None:
        disk = self.disk_for(listener, name)
        return None if disk is None else self.export_info(disk)

    def names(self, listener: _Listener) -> list[str]:
        out = []
        for ref in listener.refs:
            disk = self._resolve(ref)
            if disk is not None:
                out.append(disk.name)
        return out

    def zeroes(self, size: int) -> bytes:
        if len(self._zero) < size:
            self._zero = bytes(size)
        return self._zero if len(self._zero) == size else self._zero[:size]

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    # -- loop -------------------------------------------------------------------------

    def run_step(self, timeout: float) -> None:
        """One turn of the VM's loop: reap block completions, service the sockets.
        Waits up to ``timeout`` when nothing is in flight (about 1 ms otherwise)."""
        layer = self.layer
        if layer.busy or layer.host.outstanding:
            layer.poll(0.001)
            self._select(0)
        else:
            layer.poll(0)
            self._select(timeout)

    def _select(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            obj = key.data
            if isinstance(obj, _Listener):
                self._accept(obj)
            elif isinstance(obj, _Conn) and not obj.closed:
                try:
                    if mask & selectors.EVENT_WRITE:
                        obj.flush_out()
                        obj.maybe_finish()
                    if mask & selectors.EVENT_READ and not obj.closed:
                        obj.on_readable()
                except Exception as exc:  # a bug must cost one client, not the VM
                    log_event(self.log, "nbd_internal_error", level=logging.ERROR,
                              conn=obj.id, error=repr(exc))
                    self.drop(obj, f"internal error: {exc!r}")

    def _accept(self, listener: _Listener) -> None:
        for _ in range(16):
            try:
                sock, addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log_event(self.log, "nbd_accept_failed", level=logging.WARNING,
                          address=listener.address, error=str(exc))
                return
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = listener.address if sock.family == socket.AF_UNIX else \
                f"{addr[0]}:{addr[1]}"
            conn = _Conn(self, sock, listener, peer)
            self.conns.add(conn)
            self.count("connections")
            log_event(self.log, "nbd_client_connected", conn=conn.id,
                      address=listener.address, peer=peer)
            conn.flush_out()

    def drop(self, conn: _Conn, why: str, *, level: int = logging.WARNING) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.mask:
            self.selector.unregister(conn.sock)
            conn.mask = 0
        conn.sock.close()
        self.conns.discard(conn)
        if conn.active:
            self.orphans += conn.active
        log_event(self.log, "nbd_client_closed", level=level, conn=conn.id, reason=why,
                  requests=conn.requests, in_flight=conn.active)

    def close(self) -> None:
        for conn in list(self.conns):
            self.drop(conn, "VM stopping", level=logging.INFO)
        for address in list(self.listeners):
            self._close_listener(address)
        self.selector.close()

    def serve(self, should_stop: Callable[[], bool], *, on_tick: Callable[[], None] | None
              = None, timeout: float = 0.2) -> None:
        """Run until ``should_stop()``; ``on_tick`` runs each turn (e.g. to reload)."""
        while not should_stop():
            if on_tick is not None:
                on_tick()
            self.run_step(timeout)


def serve_exports(layer: BlockLayer, exports_file: Path, *, should_stop: Callable[[], bool],
                  take_reload: Callable[[], bool], logger: logging.Logger) -> dict[str, int]:
    """The idle VM's loop with NBD exports: serve what ``exports_file`` lists, re-read it
    whenever ``take_reload()`` says so (SIGHUP), until ``should_stop()``. Returns the
    server's counters."""
    server = NbdServer(layer, logger=logger)
    retry_at = [0.0]

    def reload() -> None:
        try:
            specs = load_exports(exports_file)
        except ExportSpecError as exc:
            log_event(logger, "nbd_exports_invalid", level=logging.ERROR, error=str(exc))
            return  # keep serving what was served
        server.configure(specs)
        retry_at[0] = time.monotonic() + RETRY_S

    def tick() -> None:
        if take_reload():
            reload()
        elif any("error" in s for s in server.status) and time.monotonic() >= retry_at[0]:
            # e.g. the source of a migration still holds the address for a moment
            server.configure(server.specs_wanted, retry=True)
            retry_at[0] = time.monotonic() + RETRY_S

    reload()
    try:
        server.serve(should_stop, on_tick=tick)
    finally:
        server.close()
    return dict(server.stats)
