"""The VF's virtio-scsi device logic (pure): command requests against the VF's targets
with zero-copy data, the response header, BAD_TARGET / OVERRUN / sense, framing faults,
task management and AN on the control queue, hot-plug events, and the fuzz invariant:
a chain is answered or refused with RequestFault, nothing else."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest
from adapter_fakes import (
    VPORT,
    MemoryPlatform,
    configured_model,
    standard_mapping,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.adapter import build_targets
from vfdirect.core.adapter.mapping import MappingTable
from vfdirect.core.adapter.vscsi import (
    LunInfo,
    RequestFault,
    VscsiSettings,
    event_bytes,
    execute_command,
    execute_control,
    rescan_events,
    visible_luns,
)
from vfdirect.core.ids import TargetId
from vfdirect.core.scsi import LogicalUnit, LuIdentity, Status, Target, decode_sense
from vfdirect.core.scsi.sense import (
    ACCESS_DENIED_NO_ACCESS_RIGHTS,
    LBA_OUT_OF_RANGE,
    LOGICAL_UNIT_NOT_SUPPORTED,
)
from vfdirect.core.virtio import DriverLayout, RegionMemory, SplitQueueDriver, Virtqueue
from vfdirect.core.virtio.scsi import (
    EVENTS_MISSED,
    ControlType,
    CtrlAnRequest,
    CtrlAnResponse,
    CtrlTmfRequest,
    EventType,
    ScsiRequestHeader,
    ScsiResponseHeader,
    TmfSubtype,
    TransportResetReason,
    VirtioScsiConfig,
    VirtioScsiEvent,
    VirtioScsiResponse,
    encode_lun,
)
from vfdirect.core.wwn import Wwn

S = VscsiSettings()
HDR = S.request_header_size
RESP = S.response_header_size
GUEST = 0x40000
DATA = 0x10000  # data buffers from here
_R = VirtioScsiResponse


@dataclass
class Guest:
    memory: RegionMemory
    buf: bytearray
    driver: SplitQueueDriver
    device: Virtqueue


def guest(size: int = 64) -> Guest:
    buf = bytearray(GUEST)
    memory = RegionMemory.from_buffers([(0, buf)])
    layout = DriverLayout.plan(0x1000, size, event_idx=True, max_indirect=16)
    driver = SplitQueueDriver.create(memory, layout)
    return Guest(memory, buf, driver, Virtqueue(memory, layout.queue_config()))


def targets(grant: bool = True) -> tuple[Mapping[TargetId, Target], MemoryPlatform,
                                         MappingTable]:
    model, platform = configured_model(grant=grant)
    doc, _ = standard_mapping()
    model.call("mapping_load", {"vf": 0, "mapping": doc})
    vf = model.vf(0)
    initiator = model.state.initiator_of(0)
    assert initiator is not None and vf.mapping is not None
    return build_targets(vf.mapping, lambda e: platform.block_device(initiator, e.layout)), \
        platform, vf.mapping


def submit(g: Guest, cdb: bytes, *, target: int = 0, lun: int = 0, out: bytes = b"",
           data_in: int = 0, lun_field: bytes | None = None,
           writable: list[tuple[int, int]] | None = None) -> int:
    header = ScsiRequestHeader.build(target, lun, cdb)
    raw = header.encode() if lun_field is None else lun_field + header.encode()[8:]
    g.memory.write(DATA, raw)
    readable = [(DATA, len(raw))]
    if out:
        g.memory.write(DATA + 0x100, out)
        readable.append((DATA + 0x100, len(out)))
    if writable is None:
        writable = [(DATA + 0x8000, RESP)]
        if data_in:
            writable.append((DATA + 0x9000, data_in))
    return g.driver.submit(readable, writable, 1)[0]


def run(g: Guest, tg: Mapping[TargetId, Target]) -> tuple[ScsiResponseHeader, int]:
    chain = g.device.pop()
    assert chain is not None
    outcome = execute_command(chain, g.memory, tg, S)
    g.device.push_used(chain.head, outcome.written)
    used = g.driver.pop_used()
    assert used is not None and used.written == outcome.written
    return ScsiResponseHeader.decode(g.memory.read(DATA + 0x8000, RESP)), outcome.written


def rw10(opcode: int, lba: int, blocks: int) -> bytes:
    return bytes([opcode, 0, *lba.to_bytes(4, "big"), 0, *blocks.to_bytes(2, "big"), 0])


# -- request queue ----------------------------------------------------------------------


def test_write_then_read_moves_data_between_guest_memory_and_the_lun() -> None:
    tg, platform, table = targets()
    g = guest()
    data = bytes(range(256)) * 16
    submit(g, rw10(0x2A, 5, 8), lun=1, out=data)
    resp, written = run(g, tg)
    assert (resp.response, resp.status, resp.resid, written) == (0, Status.GOOD, 0, RESP)
    submit(g, rw10(0x28, 5, 8), lun=1, data_in=4096)
    resp, written = run(g, tg)
    assert (resp.response, resp.status, written) == (0, Status.GOOD, RESP + 4096)
    assert g.memory.read(DATA + 0x9000, 4096) == data
    # the blocks are on the physical LUN where the first mapping of (0, 1) says
    place = table.entries[1].layout.placements[0]
    lun = platform.luns[place.extent.lun]
    out = bytearray(4096)
    lun.read_blocks(place.extent.start + 5, [memoryview(out)])
    assert bytes(out) == data


def test_data_in_starts_after_a_response_header_split_over_two_segments() -> None:
    tg, _, _ = targets()
    g = guest()
    data = b"\xA5" * 512
    submit(g, rw10(0x2A, 0, 1), out=data)
    run(g, tg)
    # response header cut 100 + 8; data-in begins 8 bytes into the second segment
    submit(g, rw10(0x28, 0, 1),
           writable=[(DATA + 0x8000, 100), (DATA + 0xA000, 8 + 512)])
    chain = g.device.pop()
    assert chain is not None
    outcome = execute_command(chain, g.memory, tg, S)
    assert outcome.written == RESP + 512 and outcome.status == Status.GOOD
    raw = g.memory.read(DATA + 0x8000, 100) + g.memory.read(DATA + 0xA000, 8)
    assert ScsiResponseHeader.decode(raw).response == 0
    assert g.memory.read(DATA + 0xA000 + 8, 512) == data


def test_residual_and_overrun() -> None:
    tg, _, _ = targets()
    g = guest()
    submit(g, rw10(0x28, 0, 1), data_in=4096)  # one block into a 4 KiB buffer
    resp, written = run(g, tg)
    assert (resp.status, resp.resid, written) == (Status.GOOD, 4096 - 512, RESP + 512)
    submit(g, rw10(0x28, 0, 8), data_in=512)  # eight blocks into one block's room
    resp, written = run(g, tg)
    assert (resp.response, resp.resid, written) == (_R.OVERRUN, 512, RESP)


def test_addressing_bad_target_and_lun_without_logical_unit() -> None:
    tg, _, _ = targets()
    g = guest()
    submit(g, bytes(6), target=7)  # TEST UNIT READY to a target id with no entry
    resp, _ = run(g, tg)
    assert resp.response == _R.BAD_TARGET
    submit(g, bytes(6), lun_field=bytes((2, 0, 0x40, 0, 0, 0, 0, 0)))  # byte 0 not 1
    resp, _ = run(g, tg)
    assert resp.response == _R.BAD_TARGET
    submit(g, bytes(6), target=0, lun=9)  # target 0 exists, LUN 9 does not
    resp, _ = run(g, tg)
    assert (resp.response, resp.status) == (_R.OK, Status.CHECK_CONDITION)
    assert decode_sense(resp.sense).sense == LOGICAL_UNIT_NOT_SUPPORTED
    # peripheral addressing of LUN 1 reaches the same LU as Linux's flat form
    submit(g, bytes(6), lun_field=bytes((1, 0, 0x00, 1, 0, 0, 0, 0)))
    resp, _ = run(g, tg)
    assert (resp.response, resp.status) == (_R.OK, Status.GOOD)
    # nothing mapped: every target is absent
    submit(g, bytes(6))
    chain = g.device.pop()
    assert chain is not None
    assert execute_command(chain, g.memory, {}, S).response == _R.BAD_TARGET


def test_sense_from_the_scsi_core_and_the_fabric() -> None:
    tg, _, _ = targets()
    g = guest()
    submit(g, rw10(0x28, 200, 1), data_in=512)  # vd-a has 200 blocks
    resp, _ = run(g, tg)
    assert resp.status == Status.CHECK_CONDITION
    assert decode_sense(resp.sense).sense == LBA_OUT_OF_RANGE
    denied, _, _ = targets(grant=False)
    submit(g, rw10(0x28, 0, 1), data_in=512)
    chain = g.device.pop()
    assert chain is not None
    outcome = execute_command(chain, g.memory, denied, S)
    assert outcome.status == Status.CHECK_CONDITION and outcome.sense_key == 0x5
    resp = ScsiResponseHeader.decode(g.memory.read(DATA + 0x8000, RESP))
    assert decode_sense(resp.sense).sense == ACCESS_DENIED_NO_ACCESS_RIGHTS


def test_badly_framed_requests_are_faults() -> None:
    tg, _, _ = targets()
    g = guest()
    g.driver.submit([(DATA, HDR - 1)], [(DATA + 0x8000, RESP)], 1)
    chain = g.device.pop()
    assert chain is not None
    with pytest.raises(RequestFault, match="request header needs"):
        execute_command(chain, g.memory, tg, S)
    g.driver.submit([(DATA, HDR)], [(DATA + 0x8000, RESP - 1)], 2)
    chain = g.device.pop()
    assert chain is not None
    with pytest.raises(RequestFault, match="response header needs"):
        execute_command(chain, g.memory, tg, S)


@settings(max_examples=150, deadline=None)
@given(header=st.binary(min_size=0, max_size=80), out=st.integers(0, 2),
       writable=st.lists(st.integers(1, 700), max_size=4), data=st.binary(max_size=64))
def test_fuzz_any_chain_is_answered_or_a_request_fault(header: bytes, out: int,
                                                       writable: list[int],
                                                       data: bytes) -> None:
    tg = _FUZZ_TARGETS
    g = guest()
    g.memory.write(DATA, header.ljust(80, b"\0")[:max(len(header), 1)])
    readable = [(DATA, max(len(header), 1))]
    if out:
        g.memory.write(DATA + 0x100, data.ljust(512 * out, b"\0"))
        readable.append((DATA + 0x100, 512 * out))
    w = [(DATA + 0x8000 + 0x800 * i, n) for i, n in enumerate(writable)]
    g.driver.submit(readable, w, 1)
    chain = g.device.pop()
    assert chain is not None
    try:
        outcome = execute_command(chain, g.memory, tg, S)
    except RequestFault:
        return
    assert RESP <= outcome.written <= chain.writable_length
    g.device.push_used(chain.head, outcome.written)


_FUZZ_TARGETS = targets()[0]


# -- control queue ----------------------------------------------------------------------


def control(g: Guest, request: bytes, writable: int) -> tuple[int, bytes]:
    g.memory.write(DATA, request)
    g.memory.write(DATA + 0x8000, b"\xFF" * 8)
    g.driver.submit([(DATA, len(request))], [(DATA + 0x8000, writable)], 1)
    chain = g.device.pop()
    assert chain is not None
    outcome = execute_control(chain, g.memory, _FUZZ_TARGETS)
    g.device.push_used(chain.head, outcome.written)
    g.driver.pop_used()
    return outcome.written, g.memory.read(DATA + 0x8000, 8)


@pytest.mark.parametrize(("subtype", "target", "lun", "expected"), [
    # synchronous execution: no task is ever in the task set when a TMF is read
    (TmfSubtype.ABORT_TASK, 0, 0, _R.FUNCTION_COMPLETE),
    (TmfSubtype.ABORT_TASK_SET, 0, 1, _R.FUNCTION_COMPLETE),
    (TmfSubtype.CLEAR_TASK_SET, 0, 0, _R.FUNCTION_COMPLETE),
    (TmfSubtype.LOGICAL_UNIT_RESET, 1, 0, _R.FUNCTION_COMPLETE),
    (TmfSubtype.I_T_NEXUS_RESET, 0, 77, _R.FUNCTION_COMPLETE),  # the LUN is ignored
    (TmfSubtype.QUERY_TASK, 0, 0, _R.FUNCTION_COMPLETE),  # not found: not SUCCEEDED
    (TmfSubtype.QUERY_TASK_SET, 0, 0, _R.FUNCTION_COMPLETE),
    (TmfSubtype.CLEAR_ACA, 0, 0, _R.FUNCTION_REJECTED),
    (99, 0, 0, _R.FUNCTION_REJECTED),
    (TmfSubtype.ABORT_TASK, 9, 0, _R.BAD_TARGET),
    (TmfSubtype.LOGICAL_UNIT_RESET, 0, 5, _R.INCORRECT_LUN),
])
def test_task_management(subtype: int, target: int, lun: int, expected: int) -> None:
    g = guest()
    written, raw = control(g, CtrlTmfRequest(subtype, encode_lun(target, lun), 42).encode(),
                           1)
    assert written == 1 and raw[0] == expected
    assert raw[1] == 0xFF  # nothing written past the response byte


@pytest.mark.parametrize("kind", [ControlType.AN_QUERY, ControlType.AN_SUBSCRIBE])
def test_asynchronous_notification_supports_no_event(kind: int) -> None:
    g = guest()
    req = CtrlAnRequest(kind, encode_lun(0, 0), 0x7E).encode()
    written, raw = control(g, req, CtrlAnResponse.SIZE)
    assert written == CtrlAnResponse.SIZE
    assert CtrlAnResponse.decode(raw) == CtrlAnResponse(0, _R.OK)


def test_control_framing() -> None:
    g = guest()
    assert control(g, struct.pack("<I", 77) + bytes(20), 4)[0] == 0  # unknown type
    for request, writable in ((b"\0\0", 1),  # shorter than the type field
                              (CtrlTmfRequest(0, encode_lun(0, 0)).encode()[:20], 1),
                              (CtrlTmfRequest(0, encode_lun(0, 0)).encode(), 0),
                              (CtrlAnRequest(1, encode_lun(0, 0), 0).encode(), 4)):
        g.memory.write(DATA, request)
        w = [(DATA + 0x8000, writable)] if writable else []
        g.driver.submit([(DATA, len(request))], w, 1)
        chain = g.device.pop()
        assert chain is not None
        with pytest.raises(RequestFault):
            execute_control(chain, g.memory, _FUZZ_TARGETS)
        g.device.push_used(chain.head, 0)
        g.driver.pop_used()


# -- events -----------------------------------------------------------------------------


def _info(vdisk: str, capacity: int = 100) -> LunInfo:
    return LunInfo(vdisk, 512, capacity, "S" + vdisk, Wwn.naa5(0x99))


def test_rescan_events_per_changed_lun() -> None:
    old = {(0, 0): _info("a"), (0, 1): _info("b"), (0, 2): _info("c")}
    new = {(0, 0): _info("a"), (0, 2): _info("x"), (1, 3): _info("d"),
           (0, 1): _info("b", 200)}
    events = rescan_events(old, new, hotplug=True, change=True)
    rr, removed = TransportResetReason.RESCAN, TransportResetReason.REMOVED
    assert [(e.kind, e.lun, e.reason) for e in events] == [
        (EventType.PARAM_CHANGE, encode_lun(0, 1), 0x2A | 0x09 << 8),
        (EventType.TRANSPORT_RESET, encode_lun(0, 2), removed),
        (EventType.TRANSPORT_RESET, encode_lun(0, 2), rr),
        (EventType.TRANSPORT_RESET, encode_lun(1, 3), rr),
    ]
    # without CHANGE a resize is a remove and a rescan; without HOTPLUG nothing of those
    assert len(rescan_events(old, new, hotplug=True, change=False)) == 5
    only = rescan_events(old, new, hotplug=False, change=True)
    assert [e.kind for e in only] == [EventType.PARAM_CHANGE]
    assert rescan_events(old, dict(old), hotplug=True, change=True) == []


def test_visible_luns_need_a_mapping_and_a_login() -> None:
    doc, _ = standard_mapping()
    table = MappingTable.load(doc)
    assert visible_luns(table, None) == {}
    assert visible_luns(None, VPORT) == {}
    assert sorted(visible_luns(table, VPORT)) == [(0, 0), (0, 1), (1, 0)]


def test_event_bytes() -> None:
    ev = VirtioScsiEvent.transport_reset(0, 3, TransportResetReason.RESCAN)
    assert VirtioScsiEvent.decode(event_bytes(ev, False)) == ev
    missed = VirtioScsiEvent.decode(event_bytes(ev, True))
    assert missed.events_missed and missed.kind == EventType.TRANSPORT_RESET
    none = VirtioScsiEvent.decode(event_bytes(None, True))
    assert none.event == EventType.NO_EVENT | EVENTS_MISSED


def test_settings_config_space_and_backend_offer() -> None:
    s = VscsiSettings(request_queues=3)
    config = VirtioScsiConfig.decode(s.config().encode())
    assert (config.num_queues, config.sense_size, config.cdb_size, config.max_target,
            config.max_lun) == (3, 96, 32, 255, 16383)
    backend = s.backend_config()
    assert backend.num_queues == 5 and backend.config_space == s.config().encode()
    with pytest.raises(ValueError, match="request_queues"):
        VscsiSettings(request_queues=0)


def test_tmf_lun_decode_forms() -> None:
    g = guest()
    # peripheral form of LUN 1 on target 0 is a valid LUN for a TMF too
    req = CtrlTmfRequest(TmfSubtype.LOGICAL_UNIT_RESET, bytes((1, 0, 0, 1, 0, 0, 0, 0)))
    assert control(g, req.encode(), 1)[1][0] == _R.FUNCTION_COMPLETE
    req = CtrlTmfRequest(TmfSubtype.LOGICAL_UNIT_RESET, bytes((1, 0, 0x80, 1, 0, 0, 0, 0)))
    assert control(g, req.encode(), 1)[1][0] == _R.INCORRECT_LUN
    req = CtrlTmfRequest(TmfSubtype.LOGICAL_UNIT_RESET, bytes((1, 0, 0x40, 1, 0, 0, 0, 1)))
    assert control(g, req.encode(), 1)[1][0] == _R.INCORRECT_LUN


class _SpyDevice:
    """A block device that records the buffers it is handed."""

    block_size = 512
    num_blocks = 64

    def __init__(self) -> None:
        self.seen: list[object] = []

    def read_blocks(self, lba: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            self.seen.append(b.obj)
            b[:] = bytes([lba & 0xFF]) * b.nbytes

    def write_blocks(self, lba: int, bufs: Sequence[memoryview], *, fua: bool = False) -> None:
        self.seen.extend(b.obj for b in bufs)

    def flush(self) -> None:
        pass


def test_data_moves_with_no_intermediate_copy() -> None:
    """The block device is handed views of guest memory itself (claim A10: the data
    moves between the physical LUN and guest memory without an extra copy)."""
    spy = _SpyDevice()
    target = Target()
    target.add_lu(0, LogicalUnit(spy, LuIdentity(vendor="V", product="P", revision="1",
                                                 serial="S1", wwn=Wwn.naa5(0x42))))
    tg = {TargetId(0): target}
    g = guest()
    submit(g, rw10(0x28, 7, 2), data_in=1024)
    resp, _ = run(g, tg)
    assert resp.status == Status.GOOD
    assert spy.seen and all(obj is g.buf for obj in spy.seen)
    assert g.memory.read(DATA + 0x9000, 1024) == b"\x07" * 1024
    spy.seen.clear()
    submit(g, rw10(0x2A, 0, 1), out=b"w" * 512)
    run(g, tg)
    assert spy.seen and all(obj is g.buf for obj in spy.seen)
