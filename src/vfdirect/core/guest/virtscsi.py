"""The guest's virtio-scsi driver (VIRTIO 1.x 5.6), pure: it submits SCSI commands to a
VF through request virtqueues in guest memory, reaps their completions, aborts the ones
that time out, and keeps event buffers posted.

Rules of this module:

* no IO, no clock: the shell passes ``now`` (seconds, any monotonic origin), kicks the
  vrings :meth:`VirtioScsiDriver.take_kicks` names, and sleeps on the call eventfds;
* ALL state that must survive the VM process lives in guest memory: the virtqueues
  (:class:`~vfdirect.core.virtio.SplitQueueDriver`, whose tokens are our tags) and the
  request table (:mod:`.requests`). A new driver :meth:`~VirtioScsiDriver.attach` ed to the
  same memory continues without losing or repeating a request:

  - an entry PREPARED whose chain the ring recovered as published becomes SUBMITTED;
    one whose chain was never published is freed and reported in
    :attr:`~VirtioScsiDriver.unsent` (the device never saw it: the owner may resubmit);
  - an entry DONE (completion recorded, not yet taken by its owner) is delivered again
    by the first :meth:`~VirtioScsiDriver.poll`, flagged ``recovered``;
  - in-flight requests of the killed process complete later, also flagged ``recovered``;
  - event buffers that were consumed but not re-posted are re-posted;

* one request = ONE chain: device-readable request header (+ data-out), device-writable
  response header (+ data-in) (5.6.6.1), through an indirect table when negotiated;
  data lives in the tag's fixed slot of the buffer pool;
* a used element is recorded in the request table (``DONE``) BEFORE the ring's used
  entry is consumed (``peek_used`` then ``pop_used``), so a crash in between replays
  nothing and loses nothing. A command is executed by the device exactly once; its
  completion reaches the owner at least once: again (flagged ``recovered``) only when the
  process died after the owner saw it and before :meth:`~VirtioScsiDriver.release`
  committed, so an owner records completions idempotently (the journal does);
* timeouts (Linux sd: 30 s, then the SCSI error handler's ``virtscsi_abort``): a command
  older than :attr:`~VirtioScsiDriver.command_timeout` gets ONE task management function
  ABORT TASK on the control queue (5.6.6.2.1), naming its LUN and tag; the command's own
  completion (normally response ABORTED) still ends it, flagged ``timed_out``;
* events (5.6.6.3): TRANSPORT_RESET with RESCAN/REMOVED, PARAM_CHANGE and the
  EVENTS_MISSED flag are surfaced through :meth:`~VirtioScsiDriver.take_events`; the block
  layer rescans;
* live migration (:mod:`.marking`): over a :class:`~.marking.MarkedMemory` every store
  of the driver is marked in the dirty map, before and after: stores through the memory
  object by the wrapper, stores through the cached views (request table, vrings) by
  marking the whole metadata area ``[request table, data pool)`` around each operation
  that may store (:meth:`submit`, :meth:`publish`, :meth:`poll`, :meth:`release`,
  :meth:`expire`, creation and attachment), and the data-out bytes of :meth:`submit` by
  marking their slot; the device's writes (responses, data-in, used rings) are not
  marked: the hypervisor tracks those;
* the device is the peer: a used element naming an unknown tag, or a tag in another
  vring, raises :class:`~vfdirect.core.virtio.errors.DeviceProtocolError`; a response
  header that does not decode completes the command with response FAILURE.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vfdirect.core.guest.layout import REQUEST_ENTRY_BYTES, GuestLayout
from vfdirect.core.guest.marking import mark_of
from vfdirect.core.guest.requests import (
    MAX_CDB_SIZE,
    MAX_SENSE_SIZE,
    REQ_HEADER_OFFSET,
    RESP_HEADER_OFFSET,
    TMF_REQ_OFFSET,
    TMF_RESP_OFFSET,
    ReqFlag,
    ReqState,
    RequestEntry,
    RequestTable,
)
from vfdirect.core.scsi.sense import SenseData, SenseFormatError, decode_sense
from vfdirect.core.virtio.driver import SplitQueueDriver
from vfdirect.core.virtio.errors import (
    DeviceProtocolError,
    DriverStateError,
    QueueFullError,
    VirtqueueUsageError,
)
from vfdirect.core.virtio.memory import GuestMemory
from vfdirect.core.virtio.scsi import (
    CDB_DEFAULT_SIZE,
    CONTROLQ,
    EVENTQ,
    REQUESTQ_BASE,
    SENSE_DEFAULT_SIZE,
    CtrlTmfRequest,
    EventType,
    LunFieldError,
    ScsiRequestHeader,
    ScsiResponseHeader,
    TaskAttribute,
    TmfSubtype,
    VirtioScsiConfig,
    VirtioScsiError,
    VirtioScsiEvent,
    VirtioScsiResponse,
    decode_lun,
    encode_lun,
)

__all__ = [
    "DEFAULT_COMMAND_TIMEOUT",
    "AbortOutcome",
    "Completion",
    "ScsiEvent",
    "TagsExhausted",
    "VirtioScsiDriver",
]

#: Linux's sd default command timeout (SD_TIMEOUT, 30 s).
DEFAULT_COMMAND_TIMEOUT = 30.0
_STATUS_GOOD = 0
_EVENT_BYTES = VirtioScsiEvent.SIZE


class TagsExhausted(QueueFullError):
    """Every tag (and so every data slot) is in use: reap completions first."""


@dataclass(frozen=True, slots=True)
class Completion:
    """The end of one command: the virtio-scsi response and the SCSI outcome."""

    tag: int
    cookie: int
    target: int
    lun: int
    cdb: bytes
    response: int
    status: int
    sense: bytes
    resid: int
    #: data-in bytes the device transferred (``None`` for a command without data-in)
    data: bytes | None
    #: the data length the command was submitted with (data-out or data-in)
    data_len: int
    timed_out: bool = False
    #: submitted by an earlier incarnation of the VM process
    recovered: bool = False

    @property
    def good(self) -> bool:
        return self.response == VirtioScsiResponse.OK and self.status == _STATUS_GOOD

    def sense_data(self) -> SenseData | None:
        """The decoded sense (``None`` without sense, or when it is not sense data)."""
        if not self.sense:
            return None
        try:
            return decode_sense(self.sense)
        except SenseFormatError:
            return None


@dataclass(frozen=True, slots=True)
class ScsiEvent:
    """An event the device reported on the event queue (5.6.6.3)."""

    kind: int
    target: int | None
    lun: int | None
    reason: int
    missed: bool


@dataclass(frozen=True, slots=True)
class AbortOutcome:
    """The response of an ABORT TASK posted for a timed-out command."""

    tag: int
    cookie: int
    response: int


class VirtioScsiDriver:
    """The virtio-scsi driver of one VM, over its guest memory."""

    def __init__(self, memory: GuestMemory, layout: GuestLayout,
                 rings: list[SplitQueueDriver], *, _token: object = None) -> None:
        if _token is not _CONSTRUCT:
            raise VirtqueueUsageError("use VirtioScsiDriver.create() or .attach()")
        self._memory = memory
        self._layout = layout
        self._rings = rings
        self._mark = mark_of(memory)
        self._meta = (layout.request_table_addr, layout.data_addr - layout.request_table_addr)
        self._table = RequestTable(memory, layout)
        self._slot_size = layout.params.slot_size
        self._data = memory.view(layout.data_addr, layout.params.tags * self._slot_size)
        self._entries = self._table.view
        self._cdb_size = CDB_DEFAULT_SIZE
        self._sense_size = SENSE_DEFAULT_SIZE
        self._indirect = True
        self._active_queues = layout.params.request_queues
        self._next_queue = 0
        self._free: deque[int] = deque()
        self._staged: dict[int, list[int]] = {}
        self._kicks: set[int] = set()
        self._deadlines: dict[int, float | None] = {}
        self._recovered: set[int] = set()
        self._recovered_done: list[int] = []
        self._events: list[ScsiEvent] = []
        self._aborts: list[AbortOutcome] = []
        #: Seconds before a command is aborted (Linux: 30 s).
        self.command_timeout = DEFAULT_COMMAND_TIMEOUT
        #: Requests a killed process had prepared but never published: ``(tag, cookie)``.
        self.unsent: list[tuple[int, int]] = []
        #: Requests a killed process left in flight or done: ``tag -> cookie``.
        self.recovered: dict[int, int] = {}

    # -- creation -------------------------------------------------------------------------

    @classmethod
    def create(cls, memory: GuestMemory, layout: GuestLayout, *,
               barrier: Callable[[], None] | None = None) -> VirtioScsiDriver:
        """First boot: lay out the queues and an empty request table; post the event
        buffers (the device may take them once it runs)."""
        rings = [SplitQueueDriver.create(memory, q, barrier=barrier) for q in layout.queues]
        driver = cls(memory, layout, rings, _token=_CONSTRUCT)
        driver._dirty()
        driver._table.clear()
        driver._free.extend(range(layout.params.tags))
        for index in range(layout.params.event_queue_size):
            driver._post_event_buffer(index)
        driver._publish_ring(EVENTQ)
        driver._dirty()
        return driver

    @classmethod
    def attach(cls, memory: GuestMemory, layout: GuestLayout, *,
               barrier: Callable[[], None] | None = None) -> VirtioScsiDriver:
        """A restarted process: attach to the rings and the request table and reconcile
        them (see the module rules)."""
        mark = mark_of(memory)
        meta = (layout.request_table_addr, layout.data_addr - layout.request_table_addr)
        if mark is not None:
            mark(*meta)  # attaching a ring may roll an interrupted publish forward
        rings = []
        for index, expected in enumerate(layout.queues):
            ring = SplitQueueDriver.attach(memory, expected.ctl_addr, barrier=barrier)
            if ring.layout != expected:
                raise DriverStateError(f"vring {index} in memory is {ring.layout}, the "
                                       f"guest header plans {expected}")
            rings.append(ring)
        driver = cls(memory, layout, rings, _token=_CONSTRUCT)
        driver._reconcile()
        driver._dirty()
        return driver

    def _dirty(self) -> None:
        """Mark the metadata area (request table, vrings, indirect tables, event buffers)
        in the dirty map: before and after every operation that may store into it."""
        if self._mark is not None:
            self._mark(*self._meta)

    def _reconcile(self) -> None:
        table = self._table
        in_flight: dict[int, tuple[int, int]] = {}  # tag -> (vring, head)
        for vring in self._request_vrings():
            for head, token in self._rings[vring].in_flight.items():
                if token >= table.tags or token in in_flight:
                    raise DriverStateError(f"vring {vring} head {head} carries token "
                                           f"{token}, not a free tag")
                in_flight[token] = (vring, head)
        # The control queue first: an ABORT TASK outcome recorded but not consumed is
        # consumed now (only the next used element can be in that state).
        control = self._rings[CONTROLQ]
        aborting = set(control.in_flight.values())
        if any(token >= table.tags for token in aborting):
            raise DriverStateError("the control queue carries a token that is not a tag")
        element = control.peek_used()
        if element is not None and table.flags(element.token) & ReqFlag.ABORT_DONE:
            control.pop_used()
            aborting.discard(element.token)
        for tag in range(table.tags):
            entry = table.read(tag)
            ring_pos = in_flight.get(tag)
            flags = entry.flags
            if flags & ReqFlag.ABORT_POSTED and tag not in aborting:
                # Flagged, but the TMF never reached the ring: posted again on expiry.
                flags &= ~ReqFlag.ABORT_POSTED
                table.set_flags(tag, flags)
            if entry.state is ReqState.FREE:
                if ring_pos is not None:
                    raise DriverStateError(f"tag {tag} is free but in flight in vring "
                                           f"{ring_pos[0]}")
                self._free.append(tag)
            elif entry.state is ReqState.PREPARED:
                if ring_pos is None:
                    # Never published: the device never saw it.
                    table.commit(tag, ReqState.FREE)
                    self.unsent.append((tag, entry.cookie))
                    self._free.append(tag)
                    continue
                self._check_position(tag, entry.vring, ring_pos)
                table.set_head(tag, ring_pos[1])
                table.commit(tag, ReqState.SUBMITTED)
                self._adopt(tag, entry.cookie)
            elif entry.state is ReqState.SUBMITTED:
                if ring_pos is None:
                    raise DriverStateError(f"tag {tag} is SUBMITTED but in no vring")
                self._check_position(tag, entry.vring, ring_pos)
                self._adopt(tag, entry.cookie)
            elif flags & ReqFlag.RELEASED:
                # DONE and taken by its owner; only its ABORT TASK held the entry.
                if tag not in aborting:
                    table.set_flags(tag, flags & ~ReqFlag.RELEASED)
                    table.commit(tag, ReqState.FREE)
                    self._free.append(tag)
            else:  # DONE: completion recorded, not taken by its owner
                self.recovered[tag] = entry.cookie
                self._recovered.add(tag)
                self._recovered_done.append(tag)
        # A DONE entry whose used element was recorded but not consumed: consume it now,
        # in ring order (only the next used element of a ring can be in that state).
        for vring in self._request_vrings():
            ring = self._rings[vring]
            element = ring.peek_used()
            if element is not None and table.state(element.token) == ReqState.DONE:
                ring.pop_used()
        # Event buffers consumed but not re-posted before the crash.
        events = self._rings[EVENTQ]
        posted = set(events.in_flight.values())
        for index in range(self._layout.params.event_queue_size):
            if index not in posted:
                self._post_event_buffer(index)
        self._publish_ring(EVENTQ)

    def _check_position(self, tag: int, vring: int, ring_pos: tuple[int, int]) -> None:
        if vring != ring_pos[0]:
            raise DriverStateError(f"tag {tag} says vring {vring}, it is in flight in "
                                   f"vring {ring_pos[0]}")

    def _adopt(self, tag: int, cookie: int) -> None:
        self.recovered[tag] = cookie
        self._recovered.add(tag)
        self._deadlines[tag] = None  # armed at the next expire()

    # -- configuration --------------------------------------------------------------------

    def configure(self, config: VirtioScsiConfig | None = None, *,
                  request_queues: int | None = None, indirect: bool = True) -> None:
        """Adopt the device configuration (5.6.4) and what was negotiated: how many
        request queues the device serves, and whether indirect descriptors may be used."""
        if config is not None:
            if not 1 <= config.cdb_size <= MAX_CDB_SIZE:
                raise VirtioScsiError(f"device cdb_size {config.cdb_size} not in "
                                      f"1..{MAX_CDB_SIZE}")
            if not 0 <= config.sense_size <= MAX_SENSE_SIZE:
                raise VirtioScsiError(f"device sense_size {config.sense_size} not in "
                                      f"0..{MAX_SENSE_SIZE}")
            self._cdb_size = config.cdb_size
            self._sense_size = config.sense_size
        queues = self._layout.params.request_queues if request_queues is None else \
            request_queues
        if not 1 <= queues <= self._layout.params.request_queues:
            raise VirtioScsiError(f"{queues} request queues; the guest has "
                                  f"{self._layout.params.request_queues}")
        self._active_queues = queues
        self._indirect = indirect

    @property
    def active_request_queues(self) -> int:
        return self._active_queues

    @property
    def cdb_size(self) -> int:
        return self._cdb_size

    @property
    def sense_size(self) -> int:
        return self._sense_size

    @property
    def max_transfer(self) -> int:
        """The largest data-out or data-in length of one command (one slot)."""
        return self._slot_size

    # -- observers ------------------------------------------------------------------------

    @property
    def layout(self) -> GuestLayout:
        return self._layout

    @property
    def rings(self) -> tuple[SplitQueueDriver, ...]:
        return tuple(self._rings)

    @property
    def table(self) -> RequestTable:
        return self._table

    @property
    def free_tags(self) -> int:
        return len(self._free)

    @property
    def outstanding(self) -> int:
        """Commands submitted and not completed."""
        return len(self._deadlines)

    def outstanding_tags(self) -> list[int]:
        return sorted(self._deadlines)

    def pending_used(self) -> bool:
        """Whether any vring has used elements to reap (the shell's busy poll)."""
        return any(ring.pending_used() for ring in self._rings)

    def used_index(self, vring: int) -> int:
        """``used.idx`` of ``vring`` as found in guest memory: the base a (re)connecting
        front end gives the back end (SET_VRING_BASE)."""
        ring = self._rings[vring]
        return (ring.last_used_idx + ring.pending_used()) & 0xFFFF

    def _request_vrings(self) -> range:
        return range(REQUESTQ_BASE, REQUESTQ_BASE + self._layout.params.request_queues)

    # -- submitting -----------------------------------------------------------------------

    def submit(self, target: int, lun: int, cdb: bytes, *, data_out: bytes | memoryview = b"",
               data_in: int = 0, cookie: int = 0, vring: int | None = None,
               task_attr: int = TaskAttribute.SIMPLE, now: float = 0.0,
               timeout: float | None = None, publish: bool = True) -> int:
        """Queue one command to ``(target, lun)``; returns its tag. ``data_out`` is copied
        into the tag's slot; ``data_in`` is the data-in capacity. With ``publish=False``
        the chain is staged until :meth:`publish` (several commands, one avail.idx
        store). Raises :class:`TagsExhausted` or ``QueueFullError`` when full."""
        n_out = len(data_out)
        if n_out and data_in:
            raise VirtqueueUsageError("bidirectional commands need VIRTIO_SCSI_F_INOUT")
        if n_out > self._slot_size or not 0 <= data_in <= self._slot_size:
            raise VirtqueueUsageError(f"transfer of {max(n_out, data_in)} bytes exceeds the "
                                      f"{self._slot_size}-byte slot")
        if not 0 < len(cdb) <= self._cdb_size:
            raise VirtqueueUsageError(f"CDB of {len(cdb)} bytes (cdb_size "
                                      f"{self._cdb_size})")
        if not 0 <= cookie < 1 << 64:
            raise VirtqueueUsageError(f"cookie {cookie} is not 64-bit")
        lun_field = encode_lun(target, lun)  # raises LunFieldError for a bad address
        descriptors = (1 + bool(n_out)) + (1 + bool(data_in))
        chosen = self._choose_vring(vring, 1 if self._indirect else descriptors)
        if not self._free:
            raise TagsExhausted(f"all {self._table.tags} tags are in use")
        self._dirty()
        tag = self._free.popleft()
        generation = (self._table.generation(tag) + 1) & 0xFFFFFFFF
        scsi_tag = generation << 16 | tag
        header = ScsiRequestHeader(lun_field, scsi_tag, task_attr, 0, 0,
                                   bytes(cdb).ljust(self._cdb_size, b"\0")).encode()
        slot = self._layout.slot(tag)
        if n_out:
            start = tag * self._slot_size
            if self._mark is not None:
                self._mark(slot, n_out)
            self._data[start:start + n_out] = data_out
            if self._mark is not None:
                self._mark(slot, n_out)
        flags = (ReqFlag.DATA_OUT if n_out else ReqFlag(0)) | (
            ReqFlag.DATA_IN if data_in else ReqFlag(0))
        self._table.prepare(tag, vring=chosen, scsi_tag=scsi_tag, cookie=cookie,
                            target=target, lun=lun, data_len=n_out or data_in, flags=flags,
                            generation=generation, cdb_len=len(cdb), request_header=header)
        entry = self._table.addr(tag)
        readable = [(entry + REQ_HEADER_OFFSET, len(header))]
        if n_out:
            readable.append((slot, n_out))
        writable = [(entry + RESP_HEADER_OFFSET, ScsiResponseHeader.size(self._sense_size))]
        if data_in:
            writable.append((slot, data_in))
        head = self._rings[chosen].add(readable, writable, tag,
                                       indirect=None if self._indirect else False)
        self._table.set_head(tag, head)
        self._staged.setdefault(chosen, []).append(tag)
        self._deadlines[tag] = now + (self.command_timeout if timeout is None else timeout)
        if publish:
            self._publish()  # inside this operation's marks
        self._dirty()
        return tag

    def _choose_vring(self, wanted: int | None, need: int) -> int:
        if wanted is not None:
            if wanted not in range(REQUESTQ_BASE, REQUESTQ_BASE + self._active_queues):
                raise VirtqueueUsageError(f"vring {wanted} is not an active request queue")
            if self._rings[wanted].num_free < need:
                raise QueueFullError(f"vring {wanted} has no room for {need} descriptors")
            return wanted
        for _ in range(self._active_queues):
            vring = REQUESTQ_BASE + self._next_queue
            self._next_queue = (self._next_queue + 1) % self._active_queues
            if self._rings[vring].num_free >= need:
                return vring
        raise QueueFullError("every request queue is full")

    def publish(self) -> None:
        """Publish every staged command (one avail.idx store per vring), then mark them
        SUBMITTED."""
        if not self._staged:
            return
        self._dirty()
        self._publish()
        self._dirty()

    def _publish(self) -> None:
        for vring, tags in self._staged.items():
            if self._rings[vring].publish():
                self._kicks.add(vring)
            for tag in tags:
                self._table.commit(tag, ReqState.SUBMITTED)
        self._staged.clear()

    def _publish_ring(self, vring: int) -> None:
        if self._rings[vring].publish():
            self._kicks.add(vring)

    def take_kicks(self) -> list[int]:
        """The vrings whose kick eventfd the shell must write (2.7.10 said so)."""
        kicks = sorted(self._kicks)
        self._kicks.clear()
        return kicks

    # -- reaping --------------------------------------------------------------------------

    def poll(self) -> list[Completion]:
        """Reap every vring: completions of commands (in used-ring order per queue),
        ABORT TASK outcomes (:meth:`take_aborts`) and events (:meth:`take_events`)."""
        if not self._recovered_done and not self.pending_used():
            return []  # nothing to reap: nothing is stored
        self._dirty()
        out = [self._completion(tag) for tag in self._recovered_done]
        self._recovered_done.clear()
        table = self._table
        for vring in self._request_vrings():
            ring = self._rings[vring]
            while (element := ring.peek_used()) is not None:
                tag = element.token
                if tag >= table.tags:
                    raise DeviceProtocolError(f"vring {vring} used token {tag}")
                entry = table.read(tag)
                if entry.vring != vring or entry.head != element.head or \
                        entry.state is not ReqState.SUBMITTED:
                    raise DeviceProtocolError(
                        f"vring {vring} used head {element.head} (tag {tag}), which is "
                        f"{entry.state.name} in vring {entry.vring} head {entry.head}")
                table.complete(tag, element.written)  # recorded before consumed
                ring.pop_used()
                self._deadlines.pop(tag, None)
                out.append(self._completion(tag, entry))
        self._reap_control()
        self._reap_events()
        self._dirty()
        return out

    def _completion(self, tag: int, entry: RequestEntry | None = None) -> Completion:
        if entry is None:
            entry = self._table.read(tag)
        off = tag * REQUEST_ENTRY_BYTES
        view = self._entries
        resp_at = off + RESP_HEADER_OFFSET
        raw = bytes(view[resp_at:resp_at + ScsiResponseHeader.size(self._sense_size)])
        try:
            resp = ScsiResponseHeader.decode(raw, self._sense_size)
            response, status, sense, resid = resp.response, resp.status, resp.sense, resp.resid
        except VirtioScsiError:
            response, status, sense, resid = int(VirtioScsiResponse.FAILURE), 0, b"", 0
        data = None
        if entry.flags & ReqFlag.DATA_IN:
            count = max(0, entry.data_len - min(resid, entry.data_len))
            start = tag * self._slot_size
            data = bytes(self._data[start:start + count])
        cdb_at = off + REQ_HEADER_OFFSET + 19
        cdb = bytes(view[cdb_at:cdb_at + entry.cdb_len])
        recovered = tag in self._recovered
        self._recovered.discard(tag)
        return Completion(tag, entry.cookie, entry.target, entry.lun, cdb, response, status,
                          sense, resid, data, entry.data_len,
                          timed_out=bool(entry.flags & ReqFlag.TIMED_OUT),
                          recovered=recovered)

    def release(self, tag: int) -> None:
        """The owner took the completion of ``tag``: the tag and its slot are free again
        (after its ABORT TASK completes, if one is still in flight)."""
        state = self._table.state(tag)
        if state != ReqState.DONE:
            raise VirtqueueUsageError(f"tag {tag} is {ReqState(state).name}, not DONE")
        if self.recovered:
            self.recovered.pop(tag, None)
        self._dirty()
        flags = self._table.flags(tag)
        if flags & ReqFlag.ABORT_POSTED:
            self._table.set_flags(tag, flags | ReqFlag.RELEASED)
        else:
            self._table.commit(tag, ReqState.FREE)
            self._free.append(tag)
        self._dirty()

    # -- timeouts and ABORT TASK ----------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest command deadline (``None`` if nothing is outstanding)."""
        armed = [d for d in self._deadlines.values() if d is not None]
        if len(armed) != len(self._deadlines):
            return -math.inf  # recovered commands: arm them now
        return min(armed, default=None)

    def expire(self, now: float) -> list[int]:
        """Abort every command past its deadline (ABORT TASK on the control queue);
        returns their tags. Commands recovered from a killed process get a full timeout
        from the first call."""
        aborted: list[int] = []
        for tag, deadline in list(self._deadlines.items()):
            if deadline is None:
                self._deadlines[tag] = now + self.command_timeout
            elif now >= deadline:
                if not aborted:
                    self._dirty()
                try:
                    self._post_abort(tag)
                except QueueFullError:
                    continue  # the control queue is full: try again next time
                self._deadlines[tag] = math.inf  # one abort, then wait for the device
                aborted.append(tag)
        if aborted:
            self._publish_ring(CONTROLQ)
            self._dirty()
        return aborted

    def _post_abort(self, tag: int) -> None:
        entry = self._table.read(tag)
        if entry.flags & ReqFlag.ABORT_POSTED:
            return
        base = self._table.addr(tag)
        tmf = CtrlTmfRequest(TmfSubtype.ABORT_TASK, encode_lun(entry.target, entry.lun),
                             entry.scsi_tag).encode()
        need = 1 if self._indirect else 2
        if self._rings[CONTROLQ].num_free < need:
            raise QueueFullError("the control queue is full")
        self._memory.write(base + TMF_REQ_OFFSET, tmf)
        self._memory.write(base + TMF_RESP_OFFSET, b"\xff")
        self._table.set_flags(tag, entry.flags | ReqFlag.TIMED_OUT | ReqFlag.ABORT_POSTED)
        self._rings[CONTROLQ].add([(base + TMF_REQ_OFFSET, CtrlTmfRequest.SIZE)],
                                  [(base + TMF_RESP_OFFSET, 1)], tag,
                                  indirect=None if self._indirect else False)

    def _reap_control(self) -> None:
        ring = self._rings[CONTROLQ]
        table = self._table
        while (element := ring.peek_used()) is not None:
            tag = element.token
            if tag >= table.tags:
                raise DeviceProtocolError(f"control queue used token {tag}")
            entry = table.read(tag)
            response = self._entries[tag * REQUEST_ENTRY_BYTES + TMF_RESP_OFFSET]
            table.set_tmf_response(tag, response)
            # Recorded before consumed (RELEASED kept: attach() frees such an entry).
            flags = (entry.flags | ReqFlag.ABORT_DONE) & ~ReqFlag.ABORT_POSTED
            table.set_flags(tag, flags)
            ring.pop_used()
            self._aborts.append(AbortOutcome(tag, entry.cookie, response))
            if flags & ReqFlag.RELEASED and entry.state is ReqState.DONE:
                table.set_flags(tag, flags & ~ReqFlag.RELEASED)
                table.commit(tag, ReqState.FREE)
                self._free.append(tag)

    def take_aborts(self) -> list[AbortOutcome]:
        aborts, self._aborts = self._aborts, []
        return aborts

    # -- events ---------------------------------------------------------------------------

    def _post_event_buffer(self, index: int) -> None:
        buffer = self._layout.event_buffer(index)
        self._memory.write(buffer, bytes(_EVENT_BYTES))
        self._rings[EVENTQ].add([], [(buffer, _EVENT_BYTES)], index, indirect=False)

    def _reap_events(self) -> None:
        ring = self._rings[EVENTQ]
        consumed: list[int] = []
        while (element := ring.pop_used()) is not None:
            index = element.token
            if index >= self._layout.params.event_queue_size:
                raise DeviceProtocolError(f"event queue used token {index}")
            raw = self._memory.read(self._layout.event_buffer(index), _EVENT_BYTES)
            event = VirtioScsiEvent.decode(raw)
            if event.event != EventType.NO_EVENT:
                try:
                    target, lun = decode_lun(event.lun)
                    where: tuple[int | None, int | None] = (target, lun)
                except LunFieldError:
                    where = (None, None)
                self._events.append(ScsiEvent(event.kind, where[0], where[1], event.reason,
                                              event.events_missed))
            consumed.append(index)
        # Re-post after reaping (a ring refuses to reap with chains staged); a crash in
        # between is repaired by attach(), which re-posts buffers not in flight.
        for index in consumed:
            self._post_event_buffer(index)
        if consumed:
            self._publish_ring(EVENTQ)

    def take_events(self) -> list[ScsiEvent]:
        events, self._events = self._events, []
        return events


_CONSTRUCT = object()
