"""A VF as a virtio-scsi device (claim A10): what it does with each chain it takes from a
virtqueue, as pure functions over guest memory and the VF's SCSI targets.

Rules of this module:

* the shell pops a chain (copied out of guest memory and validated by
  :class:`~vfdirect.core.virtio.Virtqueue`), calls one function here, and pushes the used
  element with the byte count returned. Nothing here touches a ring index, an eventfd or
  a clock;
* every header is COPIED out of guest memory before it is decoded (the driver may change
  it under our feet); data buffers are zero-copy views of guest memory handed straight to
  the SCSI core, whose block devices ``preadv``/``pwritev`` into them;
* framing the driver got wrong (a request shorter than its header, no room for the
  response) is :class:`RequestFault`: the VF answers it as QEMU's virtio-scsi answers it,
  by entering its error state (VIRTIO 1.x 2.1.2, DEVICE_NEEDS_RESET); everything inside a
  well-framed request is answered on the wire (BAD_TARGET, OVERRUN, CHECK CONDITION);
* request queue addressing (5.6.6.1): byte 0 of the LUN field is 1, byte 1 the target,
  bytes 2..7 the SAM single-level LUN. A target id without an entry in the VF's mapping
  (or any target while the VF has no mapping or no bound, logged-in vport) answers
  VIRTIO_SCSI_S_BAD_TARGET; a LUN of an existing target without a logical unit is the
  SCSI core's LOGICAL UNIT NOT SUPPORTED;
* task management (5.6.6.2): when the VF answers a TMF no task of this I_T nexus is in
  the task set (it has completed and its used element is published, or it is still in
  the available ring, not yet received): by default the VF executes each request to
  completion before it looks at the next chain of any queue; with IO threads (requests
  executing concurrently, completed out of order) a control request waits until no
  command of the VF is executing, and no new chain is fetched meanwhile. Per SAM-5
  (which 5.6.6.2 maps 1-to-1) the functions that act on tasks therefore complete with
  FUNCTION COMPLETE (nothing left to abort or clear; QUERY TASK / QUERY TASK SET find no
  task, which is FUNCTION COMPLETE, not FUNCTION SUCCEEDED); CLEAR ACA is FUNCTION
  REJECTED (ACA is not supported, NACA is 0); unknown functions are FUNCTION REJECTED;
* asynchronous notification (5.6.6.2): no AN event class is supported, so a query or a
  subscription answers ``event_actual`` 0, response OK;
* hot-plug (5.6.6.3): a change of the LUNs the VF exposes becomes TRANSPORT_RESET events
  (RESCAN for a new LUN, REMOVED for a gone one, both for one whose vdisk changed; only
  with VIRTIO_SCSI_F_HOTPLUG) or PARAM_CHANGE CAPACITY DATA HAS CHANGED (with
  VIRTIO_SCSI_F_CHANGE) for a vdisk that only changed size. Events are not queued for
  an empty event queue: the device drops them and sets EVENTS_MISSED on the next event
  it reports (5.6.6.3, device requirements).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace

from vfdirect.core.adapter.mapping import MappingTable
from vfdirect.core.ids import TargetId
from vfdirect.core.scsi import ScsiResult, Status, Target
from vfdirect.core.vhost.messages import ProtocolFeature
from vfdirect.core.vhost.session import BackendConfig
from vfdirect.core.virtio.features import VirtioFeature, bit, mask
from vfdirect.core.virtio.memory import GuestMemory
from vfdirect.core.virtio.ring import DescriptorChain, Segment
from vfdirect.core.virtio.scsi import (
    EVENTS_MISSED,
    ControlType,
    CtrlAnRequest,
    CtrlAnResponse,
    CtrlTmfRequest,
    CtrlTmfResponse,
    EventType,
    ScsiFeature,
    ScsiRequestHeader,
    ScsiResponseHeader,
    TmfSubtype,
    TransportResetReason,
    VirtioScsiConfig,
    VirtioScsiError,
    VirtioScsiEvent,
    VirtioScsiResponse,
    decode_control_type,
    encode_lun,
)
from vfdirect.core.wwn import Wwn

__all__ = [
    "CommandOutcome",
    "CommandRequest",
    "ControlOutcome",
    "LunInfo",
    "RequestFault",
    "VscsiSettings",
    "answer_command",
    "complete_command",
    "event_bytes",
    "execute_command",
    "execute_control",
    "execute_control_for",
    "parse_command",
    "rescan_events",
    "segment_views",
    "tmf_response",
    "tmf_response_for",
    "visible_luns",
]

_R = VirtioScsiResponse
#: vhost-user protocol features a VF offers: no LOG_SHMFD (the VF does not log dirty
#: pages; our migration moves the rings to the hypervisor instead, SYSTEM.md 5).
VF_PROTOCOL_FEATURES = mask((ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK,
                             ProtocolFeature.CONFIG, ProtocolFeature.RESET_DEVICE))


class RequestFault(Exception):
    """The driver framed a request wrongly (5.6.6.1: the device-readable header and the
    device-writable response must be present): the VF enters its error state."""


@dataclass(frozen=True, slots=True)
class VscsiSettings:
    """The virtio-scsi device a VF presents (configuration space, 5.6.4)."""

    request_queues: int = 2
    max_queue_size: int = 1024
    #: 5.6.4: segments in one command; 2 descriptors of a chain are the headers, and a
    #: chain is at most a queue long (128 is the smallest queue we expect a driver to use)
    seg_max: int = 126
    max_sectors: int = 0xFFFF
    cmd_per_lun: int = 128
    sense_size: int = 96
    cdb_size: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.request_queues <= 254:
            raise ValueError("request_queues must be in 1..254 (vring index is 8-bit)")

    @property
    def num_vrings(self) -> int:
        """Control, event, then the request queues (5.6.2)."""
        return 2 + self.request_queues

    @property
    def device_features(self) -> int:
        return (bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.RING_EVENT_IDX)
                | bit(VirtioFeature.RING_INDIRECT_DESC) | bit(ScsiFeature.HOTPLUG)
                | bit(ScsiFeature.CHANGE))

    def config(self) -> VirtioScsiConfig:
        return VirtioScsiConfig(num_queues=self.request_queues, seg_max=self.seg_max,
                                max_sectors=self.max_sectors, cmd_per_lun=self.cmd_per_lun,
                                sense_size=self.sense_size, cdb_size=self.cdb_size)

    def backend_config(self) -> BackendConfig:
        return BackendConfig(device_features=self.device_features,
                             num_queues=self.num_vrings,
                             protocol_features=VF_PROTOCOL_FEATURES,
                             max_queue_size=self.max_queue_size,
                             config_space=self.config().encode())

    @property
    def request_header_size(self) -> int:
        return ScsiRequestHeader.size(self.cdb_size)

    @property
    def response_header_size(self) -> int:
        return ScsiResponseHeader.size(self.sense_size)


# -- request queues ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """What one command request came to (for the used element and the statistics)."""

    #: bytes written to the chain's device-writable part (response header + data-in)
    written: int
    response: int
    status: int
    #: the sense key of a CHECK CONDITION, else None
    sense_key: int | None
    data_in: int
    data_out: int
    target: int = -1
    cdb0: int = -1


def _segments_from(segments: tuple[Segment, ...], skip: int) -> tuple[Segment, ...]:
    """``segments`` after their first ``skip`` bytes."""
    out: list[Segment] = []
    for seg in segments:
        if skip >= seg.length:
            skip -= seg.length
            continue
        out.append(Segment(seg.gpa + skip, seg.length - skip))
        skip = 0
    return tuple(out)


def segment_views(memory: GuestMemory, segments: tuple[Segment, ...]) -> list[memoryview]:
    """Zero-copy views of ``segments`` of guest memory."""
    return [v for seg in segments for v in memory.views(seg.gpa, seg.length)]


def _lun8(field: bytes) -> bytes:
    """The SAM 8-byte LUN carried in bytes 2..7 of a virtio-scsi LUN field (5.6.6.1)."""
    return field[2:8] + b"\x00\x00"


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """A ``virtio_scsi_req_cmd`` chain, framing checked and header copied and decoded:
    what the VF (and the hypervisor's mediated path) executes."""

    head: int
    header: ScsiRequestHeader
    #: the device-readable data buffers (after the request header)
    data_out: tuple[Segment, ...]
    #: the device-writable data buffers (after the response header)
    data_in: tuple[Segment, ...]
    #: the response header's place: the first bytes of the device-writable part
    response_area: tuple[Segment, ...]

    @property
    def target(self) -> int | None:
        """The target byte of the LUN field (None: not the single-level format)."""
        lun = self.header.lun
        return lun[1] if lun[0] == 1 else None

    @property
    def lun8(self) -> bytes:
        """The SAM 8-byte LUN of the LUN field."""
        return _lun8(self.header.lun)

    @property
    def data_out_length(self) -> int:
        return sum(s.length for s in self.data_out)

    @property
    def data_in_length(self) -> int:
        return sum(s.length for s in self.data_in)

    @property
    def capacity(self) -> int:
        """Data-out plus data-in bytes (the residual of a request not executed)."""
        return self.data_out_length + self.data_in_length


def parse_command(chain: DescriptorChain, memory: GuestMemory,
                  settings: VscsiSettings) -> CommandRequest:
    """Check the framing of a command chain and copy its header out (5.6.6.1)."""
    hdr_size = settings.request_header_size
    resp_size = settings.response_header_size
    if chain.readable_length < hdr_size:
        raise RequestFault(f"head {chain.head}: {chain.readable_length} readable bytes, the "
                           f"request header needs {hdr_size}")
    if chain.writable_length < resp_size:
        raise RequestFault(f"head {chain.head}: {chain.writable_length} writable bytes, the "
                           f"response header needs {resp_size}")
    raw = chain.read(memory, 0, hdr_size)  # copied before it is decoded
    try:
        header = ScsiRequestHeader.decode(raw, settings.cdb_size)
    except VirtioScsiError as exc:  # cannot happen with hdr_size bytes; stays typed
        raise RequestFault(f"head {chain.head}: {exc}") from exc
    data_in = _segments_from(chain.writable, resp_size)
    response_area: list[Segment] = []
    left = resp_size
    for seg in chain.writable:
        if left <= 0:
            break
        response_area.append(Segment(seg.gpa, min(seg.length, left)))
        left -= seg.length
    return CommandRequest(chain.head, header, _segments_from(chain.readable, hdr_size),
                          data_in, tuple(response_area))


def answer_command(chain: DescriptorChain, memory: GuestMemory, settings: VscsiSettings,
                   request: CommandRequest, response: int) -> CommandOutcome:
    """Answer a request that was not executed (BAD_TARGET, OVERRUN, TRANSPORT_FAILURE,
    ...): nothing transferred, the whole data capacity is residual."""
    resp = ScsiResponseHeader(response=_R(response), resid=min(request.capacity, 0xFFFFFFFF))
    chain.write(memory, resp.encode(settings.sense_size))
    target = request.target
    return CommandOutcome(settings.response_header_size, int(response), 0, None, 0, 0,
                          -1 if target is None else target, request.header.cdb[0])


def complete_command(chain: DescriptorChain, memory: GuestMemory, settings: VscsiSettings,
                     request: CommandRequest, result: ScsiResult) -> CommandOutcome:
    """Write the response of an executed request (an overrun result is answered
    VIRTIO_SCSI_S_OVERRUN, 5.6.6.1)."""
    if result.overrun:
        # 5.6.6.1: "VIRTIO_SCSI_S_OVERRUN if the content of the CDB requires more data
        # than is available in the datain and dataout buffers"; nothing was transferred.
        return answer_command(chain, memory, settings, request, int(_R.OVERRUN))
    sense = result.sense[:settings.sense_size]
    resp = ScsiResponseHeader(response=_R.OK, status=int(result.status), sense=sense,
                              resid=min(result.residual, 0xFFFFFFFF))
    chain.write(memory, resp.encode(settings.sense_size))
    key = sense[2] & 0x0F if result.status == Status.CHECK_CONDITION and len(sense) > 2 \
        else None
    target = request.target
    return CommandOutcome(settings.response_header_size + result.data_in_len, int(_R.OK),
                          int(result.status), key, result.data_in_len, result.data_out_len,
                          -1 if target is None else target, request.header.cdb[0])


def execute_command(chain: DescriptorChain, memory: GuestMemory,
                    targets: Mapping[TargetId, Target], settings: VscsiSettings) -> CommandOutcome:
    """Execute one ``virtio_scsi_req_cmd`` chain and write its response (5.6.6.1)."""
    request = parse_command(chain, memory, settings)
    number = request.target
    target = targets.get(TargetId(number)) if number is not None else None
    if target is None:
        return answer_command(chain, memory, settings, request, int(_R.BAD_TARGET))
    result = target.execute_lun_bytes(request.lun8, request.header.cdb,
                                      segment_views(memory, request.data_out),
                                      segment_views(memory, request.data_in))
    return complete_command(chain, memory, settings, request, result)


# -- control queue ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlOutcome:
    written: int
    #: "tmf", "an_query", "an_subscribe" or "unknown"
    kind: str
    response: int | None = None
    subtype: int | None = None


#: TMFs that name one logical unit (the I_T nexus reset ignores the LUN, 5.6.6.2).
_LU_TMFS = frozenset({TmfSubtype.ABORT_TASK, TmfSubtype.ABORT_TASK_SET,
                      TmfSubtype.CLEAR_TASK_SET, TmfSubtype.LOGICAL_UNIT_RESET,
                      TmfSubtype.QUERY_TASK, TmfSubtype.QUERY_TASK_SET})


def tmf_response(request: CtrlTmfRequest, targets: Mapping[TargetId, Target]) -> int:
    """The response byte of a TMF (see the module rules for why the task set is empty)."""
    lun = request.lun
    target = targets.get(TargetId(lun[1])) if lun[0] == 1 else None
    if target is None:
        return int(_R.BAD_TARGET)
    return _tmf_on_target(request, lambda number: target.lu(number) is not None)


def tmf_response_for(request: CtrlTmfRequest, addresses: Collection[tuple[int, int]]) -> int:
    """:func:`tmf_response` for a device that knows its (target, LUN) addresses, not
    their SCSI targets (the hypervisor's mediated path, from the VF's mapping)."""
    lun = request.lun
    if lun[0] != 1 or not any(t == lun[1] for t, _ in addresses):
        return int(_R.BAD_TARGET)
    return _tmf_on_target(request, lambda number: (lun[1], number) in addresses)


def _tmf_on_target(request: CtrlTmfRequest, has_lu: Callable[[int], bool]) -> int:
    subtype = request.subtype
    if subtype == TmfSubtype.I_T_NEXUS_RESET:
        return int(_R.FUNCTION_COMPLETE)
    if subtype in _LU_TMFS:
        number = _lun_number(request.lun)
        if number is None or not has_lu(number):
            return int(_R.INCORRECT_LUN)
        # SAM-5: ABORT TASK / ABORT TASK SET / CLEAR TASK SET / LOGICAL UNIT RESET with
        # nothing to act on, and QUERY TASK (SET) finding no task: FUNCTION COMPLETE.
        return int(_R.FUNCTION_COMPLETE)
    # CLEAR ACA (ACA unsupported) and anything unknown
    return int(_R.FUNCTION_REJECTED)


def _lun_number(field: bytes) -> int | None:
    """The LUN of a LUN field in flat or peripheral (bus 0) form, single level."""
    b2, b3 = field[2], field[3]
    if any(field[4:8]):
        return None
    if b2 & 0xC0 == 0x40:
        return (b2 & 0x3F) << 8 | b3
    if b2 == 0:
        return b3
    return None


def execute_control(chain: DescriptorChain, memory: GuestMemory,
                    targets: Mapping[TargetId, Target]) -> ControlOutcome:
    """Answer one control queue request (5.6.6.2)."""
    return _execute_control(chain, memory, lambda tmf: tmf_response(tmf, targets))


def execute_control_for(chain: DescriptorChain, memory: GuestMemory,
                        addresses: Collection[tuple[int, int]]) -> ControlOutcome:
    """:func:`execute_control` for a device that knows its (target, LUN) addresses."""
    return _execute_control(chain, memory, lambda tmf: tmf_response_for(tmf, addresses))


def _execute_control(chain: DescriptorChain, memory: GuestMemory,
                     answer: Callable[[CtrlTmfRequest], int]) -> ControlOutcome:
    head = chain.read(memory, 0, 4)
    if len(head) < 4:
        raise RequestFault(f"head {chain.head}: control request shorter than its type field")
    kind = decode_control_type(head)
    if kind == ControlType.TMF:
        if chain.readable_length < CtrlTmfRequest.SIZE or \
                chain.writable_length < CtrlTmfResponse.SIZE:
            raise RequestFault(f"head {chain.head}: TMF request needs {CtrlTmfRequest.SIZE} "
                               f"readable and {CtrlTmfResponse.SIZE} writable bytes")
        try:
            tmf = CtrlTmfRequest.decode(chain.read(memory, 0, CtrlTmfRequest.SIZE))
        except VirtioScsiError as exc:
            raise RequestFault(f"head {chain.head}: {exc}") from exc
        response = answer(tmf)
        written = chain.write(memory, CtrlTmfResponse(response).encode())
        return ControlOutcome(written, "tmf", response, tmf.subtype)
    if kind in (ControlType.AN_QUERY, ControlType.AN_SUBSCRIBE):
        if chain.readable_length < CtrlAnRequest.SIZE or \
                chain.writable_length < CtrlAnResponse.SIZE:
            raise RequestFault(f"head {chain.head}: AN request needs {CtrlAnRequest.SIZE} "
                               f"readable and {CtrlAnResponse.SIZE} writable bytes")
        # No asynchronous notification class is supported: event_actual 0, OK.
        written = chain.write(memory, CtrlAnResponse(0, _R.OK).encode())
        name = "an_query" if kind == ControlType.AN_QUERY else "an_subscribe"
        return ControlOutcome(written, name, int(_R.OK))
    # An unknown type: nothing defined to answer; the buffer goes back untouched.
    return ControlOutcome(0, "unknown")


# -- event queue ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LunInfo:
    """What the guest knows of one exposed LUN (changes of it are events)."""

    vdisk_id: str
    block_size: int
    capacity_blocks: int
    serial: str
    wwn: Wwn


def visible_luns(mapping: MappingTable | None,
                 initiator: Wwn | None) -> dict[tuple[int, int], LunInfo]:
    """The (target, LUN)s the VF exposes: its mapping's, while its vport is bound and
    logged in (no initiator: every target answers BAD_TARGET)."""
    if mapping is None or initiator is None:
        return {}
    return {e.address: LunInfo(str(e.vdisk_id), e.block_size, e.capacity_blocks, e.serial,
                               e.wwn) for e in mapping.entries}


def rescan_events(old: Mapping[tuple[int, int], LunInfo],
                  new: Mapping[tuple[int, int], LunInfo], *, hotplug: bool,
                  change: bool) -> list[VirtioScsiEvent]:
    """The events announcing ``old`` -> ``new`` to the driver, in address order
    (5.6.6.3: REMOVED/RESCAN only with HOTPLUG, PARAM_CHANGE only with CHANGE)."""
    events: list[VirtioScsiEvent] = []
    for target, lun in sorted(set(old) | set(new)):
        before, after = old.get((target, lun)), new.get((target, lun))
        if before == after:
            continue
        if before is not None and after is not None and change and \
                replace(before, capacity_blocks=after.capacity_blocks) == after:
            # same vdisk, new size: 5.6.6.3 "a change in capacity will be reported as asc
            # 0x2a, ascq 0x09 (CAPACITY DATA HAS CHANGED)"
            events.append(VirtioScsiEvent.param_change(target, lun, 0x2A, 0x09))
            continue
        if not hotplug:
            continue
        if before is not None:
            events.append(VirtioScsiEvent.transport_reset(target, lun,
                                                          TransportResetReason.REMOVED))
        if after is not None:
            events.append(VirtioScsiEvent.transport_reset(target, lun,
                                                          TransportResetReason.RESCAN))
    return events


def event_bytes(event: VirtioScsiEvent | None, missed: bool) -> bytes:
    """The 16 bytes of an event buffer: ``event`` (or NO_EVENT when only the loss of
    earlier events is reported), with EVENTS_MISSED when events were dropped."""
    if event is None:
        event = VirtioScsiEvent(EventType.NO_EVENT, encode_lun(0, 0), 0)
    if missed:
        event = VirtioScsiEvent(event.event | EVENTS_MISSED, event.lun, event.reason)
    return event.encode()

