"""A minimal vhost-user FRONT END for the VF tests: what a VM process does, in the test
process, over a shared-memory guest.

It negotiates and starts the device with :mod:`vfdirect.core.vhost`'s front-end
procedures, lays out one driver-managed split virtqueue per vring with
:class:`~vfdirect.core.virtio.SplitQueueDriver` in a :class:`SharedMemory` file, and
submits virtio-scsi requests (command, TMF, AN) the way Linux's virtio_scsi frames them:
device-readable request header then data-out, device-writable response then data-in.
Every wait is bounded; :meth:`FrontEnd.close` releases the socket, eventfds and memory.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfdirect.core.vhost import (
    Channel,
    FrontendVring,
    MessageParser,
    Negotiated,
    ProtocolFeature,
    VhostUserMessage,
    expects_reply,
    negotiate,
    start_device,
    stop_vrings,
)
from vfdirect.core.vhost.messages import MemoryRegionDesc
from vfdirect.core.virtio import DriverLayout, RegionMemory, SplitQueueDriver, VirtioFeature
from vfdirect.core.virtio.features import bit, mask
from vfdirect.core.virtio.scsi import (
    ControlType,
    CtrlAnRequest,
    CtrlAnResponse,
    CtrlTmfRequest,
    CtrlTmfResponse,
    ScsiFeature,
    ScsiRequestHeader,
    ScsiResponseHeader,
    VirtioScsiEvent,
    encode_lun,
)
from vfdirect.transport.shm import SharedMemory

WAIT_S = 10.0
MEM_SIZE = 8 << 20
#: The front end's (made-up) virtual address of guest address 0.
USER_BASE = 0x7F00_0000_0000
RING_BASE = 0x10000
RING_STRIDE = 0x20000
DATA_BASE = 1 << 20
DATA_STRIDE = 1 << 20
RESP_SIZE = ScsiResponseHeader.size()
WANTED_FEATURES = (bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.RING_EVENT_IDX)
                   | bit(VirtioFeature.RING_INDIRECT_DESC) | bit(ScsiFeature.HOTPLUG)
                   | bit(ScsiFeature.CHANGE))
WANTED_PROTOCOL = mask((ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK,
                        ProtocolFeature.CONFIG, ProtocolFeature.RESET_DEVICE))
EVENT_BUFFERS = 8


@dataclass(frozen=True)
class Completion:
    """A command's response as the driver reads it back from guest memory."""

    response: int
    status: int
    sense: bytes
    resid: int
    data: bytes
    written: int


def rw(opcode: int, lba: int, blocks: int) -> bytes:
    """READ(10)/WRITE(10) CDB."""
    return bytes([opcode, 0, *lba.to_bytes(4, "big"), 0, *blocks.to_bytes(2, "big"), 0])


