"""All the cores together, in one process: a VM (driver + vhost-user front end) and a VF
(vhost-user back end + device-side virtqueue) exchange virtio-scsi requests through
shared guest memory; the ring is stopped and restarted (GET_VRING_BASE), and its state
is handed to a new owner (claim B3-B5) without losing or repeating a request."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from vfdirect.core.vhost import frontend
from vfdirect.core.vhost.messages import Channel, MemoryRegionDesc, VhostUserMessage
from vfdirect.core.vhost.parser import MessageParser
from vfdirect.core.vhost.session import (
    BackendConfig,
    BackendSession,
    MapMemory,
    SendReply,
    StartVring,
    StopVring,
)
from vfdirect.core.virtio import (
    DriverLayout,
    QueueState,
    RegionMemory,
    SplitQueueDriver,
    Virtqueue,
)
from vfdirect.core.virtio.features import VirtioFeature, mask
from vfdirect.core.virtio.scsi import (
    REQUESTQ_BASE,
    ScsiRequestHeader,
    ScsiResponseHeader,
    VirtioScsiConfig,
    VirtioScsiResponse,
)

GUEST = 0x40000
USER_BASE = 0x7F55_0000_0000
FEATURES = mask([VirtioFeature.VERSION_1, VirtioFeature.RING_EVENT_IDX,
                 VirtioFeature.RING_INDIRECT_DESC])


class Vf:
    """The device side: one session, its memory, its request queue."""

    def __init__(self, shared: bytearray) -> None:
        self.shared = shared  # what mapping the memory fd would give
        config = VirtioScsiConfig(num_queues=1).encode()
        self.session = BackendSession(BackendConfig(FEATURES, 3, config_space=config))
        self.parser = MessageParser(Channel.FRONTEND_REQUESTS)
        self.memory: RegionMemory | None = None
        self.queue: Virtqueue | None = None

    def receive(self, msg: VhostUserMessage) -> list[VhostUserMessage]:
        (parsed,) = self.parser.feed(msg.encode(), msg.fds)
        out = []
        for action in self.session.handle(parsed):
            if isinstance(action, SendReply):
                out.append(action.message)
            elif isinstance(action, MapMemory):
                (region,) = action.regions
                view = memoryview(self.shared)[region.mmap_offset:][:region.memory_size]
                self.memory = RegionMemory.from_table(
                    [(region.guest_phys_addr, region.userspace_addr, view)])
            elif isinstance(action, StartVring) and action.setup.index == REQUESTQ_BASE:
                assert self.memory is not None
                self.queue = Virtqueue(self.memory, action.setup.queue_config(self.memory),
                                       last_avail_idx=action.setup.base)
            elif isinstance(action, StopVring):
                assert self.queue is not None
                out += [a.message for a in self.session.vring_stopped(
                    action.index, self.queue.last_avail_idx) if isinstance(a, SendReply)]
                self.queue = None
        return out

    def serve(self, queue: Virtqueue | None = None) -> int:
        """Answer every pending request: INQUIRY-like data of 36 bytes."""
        queue = queue or self.queue
        assert queue is not None and self.memory is not None
        served = 0
        while (chain := queue.pop()) is not None:
            header = ScsiRequestHeader.decode(chain.read(self.memory, 0,
                                                         ScsiRequestHeader.size()))
            target, lun = header.address()
            data = bytes([target, lun & 0xFF]) + header.cdb[:2] + bytes(32)
            response = ScsiResponseHeader(VirtioScsiResponse.OK, 0).encode() + data
            written = chain.write(self.memory, response)
            queue.push_used(chain.head, written)
            served += 1
        assert served == 0 or queue.should_notify()
        return served


def converse(vf: Vf, procedure: Generator[VhostUserMessage, VhostUserMessage | None, Any],
             protocol: int) -> Any:
    replies = MessageParser(Channel.FRONTEND_REPLIES)
    try:
        msg = next(procedure)
        while True:
            answers = vf.receive(msg)
            if frontend.expects_reply(msg, protocol):
                (answer,) = answers
                (reply,) = replies.feed(answer.encode())
                msg = procedure.send(reply)
            else:
                assert answers == []
                msg = procedure.send(None)
    except StopIteration as done:
        return done.value


class Vm:
    """The guest side: memory, a driver on the first request queue, and a front end."""

    def __init__(self) -> None:
        self.shared = bytearray(GUEST)
        self.memory = RegionMemory.from_table([(0, USER_BASE, self.shared)])
        self.layout = DriverLayout.plan(0x1000, 32, max_indirect=8)
        self.driver = SplitQueueDriver.create(self.memory, self.layout)
        self.next_buf = 0x20000

    def connect(self, vf: Vf, base: int = 0) -> frontend.Negotiated:
        negotiated = converse(vf, frontend.negotiate(FEATURES, 0xFFFF_FFFF), 0)
        assert isinstance(negotiated, frontend.Negotiated)
        table = [(MemoryRegionDesc(0, GUEST, USER_BASE, 0), 3)]
        vring = frontend.FrontendVring(REQUESTQ_BASE, self.layout.queue_config(), 4, 5, base)
        converse(vf, frontend.start_device(negotiated, self.memory, table, [vring]),
                 negotiated.protocol_features)
        return negotiated

    def inquiry(self, target: int, lun: int, tag: int) -> int:
        header = ScsiRequestHeader.build(target, lun, bytes([0x12, 0, 0, 0, 36, 0]), tag=tag)
        req, resp = self.next_buf, self.next_buf + 0x100
        self.next_buf += 0x200
        self.memory.write(req, header.encode())
        head, _ = self.driver.submit([(req, ScsiRequestHeader.size())],
                                     [(resp, ScsiResponseHeader.size()), (resp + 108, 36)],
                                     token=tag)
        return head

    def completions(self) -> dict[int, bytes]:
        done = {}
        while (used := self.driver.pop_used()) is not None:
            assert used.written == 108 + 36
            done[used.token] = used.token.to_bytes(8, "little")
        return done


def test_requests_flow_stop_restart_and_hand_off() -> None:
    vm = Vm()
    vf = Vf(vm.shared)
    negotiated = vm.connect(vf)
    assert vf.queue is not None

    for tag in range(5):
        vm.inquiry(tag % 3, 256 + tag, tag)
    assert vf.serve() == 5
    assert sorted(vm.completions()) == [0, 1, 2, 3, 4]

    # QEMU-style stop (GET_VRING_BASE) while two requests wait, then restart from the
    # base the back end reported.
    vm.inquiry(1, 1, 10)
    vm.inquiry(1, 2, 11)
    bases = converse(vf, frontend.stop_vrings([REQUESTQ_BASE]), negotiated.protocol_features)
    assert bases == {REQUESTQ_BASE: 5} and vf.queue is None
    vm.connect(vf, base=bases[REQUESTQ_BASE])
    assert vf.serve() == 2
    assert sorted(vm.completions()) == [10, 11]

    # Hand-off (claims B3-B5): quiesce with one request popped but unanswered, save
    # the queue state as plain data, and let a new owner resume from it.
    vm.inquiry(2, 7, 20)
    vm.inquiry(2, 8, 21)
    queue = vf.queue
    assert queue is not None and vf.memory is not None
    first = queue.pop()
    assert first is not None
    record = queue.save().to_dict()
    new_owner = Virtqueue.restore(QueueState.from_dict(record), vf.memory)
    resubmitted = new_owner.read_chain(first.head)
    assert resubmitted.readable == first.readable
    new_owner.push_used(first.head, resubmitted.write(
        vf.memory, ScsiResponseHeader().encode() + bytes(36)))
    assert vf.serve(new_owner) == 1
    assert sorted(vm.completions()) == [20, 21]
    assert vm.driver.num_free == 32
    final = new_owner.save()
    assert final.in_flight == () and final.last_avail_idx == final.used_idx == 9
