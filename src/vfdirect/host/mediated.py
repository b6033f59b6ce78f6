"""The hypervisor's mediated IO path (claims B5, B6, X5): while a VM migrates, the
hypervisor serves the VM's virtqueues itself and sends each request through the PF.

After ``vf_quiesce`` / ``vf_drain`` / ``vf_state_save`` the source VF has handed over its
queue state (a :class:`~vfdirect.core.adapter.vf_state.VfQueueRecord` and its fds: the
VM's memory file(s), the kick and call eventfds) and its DMA window is revoked. The VM
keeps running and kicking the same eventfds. :class:`MediatedPath` takes the record and
serves the queues from the saved positions, on a thread of its own:

* the memory regions are mapped (``MAP_SHARED`` on the record's memory fds) and the
  device-side :class:`~vfdirect.core.virtio.Virtqueue` s are restored from the saved
  :class:`~vfdirect.core.virtio.QueueState` s, exactly as a VF restores them;
* each memory file is attached once as a PF IO buffer (``pf_io_buffer_attach``), so the
  adapter moves data straight between the LUNs and guest memory: a data buffer of a
  request becomes a scatter list of (file offset, length) in that buffer (guest address
  -> file offset through the region table). A request whose buffers span several files,
  or need more than ``MAX_SG`` segments, or a file the adapter cannot attach, goes
  through a bounce buffer of our own (one copy), never refused;
* heads the record still has in flight are re-read and executed first (as the VF's
  ``_finish_in_flight``). Claim X2: heads the record lists as ``executing`` (the VF's
  drain deadline passed while they ran; their stale execution may still move data) are
  re-executed only once the VF reports that execution finished: the thread first polls
  ``vf_drain`` of the SAVED VF until it answers drained (bounded by ``stale_wait_s``,
  even if :meth:`MediatedPath.stop` is called meanwhile). Heads never confirmed stay in
  flight unexecuted and stay listed in the record :meth:`MediatedPath.stop` returns; a
  confirmed record comes back without the list. Then chains are popped in order, ONE AT
  A TIME: header copied and checked
  (:func:`~vfdirect.core.adapter.vscsi.parse_command`), LUN field -> (target, LUN),
  ``pf_io_submit`` (claim B6), response written, used element pushed, call eventfd
  signalled when the driver asked for it (``should_notify``). A target the VF's mapping
  does not have answers BAD_TARGET, as the VF would; a PF error becomes a response
  (BAD_TARGET when the vport is not usable, TRANSPORT_FAILURE otherwise), never a lost
  request. The control queue answers TMF / AN as the VF does; the event queue is left
  alone (its buffers are not consumed);
* doorbells: after activity the thread polls the rings with kicks disabled for
  ``poll_budget_ns``, then re-enables kicks, looks again, and sleeps on the kick eventfds
  and a wake eventfd with a bounded timeout (``stop()`` is prompt);
* dirty tracking (claim X5): every byte this path (or the adapter, for data-in, through
  ``pf_io_submit``) writes into guest memory marks its guest pages in a private
  :class:`~vfdirect.core.migration.dirty.PageMarks`, before and after the write (used
  ring elements, ``used.idx``, ``avail_event`` and used flags, response headers, data-in);
  :meth:`MediatedPath.collect_dirty` returns and clears them. Pages are guest-physical
  (page number = gpa // 4096);
* a ring fault (a malformed chain, a badly framed request) stops serving THAT queue and
  is reported in :meth:`MediatedPath.stats`; nothing escapes the thread.

Ownership: the constructor either succeeds and owns ``fds`` (closed by
:meth:`MediatedPath.close`) or raises :class:`MediatedError` and leaves them to the
caller (who may still give them back to the VF). The :class:`PfClient` passed in must be a
connection of its own: only the serving thread (then ``close()``) uses it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import mmap
import os
import select
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vfdirect.adapter.pf_client import PfClient, PfError, WwnLike
from vfdirect.adapter.vf.fds import BadEventFd, check_eventfd, clear_eventfd, signal_eventfd
from vfdirect.core.adapter.mapping import MappingError, MappingTable
from vfdirect.core.adapter.methods import MAX_BUFFER_BYTES, MAX_SG
from vfdirect.core.adapter.vf_state import QueueRecord, VfQueueRecord, VfStateError
from vfdirect.core.adapter.vscsi import (
    CommandOutcome,
    CommandRequest,
    RequestFault,
    VscsiSettings,
    answer_command,
    complete_command,
    event_bytes,
    execute_control_for,
    parse_command,
)
from vfdirect.core.migration.dirty import PageMarks
from vfdirect.core.rpc import ErrorCode
from vfdirect.core.scsi import ScsiResult, Status
from vfdirect.core.scsi.luns import LunError, decode_lun
from vfdirect.core.scsi.sense import INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT, encode_fixed_sense
from vfdirect.core.virtio import (
    DescriptorChain,
    GuestMemoryError,
    MemoryRegion,
    RegionMemory,
    Segment,
    Virtqueue,
    VirtqueueError,
)
from vfdirect.core.virtio.scsi import CONTROLQ, EVENTQ, MAX_LUN, VirtioScsiResponse
from vfdirect.eventlog import log_event
from vfdirect.transport.shm import SharedMemory, SharedMemoryError

__all__ = ["IDLE_WAIT_S", "POLL_BUDGET_NS", "MediatedError", "MediatedPath"]

#: Busy-poll budget after the last request before kicks are re-enabled (as the VF's).
POLL_BUDGET_NS = 200_000
#: Longest sleep on the kick eventfds (bounds how long ``stop()`` waits for an idle path).
IDLE_WAIT_S = 0.1
#: Chains taken from one ring before the others get a turn.
BATCH = 32
#: Longest wait for the VF to report the stale executions of the record finished (X2).
STALE_WAIT_S = 30.0
#: Each ``vf_drain`` poll of the SAVED VF waits at most this long in the VF.
STALE_POLL_MS = 20
#: The sense of an overrun (the adapter's SCSI core has no overrun response; virtio does).
_OVERRUN_SENSE = encode_fixed_sense(INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
_R = VirtioScsiResponse
_MIN_BOUNCE = 1 << 20


class MediatedError(Exception):
    """The mediated path cannot be set up, started or stopped as asked."""


@dataclass(slots=True)
class _Ring:
    record: QueueRecord
    vq: Virtqueue
    kick_fd: int | None
    call_fd: int | None
    fault: str | None = None

    @property
    def index(self) -> int:
        return self.record.index


@dataclass(frozen=True, slots=True)
class _Region:
    gpa: int
    size: int
    mmap_offset: int
    #: PF IO buffer of its file (None: not attachable, data goes through the bounce)
    buffer: int | None

    @property
    def end(self) -> int:
        return self.gpa + self.size


class _Bounce:
    """A memory file of our own, attached as a PF IO buffer, for requests whose data
    cannot be described as one scatter list of one attached guest memory file."""

    def __init__(self, pf: PfClient, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("vfdirect-mediated-bounce", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                self.buffer, _ = pf.pf_io_buffer_attach(self.fd)
            except BaseException:
                self.map.close()
                raise
        except BaseException:
            os.close(self.fd)
            raise

    def close(self, pf: PfClient) -> None:
        with contextlib.suppress(PfError):
            pf.pf_io_buffer_detach(self.buffer)
        with contextlib.suppress(BufferError):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class MediatedPath:
    """The hypervisor serving a VM's virtqueues through the PF (see the module rules)."""

    def __init__(self, record: Mapping[str, Any], fds: Sequence[int], pf: PfClient, *,
                 wwpn: WwnLike, logger: logging.Logger | None = None,
                 poll_budget_ns: int = POLL_BUDGET_NS,
                 idle_wait_s: float = IDLE_WAIT_S, direct_buffers: bool = True,
                 owns_pf: bool = False, stale_wait_s: float = STALE_WAIT_S) -> None:
        """``direct_buffers`` False sends every data buffer through the bounce buffer
        (one copy; for memory files the adapter cannot attach, and for tests);
        ``owns_pf``: :meth:`close` closes ``pf`` too."""
        self._log = logger if logger is not None else logging.getLogger("vfdirect.host")
        self._pf = pf
        self._wwpn = wwpn
        self._poll_budget = poll_budget_ns
        self._idle_wait = idle_wait_s
        self._direct = direct_buffers
        self._owns_pf = owns_pf
        fds = list(fds)
        try:
            rec = VfQueueRecord.from_dict(record, fds=len(fds))
        except VfStateError as exc:
            raise MediatedError(f"the queue state: {exc}") from None
        self._record = rec
        self._stale_wait = stale_wait_s
        #: claim X2: heads not to re-execute before the VF reports them finished
        self._unconfirmed = frozenset(rec.executing)
        self._settings = VscsiSettings(sense_size=rec.sense_size, cdb_size=rec.cdb_size)
        self._lock = threading.Lock()
        self._barrier_lock = threading.Lock()
        self._stats: dict[str, int] = {"requests": 0, "control": 0, "bytes_in": 0,
                                       "bytes_out": 0, "errors": 0, "pages_marked": 0,
                                       "bounced": 0, "check_conditions": 0}
        self._last_error: str | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._bounce: _Bounce | None = None
        self._buffers: list[int] = []
        self._maps: list[SharedMemory] = []
        self._rings: dict[int, _Ring] = {}
        self._memory: RegionMemory | None = None
        self._wake = -1
        try:
            self._setup(rec, fds)
        except BaseException:
            self._teardown()
            raise
        self._fds = fds  # ours from here on
        log_event(self._log, "mediated_ready", vf=rec.vf, queues=len(self._rings),
                  regions=len(self._regions), buffers=len(self._buffers),
                  in_flight=self._outstanding())

    # -- set-up ---------------------------------------------------------------------------

    def _setup(self, rec: VfQueueRecord, fds: list[int]) -> None:
        try:
            for q in rec.queues:
                for pos, what in ((q.kick_fd, "kick"), (q.call_fd, "call")):
                    if pos is not None:
                        check_eventfd(fds[pos], f"queue {q.index} {what}")
            for r in rec.regions:
                self._maps.append(SharedMemory(fds[r.fd], r.size, offset=r.mmap_offset,
                                               owns_fd=False))
        except BadEventFd as exc:
            raise MediatedError(str(exc)) from None
        except SharedMemoryError as exc:
            raise MediatedError(f"guest memory: {exc}") from None
        try:
            memory = RegionMemory(MemoryRegion(r.gpa, m.buffer, r.user_addr)
                                  for r, m in zip(rec.regions, self._maps, strict=True))
        except (GuestMemoryError, ValueError) as exc:
            raise MediatedError(f"guest memory: {exc}") from None
        self._memory = memory
        end = max((r.gpa + r.size for r in rec.regions), default=0)
        self._marks = PageMarks(bytearray(PageMarks.size_for(end)), end)
        # the VF's mapping: which (target, LUN)s exist (BAD_TARGET for other targets)
        try:
            dumped = self._pf.mapping_get(rec.vf)
            table = MappingTable() if dumped is None else MappingTable.load(dumped)
        except PfError as exc:
            raise MediatedError(f"mapping_get of VF {rec.vf}: {exc}") from None
        except MappingError as exc:
            raise MediatedError(f"the mapping of VF {rec.vf}: {exc}") from None
        self._addresses = frozenset(e.address for e in table.entries)
        self._targets = frozenset(t for t, _ in self._addresses)
        # each memory file once as a PF IO buffer
        by_file: dict[tuple[int, int], int | None] = {}
        regions: list[_Region] = []
        for r in rec.regions:
            st = os.fstat(fds[r.fd])
            key = (st.st_dev, st.st_ino)
            if key not in by_file:
                by_file[key] = self._attach(fds[r.fd]) if self._direct else None
            regions.append(_Region(r.gpa, r.size, r.mmap_offset, by_file[key]))
        self._regions = sorted(regions, key=lambda g: g.gpa)
        # the rings, from the saved positions (restoring writes the used ring: marked)
        try:
            for q in rec.queues:
                self._mark(q.state.used_addr, q.state.config.used_bytes)
                vq = Virtqueue.restore(q.state, memory, barrier=self._barrier,
                                       on_write=self._mark)
                self._rings[q.index] = _Ring(
                    q, vq, None if q.kick_fd is None else fds[q.kick_fd],
                    None if q.call_fd is None else fds[q.call_fd])
        except (VirtqueueError, GuestMemoryError, ValueError) as exc:
            raise MediatedError(f"restoring the queues: {exc}") from None
        for ring in self._rings.values():
            if ring.kick_fd is not None:
                os.set_blocking(ring.kick_fd, False)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def _attach(self, fd: int) -> int | None:
        try:
            buffer, _size = self._pf.pf_io_buffer_attach(fd)
        except PfError as exc:
            if exc.code in (ErrorCode.BAD_FDS, ErrorCode.RESOURCE_EXHAUSTED):
                log_event(self._log, "mediated_no_buffer", level=logging.WARNING,
                          vf=self._record.vf, reason=exc.message)
                return None  # the data of this file goes through the bounce buffer
            raise MediatedError(f"pf_io_buffer_attach: {exc}") from None
        self._buffers.append(buffer)
        return buffer

    # -- public API -----------------------------------------------------------------------

    @property
    def vf(self) -> int:
        return self._record.vf

    def start(self) -> None:
        """Serve the queues on a thread of its own (in-flight heads first)."""
        if self._closed:
            raise MediatedError("the mediated path is closed")
        if self._thread is not None:
            raise MediatedError("the mediated path was started already")
        self._thread = threading.Thread(target=self._run, name=f"mediated-vf{self.vf}",
                                        daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float) -> tuple[dict[str, Any], list[int]]:
        """Stop fetching, let the request being executed finish, join the thread; the
        updated queue-state record (vf_state_save's format, same fd positions) and the
        fd list (still owned here until :meth:`close`). Raises :class:`MediatedError`
        if the thread did not stop within ``timeout`` (call again)."""
        if self._closed:
            raise MediatedError("the mediated path is closed")
        self._stopping = True
        signal_eventfd(self._wake)
        thread = self._thread
        if thread is not None:
            thread.join(max(0.0, timeout))
            if thread.is_alive():
                raise MediatedError(f"the mediated path of VF {self.vf} did not stop in "
                                    f"{timeout} s")
        rec = self._record
        queues = tuple(QueueRecord(r.index, r.record.enabled, r.vq.save(), r.record.kick_fd,
                                   r.record.call_fd) for r in
                       (self._rings[q.index] for q in rec.queues))
        in_flight = {q.index: set(q.state.in_flight) for q in queues}
        executing = tuple(k for k in rec.executing
                          if k in self._unconfirmed and k[1] in in_flight.get(k[0], ()))
        new = VfQueueRecord(rec.vf, rec.features, rec.sense_size, rec.cdb_size, rec.regions,
                            queues, rec.events_missed, executing,
                            rec.saver if executing else None)
        log_event(self._log, "mediated_stopped", vf=rec.vf, **self.stats())
        return new.to_dict(), list(self._fds)

    def collect_dirty(self) -> list[tuple[int, int]]:
        """Guest pages written since the last call, as (first page, count) runs; the
        marks are cleared (then a full fence, before the caller copies the pages)."""
        return self._marks.collect(self._barrier)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._stats)
            out["last_error"] = self._last_error
        out["outstanding"] = self._outstanding()
        out["faults"] = {r.index: r.fault for r in list(self._rings.values())
                         if r.fault is not None}
        out["running"] = self.running
        return out

    def close(self) -> None:
        """Detach the buffers, unmap guest memory, close the fds (idempotent)."""
        if self._closed:
            return
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._stopping = True
            signal_eventfd(self._wake)
            thread.join(30.0)
        self._closed = True
        self._teardown()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        if self._owns_pf:
            self._pf.close()

    def __enter__(self) -> MediatedPath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _teardown(self) -> None:
        """Everything but the record's fds (which are the caller's until set-up ends)."""
        for buffer in self._buffers:
            with contextlib.suppress(PfError):
                self._pf.pf_io_buffer_detach(buffer)
        self._buffers = []
        if self._bounce is not None:
            self._bounce.close(self._pf)
            self._bounce = None
        for ring in self._rings.values():
            ring.vq = None  # type: ignore[assignment]  # drop its views of guest memory
        self._rings = {}
        self._memory = None
        maps, self._maps = self._maps, []
        deferred = False
        for shm in maps:
            try:
                shm.close()
            except BufferError:
                deferred = True
        if deferred:
            gc.collect()
            for shm in maps:
                with contextlib.suppress(BufferError):
                    shm.close()
        if self._wake >= 0:
            with contextlib.suppress(OSError):
                os.close(self._wake)
            self._wake = -1

    # -- helpers --------------------------------------------------------------------------

    def _barrier(self) -> None:
        with self._barrier_lock:  # a locked instruction: a full fence on x86
            pass

    def _mark(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        self._marks.mark(gpa, length)
        pages = ((gpa + length - 1) >> 12) - (gpa >> 12) + 1
        with self._lock:
            self._stats["pages_marked"] += pages

    def _mark_segments(self, segments: Sequence[Segment]) -> None:
        for seg in segments:
            self._mark(seg.gpa, seg.length)

    def _mark_used(self, ring: _Ring) -> None:
        config = ring.vq.config
        self._mark(config.used_addr, config.used_bytes)

    def _count(self, **add: int) -> None:
        with self._lock:
            for key, value in add.items():
                self._stats[key] += value

    def _error(self, text: str, **fields: Any) -> None:
        with self._lock:
            self._stats["errors"] += 1
            self._last_error = text
        log_event(self._log, "mediated_error", level=logging.WARNING, vf=self.vf,
                  error=text, **fields)

    def _outstanding(self) -> int:
        return sum(len(r.vq.in_flight) for r in list(self._rings.values())
                   if r.vq is not None)

    def _serving_rings(self) -> list[_Ring]:
        return [r for r in self._rings.values()
                if r.record.enabled and r.fault is None and r.index != EVENTQ]

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            log_event(self._log, "mediated_started", vf=self.vf)
            self._await_stale()
            self._finish_in_flight()
            polling = False
            last = time.monotonic_ns()
            while not self._stopping:
                rings = self._serving_rings()
                done = sum(self._service(ring) for ring in rings)
                now = time.monotonic_ns()
                if done:
                    last = now
                    if not polling:
                        polling = True
                        for ring in rings:
                            self._mark_used(ring)
                            ring.vq.disable_kicks()
                    continue
                if polling and now - last < self._poll_budget:
                    continue
                if polling:
                    polling = False
                    if self._enable_kicks(rings):
                        polling = True
                        last = now
                        continue
                self._wait(rings)
        except Exception as exc:  # never crash the host: report and stop serving
            self._error(f"the mediated path stopped: {type(exc).__name__}: {exc}")

    def _enable_kicks(self, rings: list[_Ring]) -> bool:
        """Kicks on again on every ring; whether chains are already waiting."""
        pending = False
        for ring in rings:
            self._mark_used(ring)
            try:
                pending = ring.vq.enable_kicks() or pending
            except VirtqueueError as exc:
                self._fault(ring, exc)
        return pending

    def _wait(self, rings: list[_Ring]) -> None:
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        kicks = [r.kick_fd for r in rings if r.kick_fd is not None]
        for fd in kicks:
            poller.register(fd, select.POLLIN)
        poller.poll(int(self._idle_wait * 1000))
        clear_eventfd(self._wake)
        for fd in kicks:
            clear_eventfd(fd)

    def _fault(self, ring: _Ring, exc: BaseException) -> None:
        ring.fault = f"vring {ring.index}: {exc}"
        self._error(ring.fault, vring=ring.index)

    def _await_stale(self) -> None:
        """Claim X2: wait until the VF reports the stale executions of the heads the
        record lists as executing finished (see the module rules)."""
        if not self._unconfirmed:
            return
        count = len(self._unconfirmed)
        log_event(self._log, "mediated_wait_stale", vf=self.vf, heads=count)
        deadline = time.monotonic() + self._stale_wait
        why = "not drained"
        while True:
            try:
                drained, _ = self._pf.vf_drain(self.vf, STALE_POLL_MS)
            except PfError as exc:
                drained, why = False, exc.message
                time.sleep(STALE_POLL_MS / 1000)
            if drained:
                self._unconfirmed = frozenset()
                log_event(self._log, "mediated_stale_done", vf=self.vf, heads=count)
                return
            if time.monotonic() >= deadline:
                self._error(f"VF {self.vf} did not report {count} stale execution(s) "
                            f"finished within {self._stale_wait:g} s ({why}); their heads "
                            "stay in flight, not re-executed")
                return

    def _finish_in_flight(self) -> None:
        """Execute the heads the record still owes a used element (re-reading their
        chains), as the VF does at a resume; not those whose stale execution in the VF
        was never reported finished (claim X2)."""
        memory = self._memory
        assert memory is not None
        for ring in list(self._rings.values()):
            vq = ring.vq
            pushed = 0
            try:
                for head in vq.in_flight:
                    if self._stopping:
                        return
                    if (ring.index, head) in self._unconfirmed:
                        continue
                    chain = vq.read_chain(head)
                    if ring.index == CONTROLQ:
                        written = self._control(chain)
                    elif ring.index == EVENTQ:
                        # an event buffer taken and never filled: back as NO_EVENT
                        self._mark_segments(chain.writable)
                        written = chain.write(memory, event_bytes(None, False))
                        self._mark_segments(chain.writable)
                    else:
                        written = self._command(chain).written
                    self._push(ring, head, written)
                    pushed += 1
            except (VirtqueueError, RequestFault, GuestMemoryError) as exc:
                self._fault(ring, exc)
            if pushed and vq.should_notify():
                signal_eventfd(ring.call_fd)

    def _push(self, ring: _Ring, head: int, written: int) -> None:
        self._mark_used(ring)
        ring.vq.push_used(head, written)  # on_write marks the element and used.idx again

    def _service(self, ring: _Ring) -> int:
        vq = ring.vq
        done = 0
        try:
            while done < BATCH and not self._stopping:
                self._mark_used(ring)  # pop may store avail_event
                chain = vq.pop()
                if chain is None:
                    break
                if ring.index == CONTROLQ:
                    written = self._control(chain)
                else:
                    written = self._command(chain).written
                self._push(ring, chain.head, written)
                done += 1
        except (VirtqueueError, RequestFault, GuestMemoryError) as exc:
            self._fault(ring, exc)
        if done and vq.should_notify():
            signal_eventfd(ring.call_fd)
        return done

    def _control(self, chain: DescriptorChain) -> int:
        memory = self._memory
        assert memory is not None
        self._mark_segments(chain.writable)
        outcome = execute_control_for(chain, memory, self._addresses)
        self._mark_segments(chain.writable)
        self._count(control=1)
        return outcome.written

    # -- one command ----------------------------------------------------------------------

    def _command(self, chain: DescriptorChain) -> CommandOutcome:
        memory = self._memory
        assert memory is not None
        settings = self._settings
        request = parse_command(chain, memory, settings)
        self._mark_segments(request.response_area)
        try:
            outcome = self._execute(chain, request)
        finally:
            self._mark_segments(request.response_area)
        self._count(requests=1, bytes_in=outcome.data_in, bytes_out=outcome.data_out)
        return outcome

    def _execute(self, chain: DescriptorChain, request: CommandRequest) -> CommandOutcome:
        memory = self._memory
        assert memory is not None
        settings = self._settings
        target = request.target
        if target is None or target not in self._targets:
            return answer_command(chain, memory, settings, request, int(_R.BAD_TARGET))
        lun = self._lun_number(target, request.lun8)
        out_len, in_len = request.data_out_length, request.data_in_length
        if in_len and (not out_len or not _is_data_out(request.header.cdb[0])):
            direction, segments, unused = "from_device", request.data_in, out_len
        elif out_len:
            direction, segments, unused = "to_device", request.data_out, in_len
        else:
            direction, segments, unused = "none", (), 0
        try:
            reply = self._submit(target, lun, bytes(request.header.cdb), direction, segments)
            status = Status(int(reply["status"]))
            sense = bytes.fromhex(str(reply["sense"]))
            residual = int(reply["residual"])
            moved = int(reply["data_len"])
        except PfError as exc:
            # the vport is not logged in or not bound: the VF answers BAD_TARGET then
            response = _R.BAD_TARGET if exc.code == ErrorCode.WRONG_STATE \
                else _R.TRANSPORT_FAILURE
            self._error(f"pf_io_submit: {exc}", target=target, lun=lun)
            return answer_command(chain, memory, settings, request, int(response))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            self._error(f"pf_io_submit: {type(exc).__name__}: {exc}", target=target, lun=lun)
            return answer_command(chain, memory, settings, request,
                                  int(_R.TRANSPORT_FAILURE))
        if status == Status.CHECK_CONDITION:
            self._count(check_conditions=1)
        # the SCSI core uses this sense for an overrun only (vfdirect.core.scsi.task)
        overrun = status == Status.CHECK_CONDITION and sense == _OVERRUN_SENSE and moved == 0
        result = ScsiResult(status, sense,
                            data_in_len=moved if direction == "from_device" else 0,
                            data_out_len=moved if direction == "to_device" else 0,
                            residual=residual + unused, overrun=overrun)
        return complete_command(chain, memory, settings, request, result)

    def _lun_number(self, target: int, lun8: bytes) -> int:
        """The LUN pf_io_submit takes; a LUN field that names no LUN of the mapping in
        a decodable form becomes a number without a logical unit (the SCSI core then
        answers as it answers any LUN without one, as at the VF)."""
        try:
            number = int(decode_lun(lun8))
        except (LunError, TypeError):
            number = -1
        if 0 <= number <= MAX_LUN:
            return number
        return next(n for n in range(MAX_LUN, -1, -1) if (target, n) not in self._addresses)

    def _submit(self, target: int, lun: int, cdb: bytes, direction: str,
                segments: tuple[Segment, ...]) -> dict[str, Any]:
        pf = self._pf
        if direction == "none":
            return pf.pf_io_submit(self._wwpn, target, lun, cdb)
        inbound = direction == "from_device"
        scatter = self._scatter(segments)
        if scatter is not None:
            buffer, sg = scatter
            if inbound:
                self._mark_segments(segments)
            try:
                return pf.pf_io_submit(self._wwpn, target, lun, cdb, buffer=buffer, sg=sg,
                                       direction=direction)
            finally:
                if inbound:
                    self._mark_segments(segments)
        return self._submit_bounced(target, lun, cdb, direction, segments)

    def _scatter(self, segments: tuple[Segment, ...]) -> tuple[int, list[tuple[int, int]]] | None:
        """``segments`` as (buffer, [(file offset, length)]) in ONE attached buffer, or
        None (several files, a file without a buffer, too many segments)."""
        buffer: int | None = None
        sg: list[tuple[int, int]] = []
        for seg in segments:
            gpa, left = seg.gpa, seg.length
            while left > 0:
                region = self._region(gpa)
                if region is None or region.buffer is None:
                    return None
                if buffer is None:
                    buffer = region.buffer
                elif buffer != region.buffer:
                    return None
                take = min(left, region.end - gpa)
                offset = region.mmap_offset + gpa - region.gpa
                if sg and sg[-1][0] + sg[-1][1] == offset:
                    sg[-1] = (sg[-1][0], sg[-1][1] + take)
                else:
                    sg.append((offset, take))
                gpa += take
                left -= take
        if buffer is None or len(sg) > MAX_SG or any(n > MAX_BUFFER_BYTES for _, n in sg):
            return None
        return buffer, sg

    def _region(self, gpa: int) -> _Region | None:
        for region in self._regions:
            if region.gpa <= gpa < region.end:
                return region
        return None

    def _submit_bounced(self, target: int, lun: int, cdb: bytes, direction: str,
                        segments: tuple[Segment, ...]) -> dict[str, Any]:
        memory = self._memory
        assert memory is not None
        total = sum(s.length for s in segments)
        if total > MAX_BUFFER_BYTES:
            raise PfError(ErrorCode.INVALID_PARAMS,
                          f"a transfer of {total} bytes exceeds the PF's {MAX_BUFFER_BYTES}")
        bounce = self._bounce
        if bounce is None or bounce.size < total:
            if bounce is not None:
                self._bounce = None
                bounce.close(self._pf)
            size = _MIN_BOUNCE
            while size < total:
                size *= 2
            bounce = self._bounce = _Bounce(self._pf, min(size, MAX_BUFFER_BYTES))
        self._count(bounced=1)
        view = memoryview(bounce.map)
        try:
            if direction == "to_device":
                pos = 0
                for seg in segments:
                    view[pos:pos + seg.length] = memory.read(seg.gpa, seg.length)
                    pos += seg.length
            reply = self._pf.pf_io_submit(self._wwpn, target, lun, cdb, buffer=bounce.buffer,
                                          sg=[(0, total)], direction=direction)
            if direction == "from_device":
                moved = min(int(reply.get("data_len", 0)), total)
                pos = 0
                for seg in segments:
                    if pos >= moved:
                        break
                    take = min(seg.length, moved - pos)
                    self._mark(seg.gpa, take)
                    memory.write(seg.gpa, view[pos:pos + take])
                    self._mark(seg.gpa, take)
                    pos += take
            return reply
        finally:
            view.release()


#: Opcodes whose data goes to the device (for the rare chain with both data-out and
#: data-in buffers: pf_io_submit moves one direction; the other is residual).
_DATA_OUT_OPCODES = frozenset({0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0x8E, 0x3B, 0x15, 0x55,
                               0x41, 0x93, 0x42, 0x3F})


def _is_data_out(opcode: int) -> bool:
    return opcode in _DATA_OUT_OPCODES