class FrontEnd:
    """One VM's front end connected to one VF socket."""

    def __init__(self, sock_path: Path | str, mem_path: Path, *, queue_size: int = 64,
                 request_queues: int = 2, max_indirect: int = 16,
                 mem_size: int = MEM_SIZE, attach: bool = False) -> None:
        """A new guest (fresh memory and rings), or with ``attach`` a restarted VM
        process on the memory file of a previous one (its drivers carry on)."""
        self.shm = SharedMemory.open(mem_path) if attach else \
            SharedMemory.create(mem_path, mem_size)
        self.memory = RegionMemory.from_table([(0, USER_BASE, self.shm.buffer)])
        self.nvrings = 2 + request_queues
        self.drivers: list[SplitQueueDriver] = []
        self.kicks: list[int] = []
        self.calls: list[int] = []
        for i in range(self.nvrings):
            layout = DriverLayout.plan(RING_BASE + i * RING_STRIDE, queue_size,
                                       event_idx=True, max_indirect=max_indirect)
            assert layout.end <= RING_BASE + (i + 1) * RING_STRIDE <= DATA_BASE
            self.drivers.append(SplitQueueDriver.attach(self.memory, layout.ctl_addr)
                                if attach else SplitQueueDriver.create(self.memory, layout))
            self.kicks.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            self.calls.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(WAIT_S)
        self.sock.connect(str(sock_path))
        self.parser = MessageParser(Channel.FRONTEND_REPLIES)
        self.negotiated: Negotiated | None = None
        self._tag = 0
        self._events = 0

    # -- vhost-user ------------------------------------------------------------------

    def send(self, message: VhostUserMessage) -> None:
        data = message.encode()
        if message.fds:
            socket.send_fds(self.sock, [data], list(message.fds))
        else:
            self.sock.sendall(data)

    def recv_reply(self) -> VhostUserMessage:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 8)
            if not data:
                raise ConnectionError("the VF closed the connection")
            messages = self.parser.feed(data, fds)
            if messages:
                assert len(messages) == 1, messages
                return messages[0]
        raise TimeoutError("no reply from the VF")

    def request(self, message: VhostUserMessage) -> VhostUserMessage | None:
        protocol = 0 if self.negotiated is None else self.negotiated.protocol_features
        self.send(message)
        return self.recv_reply() if expects_reply(message, protocol) else None

    def drive(self, procedure: Generator[VhostUserMessage, VhostUserMessage | None, Any]) -> Any:
        try:
            message = next(procedure)
            while True:
                message = procedure.send(self.request(message))
        except StopIteration as stop:
            return stop.value

    def setup(self, *, events: int = EVENT_BUFFERS, vrings: bool = True) -> FrontEnd:
        """Negotiate, map the memory, start every vring (from the used index found in
        guest memory, as a restarted VM does); post event buffers."""
        if self.negotiated is None:
            self.negotiated = self.drive(negotiate(WANTED_FEATURES, WANTED_PROTOCOL))
        region = MemoryRegionDesc(0, self.granted_bytes(), USER_BASE, 0)
        rings = [FrontendVring(i, d.layout.queue_config(), self.kicks[i], self.calls[i],
                               self.used_idx(i))
                 for i, d in enumerate(self.drivers)] if vrings else []
        self.drive(start_device(self.negotiated, self.memory, [(region, self.shm.fd)], rings))
        if vrings:
            for _ in range(events):
                self.post_event_buffer()
        return self

    def granted_bytes(self) -> int:
        """How much of the memory file the VF gets (SET_MEM_TABLE): all of it."""
        return self.shm.size

    def used_idx(self, queue: int) -> int:
        return self.memory.load_u16(self.drivers[queue].layout.used_addr + 2)

    def stop(self) -> dict[int, int]:
        """GET_VRING_BASE for every vring: ``{vring: base}``."""
        return dict(self.drive(stop_vrings(range(self.nvrings))))

    # -- rings -----------------------------------------------------------------------

    def kick(self, queue: int) -> None:
        os.eventfd_write(self.kicks[queue], 1)

    def submit(self, queue: int, readable: Sequence[tuple[int, int]],
               writable: Sequence[tuple[int, int]]) -> int:
        head, kick = self.drivers[queue].submit(readable, writable, self._next_tag())
        if kick:
            self.kick(queue)
        return head

    def wait_used(self, queue: int, timeout: float = WAIT_S) -> tuple[int, int]:
        """The next used element of ``queue``: (head, written)."""
        driver = self.drivers[queue]
        deadline = time.monotonic() + timeout
        while True:
            used = driver.pop_used()
            if used is not None:
                return used.head, used.written
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no completion on queue {queue}")
            ready, _, _ = select.select([self.calls[queue]], [], [], min(left, 0.05))
            if ready:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.calls[queue])

    def _next_tag(self) -> int:
        self._tag += 1
        return self._tag

    # -- virtio-scsi -----------------------------------------------------------------

    def scsi(self, target: int, lun: int, cdb: bytes, *, queue: int = 2,
             data_out: bytes = b"", data_in: int = 0, lun_field: bytes | None = None,
             split: int = 0) -> Completion:
        """One command on request queue ``queue``; ``split`` cuts the data buffers in
        that many extra segments (to exercise scatter-gather)."""
        base = DATA_BASE + (queue - 2) * DATA_STRIDE
        header = ScsiRequestHeader.build(target, lun, cdb)
        if lun_field is not None:
            header = ScsiRequestHeader(lun_field, header.tag, header.task_attr, header.prio,
                                       header.crn, header.cdb)
        raw = header.encode()
        hdr_gpa = base
        out_gpa = base + 0x100
        resp_gpa = out_gpa + ((len(data_out) + 0xFF) & ~0xFF)
        in_gpa = resp_gpa + 0x100
        assert in_gpa + data_in <= base + DATA_STRIDE
        self.memory.write(hdr_gpa, raw)
        self.memory.write(resp_gpa, bytes(RESP_SIZE))
        if data_out:
            self.memory.write(out_gpa, data_out)
        if data_in:
            self.memory.write(in_gpa, b"\xEE" * data_in)
        readable = [(hdr_gpa, len(raw)), *_cut(out_gpa, len(data_out), split)]
        writable = [(resp_gpa, RESP_SIZE), *_cut(in_gpa, data_in, split)]
        head = self.submit(queue, readable, writable)
        got, written = self.wait_used(queue)
        assert got == head
        resp = ScsiResponseHeader.decode(self.memory.read(resp_gpa, RESP_SIZE))
        moved = max(0, written - RESP_SIZE)
        return Completion(resp.response, resp.status, resp.sense, resp.resid,
                          self.memory.read(in_gpa, moved) if moved else b"", written)

    def tmf(self, subtype: int, target: int, lun: int, tag: int = 0) -> int:
        base = DATA_BASE + (self.nvrings - 2) * DATA_STRIDE
        req = CtrlTmfRequest(subtype, encode_lun(target, lun), tag).encode()
        self.memory.write(base, req)
        self.memory.write(base + 0x40, b"\xFF")
        self.submit(0, [(base, len(req))], [(base + 0x40, CtrlTmfResponse.SIZE)])
        _, written = self.wait_used(0)
        assert written == 1
        return CtrlTmfResponse.decode(self.memory.read(base + 0x40, 1)).response

    def an_query(self, target: int, lun: int, requested: int) -> CtrlAnResponse:
        base = DATA_BASE + (self.nvrings - 2) * DATA_STRIDE
        req = CtrlAnRequest(ControlType.AN_QUERY, encode_lun(target, lun), requested).encode()
        self.memory.write(base, req)
        self.submit(0, [(base, len(req))], [(base + 0x40, CtrlAnResponse.SIZE)])
        self.wait_used(0)
        return CtrlAnResponse.decode(self.memory.read(base + 0x40, CtrlAnResponse.SIZE))

    def post_event_buffer(self) -> None:
        gpa = DATA_BASE + (self.nvrings - 1) * DATA_STRIDE + 0x40 * (self._events % 64)
        self._events += 1
        self.memory.write(gpa, bytes(VirtioScsiEvent.SIZE))
        self.submit(1, [], [(gpa, VirtioScsiEvent.SIZE)])

    def events(self, count: int, timeout: float = WAIT_S) -> list[VirtioScsiEvent]:
        """Wait for ``count`` events; each buffer is re-posted (as Linux does)."""
        out = []
        driver = self.drivers[1]
        for _ in range(count):
            head, written = self.wait_used(1, timeout)
            assert written == VirtioScsiEvent.SIZE
            addr = _desc_addr(self.memory, driver, head)
            out.append(VirtioScsiEvent.decode(self.memory.read(addr, VirtioScsiEvent.SIZE)))
            self.post_event_buffer()
        return out

    # -- lifecycle -------------------------------------------------------------------

    def close(self, *, unlink: bool = True) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        for fd in (*self.kicks, *self.calls):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kicks, self.calls = [], []
        self.drivers = []
        self.memory = None  # type: ignore[assignment]
        if unlink:
            self.shm.unlink()
        with contextlib.suppress(BufferError):
            self.shm.close()

    def __enter__(self) -> FrontEnd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut(gpa: int, length: int, pieces: int) -> list[tuple[int, int]]:
    if length == 0:
        return []
    if pieces == 0:
        return [(gpa, length)]
    step = max(1, length // (pieces + 1))
    out, pos = [], 0
    while pos < length:
        n = min(step, length - pos)
        out.append((gpa + pos, n))
        pos += n
    return out


def _desc_addr(memory: RegionMemory, driver: SplitQueueDriver, head: int) -> int:
    """The buffer address of a single-descriptor chain (event buffers)."""
    return memory.load_u64(driver.layout.desc_addr + 16 * head)
