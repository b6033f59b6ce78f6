"""A small vhost-user-scsi BACK END for the VM shell tests, in a thread of the test
process: real Unix socket, SCM_RIGHTS memory and eventfds, the core's
``BackendSession`` and ``Virtqueue``, SCSI executed by the core ``Target`` over memory
LUNs. It stands in for a VF so the VM's front end, host, block layer and restart logic
are tested through real sockets and processes; the end-to-end tests with the adapter's
own VF are in ``test_vm_adapter.py``.

As a VF must, it completes every request it took before it lets a connection go, so
``used.idx`` in guest memory is where the next connection resumes."""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import queue
import select
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guest_device import FakeScsiDevice

from vfdirect.core.scsi import Target
from vfdirect.core.vhost.messages import MAX_FDS, Channel
from vfdirect.core.vhost.parser import MessageParser
from vfdirect.core.vhost.session import (
    BackendConfig,
    BackendSession,
    CloseConnection,
    CloseFds,
    EnableVring,
    MapMemory,
    ResetDevice,
    SendReply,
    SetVringCall,
    SetVringKick,
    StartVring,
    StopVring,
)
from vfdirect.core.virtio import MemoryRegion, RegionMemory, Virtqueue
from vfdirect.core.virtio.features import VirtioFeature, mask
from vfdirect.core.virtio.scsi import (
    EVENTQ,
    ScsiFeature,
    ScsiRequestHeader,
    VirtioScsiConfig,
    VirtioScsiEvent,
)

FEATURES = mask((VirtioFeature.VERSION_1, VirtioFeature.RING_EVENT_IDX,
                 VirtioFeature.RING_INDIRECT_DESC, ScsiFeature.HOTPLUG))
_ONE = struct.pack("<Q", 1)


