"""An in-process virtio-scsi DEVICE for the guest tests: the core's device-side
``Virtqueue`` on each vring of a guest layout, SCSI executed by the core ``Target`` over
memory LUNs. No sockets, no threads: a test calls :meth:`FakeScsiDevice.run`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from vfdirect.core.guest.layout import GuestLayout, LayoutParams
from vfdirect.core.scsi import LogicalUnit, LuIdentity, Target
from vfdirect.core.virtio import DescriptorChain, GuestMemory, RegionMemory, Virtqueue
from vfdirect.core.virtio.scsi import (
    CONTROLQ,
    EVENTQ,
    REQUESTQ_BASE,
    SENSE_DEFAULT_SIZE,
    CtrlTmfRequest,
    CtrlTmfResponse,
    ScsiRequestHeader,
    ScsiResponseHeader,
    VirtioScsiEvent,
    VirtioScsiResponse,
)
from vfdirect.core.wwn import Wwn
from vfdirect.storage.memory import MemoryBackend

SMALL = LayoutParams(memory_size=2 << 20, request_queues=2, queue_size=16,
                     control_queue_size=16, event_queue_size=4, tags=16, slot_size=8192,
                     journal_size=64 << 10)


def make_guest(params: LayoutParams = SMALL) -> tuple[RegionMemory, bytearray, GuestLayout]:
    buf = bytearray(params.memory_size)
    return RegionMemory.from_buffers([(0, buf)]), buf, GuestLayout.plan(params)


def make_lu(num_blocks: int = 256, block_size: int = 512, serial: str = "S0",
            n: int = 1) -> LogicalUnit:
    ident = LuIdentity("VFDIRECT", "VDISK", "0001", serial, Wwn.naa5(0x9000 + n))
    return LogicalUnit(MemoryBackend(block_size, num_blocks), ident)


def _split(views: list[memoryview], skip: int) -> list[memoryview]:
    out = []
    for view in views:
        if skip >= len(view):
            skip -= len(view)
            continue
        out.append(view[skip:])
        skip = 0
    return out


@dataclass
class Executed:
    vring: int
    target: int
    lun: int
    tag: int
    cdb: bytes


@dataclass
class FakeScsiDevice:
    memory: GuestMemory
    layout: GuestLayout | None
    targets: dict[int, Target] = field(default_factory=dict)
    sense_size: int = SENSE_DEFAULT_SIZE
    cdb_size: int = 32
    indirect: bool = True
    #: Commands for which this returns True are held (never completed until released).
    hold: Callable[[ScsiRequestHeader], bool] = lambda header: False
    held: list[tuple[int, DescriptorChain, ScsiRequestHeader]] = field(default_factory=list)
    executed: list[Executed] = field(default_factory=list)
    tmfs: list[CtrlTmfRequest] = field(default_factory=list)
    queues: dict[int, Virtqueue] = field(default_factory=dict)
    event_chains: list[DescriptorChain] = field(default_factory=list)
    request_queues: int | None = None

    def __post_init__(self) -> None:
        if self.layout is not None:
            self.connect()

    def connect(self) -> None:
        """(Re)start every vring with base = used.idx found in memory (the front end's
        reconnect rule)."""
        assert self.layout is not None
        self.queues = {}
        count = self.request_queues or self.layout.params.request_queues
        for index in (CONTROLQ, EVENTQ, *range(REQUESTQ_BASE, REQUESTQ_BASE + count)):
            config = self.layout.queues[index].queue_config()
            if not self.indirect and config.indirect:
                config = replace(config, indirect=False)
            used = self.memory.load_u16(config.used_addr + 2)
            self.queues[index] = Virtqueue(self.memory, config, last_avail_idx=used)
        self.event_chains = []

    def disconnect(self) -> None:
        """What the back end must do before dropping a connection: complete every request
        it took (held ones are aborted) and return event buffers... which it keeps."""
        self.release_held(VirtioScsiResponse.ABORTED)

    # -- processing -------------------------------------------------------------------------

    def run(self) -> int:
        return sum(self.run_queue(index) for index in list(self.queues))

    def run_queue(self, index: int) -> int:
        queue = self.queues[index]
        done = 0
        while (chain := queue.pop()) is not None:
            if index == CONTROLQ:
                self._control(queue, chain)
            elif index == EVENTQ:
                self.event_chains.append(chain)
            else:
                done += self._request(index, queue, chain)
        return done

    def _request(self, index: int, queue: Virtqueue, chain: DescriptorChain) -> int:
        size = ScsiRequestHeader.size(self.cdb_size)
        header = ScsiRequestHeader.decode(chain.read(self.memory, 0, size), self.cdb_size)
        if self.hold(header):
            self.held.append((index, chain, header))
            return 0
        self._execute(queue, chain, header)
        return 1

    def _execute(self, queue: Virtqueue, chain: DescriptorChain,
                 header: ScsiRequestHeader, response: int = VirtioScsiResponse.OK) -> None:
        resp_size = ScsiResponseHeader.size(self.sense_size)
        target, lun = header.address()
        self.executed.append(Executed(-1, target, lun, header.tag, header.cdb))
        if response != VirtioScsiResponse.OK:
            resp = ScsiResponseHeader(response)
            written = chain.write(self.memory, resp.encode(self.sense_size))
        elif target not in self.targets:
            resp = ScsiResponseHeader(VirtioScsiResponse.BAD_TARGET)
            written = chain.write(self.memory, resp.encode(self.sense_size))
        else:
            data_out = _split(chain.readable_views(self.memory),
                              ScsiRequestHeader.size(self.cdb_size))
            data_in = _split(chain.writable_views(self.memory), resp_size)
            result = self.targets[target].execute(lun, header.cdb, data_out, data_in)
            resp = ScsiResponseHeader(VirtioScsiResponse.OK, int(result.status),
                                      result.sense[:self.sense_size], result.residual)
            written = chain.write(self.memory, resp.encode(self.sense_size))
            written += result.data_in_len
        queue.push_used(chain.head, written)

    def _control(self, queue: Virtqueue, chain: DescriptorChain) -> None:
        tmf = CtrlTmfRequest.decode(chain.read(self.memory, 0, CtrlTmfRequest.SIZE))
        self.tmfs.append(tmf)
        found = [h for h in self.held if h[2].tag == tmf.tag]
        for held in found:
            self.held.remove(held)
            index, req_chain, header = held
            self._execute(self.queues[index], req_chain, header, VirtioScsiResponse.ABORTED)
        response = VirtioScsiResponse.FUNCTION_COMPLETE if found else \
            VirtioScsiResponse.FUNCTION_SUCCEEDED
        chain.write(self.memory, CtrlTmfResponse(response).encode())
        queue.push_used(chain.head, 1)

    def release_held(self, response: int = VirtioScsiResponse.OK) -> None:
        for index, chain, header in self.held:
            self._execute(self.queues[index], chain, header, response)
        self.held.clear()

    def post_event(self, event: VirtioScsiEvent) -> bool:
        if not self.event_chains:
            return False
        chain = self.event_chains.pop(0)
        chain.write(self.memory, event.encode())
        self.queues[EVENTQ].push_used(chain.head, VirtioScsiEvent.SIZE)
        return True