class FakeVhostBackend(threading.Thread):
    """Serves one connection at a time on ``path`` until :meth:`stop`."""

    def __init__(self, path: Path, targets: dict[int, Target], *, request_queues: int = 2,
                 features: int = FEATURES, config: VirtioScsiConfig | None = None) -> None:
        super().__init__(daemon=True, name="fake-vhost-backend")
        self.path = path
        self.config = config or VirtioScsiConfig(num_queues=request_queues, max_target=15)
        self.backend_config = BackendConfig(
            device_features=features, num_queues=2 + request_queues,
            config_space=self.config.encode())
        self.device = FakeScsiDevice(RegionMemory([]), None, targets)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self._wake_r, self._wake_w = os.pipe()
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._stopping = False
        self.conn: socket.socket | None = None
        self.session: BackendSession | None = None
        self.parser: MessageParser | None = None
        self.maps: list[mmap.mmap] = []
        self.kick: dict[int, int | None] = {}
        self.call: dict[int, int | None] = {}
        self.connections = 0
        self.peer_pids: list[int] = []
        self.bases: list[dict[int, int]] = []
        self.errors: list[BaseException] = []
        self.notifications = 0
        self.connected = threading.Event()
        self.disconnected = threading.Event()

    # -- control from the test thread -------------------------------------------------------

    def do(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``fn`` in the back end's thread; its result."""
        box: list[Any] = []
        done = threading.Event()

        def call() -> None:
            try:
                box.append(fn())
            finally:
                done.set()

        self._commands.put(call)
        os.write(self._wake_w, b"x")
        if not done.wait(timeout):
            raise TimeoutError("back end thread did not answer")
        return box[0] if box else None

    def post_event(self, event: VirtioScsiEvent) -> bool:
        def post() -> bool:
            ok = self.device.post_event(event)
            self._notify(EVENTQ)
            return ok
        return bool(self.do(post))

    def release_held(self) -> None:
        def release() -> None:
            indices = {index for index, _, _ in self.device.held}
            self.device.release_held()
            for index in indices:
                self._notify(index)
        self.do(release)

    def set_hold(self, hold: Callable[[ScsiRequestHeader], bool]) -> None:
        self.device.hold = hold

    def drop_connection(self) -> None:
        self.do(self._disconnect)

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self.join(10)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stopping:
                fds = [self._wake_r]
                fds.append(self.conn.fileno() if self.conn is not None
                           else self.listener.fileno())
                fds.extend(fd for fd in self.kick.values() if fd is not None)
                ready, _, _ = select.select(fds, [], [], 0.5)
                for fd in ready:
                    if fd == self._wake_r:
                        os.read(self._wake_r, 64)
                        while not self._commands.empty():
                            self._commands.get()()
                    elif fd == self.listener.fileno():
                        self._accept()
                    elif self.conn is not None and fd == self.conn.fileno():
                        self._receive()
                    else:
                        for index, kick in list(self.kick.items()):
                            if kick == fd:
                                with contextlib.suppress(BlockingIOError):
                                    os.read(fd, 8)
                                self._serve(index)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self._disconnect()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.peer_pids.append(struct.unpack("3i", creds)[0])
        self.conn = conn
        self.session = BackendSession(self.backend_config)
        self.parser = MessageParser(Channel.FRONTEND_REQUESTS)
        self.connections += 1
        self.bases.append({})
        self.disconnected.clear()

    def _receive(self) -> None:
        assert self.conn is not None and self.parser is not None
        data, ancdata, _, _ = self.conn.recvmsg(4096, socket.CMSG_SPACE(MAX_FDS * 4))
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % 4])
                fds.extend(got)
        if not data:
            for fd in fds:
                os.close(fd)
            self._disconnect()
            return
        for message in self.parser.feed(data, fds):
            assert self.session is not None
            self._apply(self.session.handle(message))

    def _apply(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, SendReply):
                assert self.conn is not None
                self.conn.sendall(action.message.encode())
            elif isinstance(action, MapMemory):
                self._map(action)
            elif isinstance(action, StartVring):
                setup = action.setup
                config = setup.queue_config(self.device.memory)  # type: ignore[arg-type]
                self.device.queues[setup.index] = Virtqueue(self.device.memory, config,
                                                            last_avail_idx=setup.base)
                self.bases[-1][setup.index] = setup.base
                self.kick[setup.index] = setup.kick_fd
                self.call[setup.index] = setup.call_fd
                if len(self.device.queues) == self.backend_config.num_queues:
                    self.connected.set()
                self._serve(setup.index)
            elif isinstance(action, StopVring):
                vq = self.device.queues.pop(action.index)
                self.kick.pop(action.index, None)
                self.call.pop(action.index, None)
                assert self.session is not None
                self._apply(self.session.vring_stopped(action.index, vq.last_avail_idx))
            elif isinstance(action, SetVringKick):
                self.kick[action.index] = action.fd
            elif isinstance(action, SetVringCall):
                self.call[action.index] = action.fd
            elif isinstance(action, CloseFds):
                for fd in action.fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            elif isinstance(action, CloseConnection):
                self._disconnect()
            elif isinstance(action, ResetDevice | EnableVring):
                pass

    def _map(self, action: MapMemory) -> None:
        regions = []
        for desc, fd in zip(action.regions, action.fds, strict=True):
            mm = mmap.mmap(fd, desc.memory_size + desc.mmap_offset, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(fd)
            self.maps.append(mm)
            view = memoryview(mm)[desc.mmap_offset:desc.mmap_offset + desc.memory_size]
            regions.append(MemoryRegion(desc.guest_phys_addr, view, desc.userspace_addr))
        self.device.memory = RegionMemory(regions)

    def _serve(self, index: int) -> None:
        if index not in self.device.queues:
            return
        self.device.run_queue(index)
        for i in list(self.device.queues):
            self._notify(i)

    def _notify(self, index: int) -> None:
        vq = self.device.queues.get(index)
        fd = self.call.get(index)
        if vq is not None and fd is not None and vq.should_notify():
            with contextlib.suppress(OSError):
                os.write(fd, _ONE)
                self.notifications += 1

    def _disconnect(self) -> None:
        if self.conn is None:
            return
        # Complete every request taken (the reconnect rule relies on it): the held ones
        # run to completion, as a VF finishes the IO it has started.
        self.device.hold = lambda header: False
        with contextlib.suppress(Exception):
            self.device.release_held()
        if self.session is not None:
            for action in self.session.disconnected():
                if isinstance(action, CloseFds):
                    for fd in action.fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
        self.conn.close()
        self.conn = None
        self.session = None
        self.kick.clear()
        self.call.clear()
        self.device.queues = {}
        self.device.event_chains = []
        self.device.held = []
        self.device.memory = RegionMemory([])
        for mm in self.maps:
            with contextlib.suppress(BufferError):
                mm.close()
        self.maps = []
        self.connected.clear()
        self.disconnected.set()
