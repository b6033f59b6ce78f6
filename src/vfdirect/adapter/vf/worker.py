"""The VF thread: one per assigned VF, owning ALL of that VF's data path state.

Rules of this module:

* one thread, one selector: the VF's listening socket, the front end's vhost-user
  connection, the rings' kick eventfds and a wake eventfd for requests posted from the
  PF side (:meth:`VfWorker.call`: configure, quiesce, drain, save, restore, resume,
  reset, stop; each waited for with a bounded timeout). Nothing else touches this
  state, so nothing in it is locked;
* the vhost-user protocol is :class:`~vfdirect.core.vhost.BackendSession`'s: messages
  in, actions out, carried out here (map the memory table, start and stop rings, adopt
  and release eventfds, send replies);
* the direct data path (claim A10): a kick (or a poll) finds chains in a request queue;
  each is popped (copied out and checked by :class:`~vfdirect.core.virtio.Virtqueue`),
  executed by :func:`~vfdirect.core.adapter.vscsi.execute_command` on the VF's SCSI
  targets with zero-copy views of guest memory, completed with ``push_used`` and, when
  the driver asked for it, a call eventfd write. By default (``io_threads`` 0) a request
  is finished before the next chain is popped, so between two loop iterations nothing is
  in flight;
* concurrent IO (``vfdirect adapter run --io-threads N``): the VF thread still pops,
  checks and decodes every chain and takes the views of its data buffers, then hands
  the SCSI execution to the VF's :class:`~vfdirect.adapter.vf.iopool.IoPool`; an IO
  thread moves the data (LUN <-> guest buffers) and posts the result back (a queue and
  the ``done`` eventfd); the VF thread alone writes the response header, pushes the used
  element (out of order, as virtio allows) and notifies. A control queue request waits
  until no command of the VF is executing (and no new chain is fetched meanwhile), so a
  TMF still finds the task set empty (see :mod:`vfdirect.core.adapter.vscsi`);
* stale executions (claim X2): a request whose ring goes away while it executes (save,
  reset, fault, disconnect, a new vring) becomes STALE: its result is dropped, never
  pushed, but the IO thread may still move data. The guest memory it uses stays mapped
  (the mapping is retired, and unmapped when its last stale request finishes). A save
  lists them in the record (``executing``, with a ``saver`` token); ``vf_drain`` on the
  SAVED VF waits (bounded) for them and reports those still running, so that the next
  server of the queues (the mediated path, or this VF after a restore of its own
  record, whose ``vf_resume`` waits for them) re-executes them only afterwards: a stale
  READ landing in a buffer after its re-execution, or a stale WRITE after a newer one,
  cannot happen. A drain that misses its deadline hands the heads still outstanding
  over (:attr:`VfWorker.outstanding` drops to 0, so the PF lets the VF be saved);
* doorbells are adaptive: after activity the thread polls the rings with kicks disabled
  for :data:`POLL_BUDGET_NS`; then it re-enables kicks, re-checks the rings (a chain
  published between the last poll and the re-enable would otherwise wait for the next
  kick that never comes), and sleeps in the selector. An idle VF costs no CPU;
* the front end is accepted only from the VM process the PF assigned the VF to
  (SO_PEERCRED pid), one connection at a time; others are logged and closed;
* FRONTEND_CONNECT is reported when the first vring starts on a mapped memory table
  (SET_VRING_KICK completes a ring's setup: the front end has attached its memory and a
  ring, the direct path can run). FRONTEND_DISCONNECT when it goes. A malformed message,
  a broken ring or a badly framed request closes the connection and reports FAULT for
  this VF only; it refuses front ends until ``vf_reset``. Events are handed to a
  reporter (never applied from this thread: the PF side may be waiting for us while it
  holds the admin lock);
* teardown (disconnect, fault, save, reset) runs outside any ``except`` block: a
  traceback would keep views of guest memory alive and the memory could not be unmapped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from vfdirect.adapter.audit import Auditor
from vfdirect.adapter.log import log_event
from vfdirect.adapter.server import peer_credentials
from vfdirect.adapter.vf.fairness import BULK_BYTES, BULK_GATE
from vfdirect.adapter.vf.fds import (
    BadEventFd,
    check_eventfd,
    clear_eventfd,
    close_fds,
    signal_eventfd,
    unlink_if_ours,
    unmap_all,
)
from vfdirect.adapter.vf.iopool import IoPool
from vfdirect.core.adapter.platform import DrainResult, SavedQueueState
from vfdirect.core.adapter.vf import VfEvent, VfRecord, VmRef
from vfdirect.core.adapter.vf_state import (
    QueueRecord,
    RegionRecord,
    VfQueueRecord,
    VfStateError,
)
from vfdirect.core.adapter.vf_stats import VfStats
from vfdirect.core.adapter.vscsi import (
    CommandRequest,
    LunInfo,
    RequestFault,
    VscsiSettings,
    answer_command,
    complete_command,
    event_bytes,
    execute_command,
    execute_control,
    parse_command,
    rescan_events,
    segment_views,
    visible_luns,
)
from vfdirect.core.ids import TargetId
from vfdirect.core.rpc import ErrorCode, RpcError
from vfdirect.core.scsi import ScsiResult, Target
from vfdirect.core.vhost import BackendSession, Channel, MessageParser, VhostUserProtocolError
from vfdirect.core.vhost.messages import MAX_FDS, VhostUserMessage
from vfdirect.core.vhost.session import (
    Action,
    CloseConnection,
    CloseFds,
    EnableVring,
    FeaturesChanged,
    MapMemory,
    Refused,
    ResetDevice,
    SendReply,
    SetLogBase,
    SetVringCall,
    SetVringErr,
    SetVringKick,
    StartVring,
    StopVring,
    UpdateVringAddr,
    VringSetup,
)
from vfdirect.core.virtio import (
    DescriptorChain,
    GuestMemoryError,
    MemoryRegion,
    RegionMemory,
    Virtqueue,
    VirtqueueError,
)
from vfdirect.core.virtio.features import has
from vfdirect.core.virtio.scsi import (
    CONTROLQ,
    EVENTQ,
    ScsiFeature,
    VirtioScsiEvent,
    VirtioScsiResponse,
)
from vfdirect.core.virtio.state import QueueState
from vfdirect.core.wwn import Wwn
from vfdirect.transport.shm import SharedMemory, SharedMemoryError

#: Busy-poll budget after the last activity, before kicks are re-enabled (see rules).
#: Measured with the Python front end of the tests (QD1 4 KiB reads, 2 shared cores):
#: 0 us 1830 IOPS, 50 us 2200, 100 us 2450, 200 us 3090, 1 ms 3400; a Python guest
#: submits its next request some 150-250 us after a completion, so 200 us catches most
#: of them without a kick, and costs 200 us of spinning after the last one.
POLL_BUDGET_NS = 200_000
#: Chains taken from one ring before the others (and posted requests) get a turn.
BATCH = 32
#: ... or fewer: the round ends once its chains carry this many data bytes (one
#: largest request is 32 MiB), so that rounds stay short and a VF moving large
#: requests is paused between them while others are active (see ``fairness``).
BATCH_BYTES = BULK_BYTES
#: Longest wait for the front end to take a reply.
SEND_TIMEOUT_S = 2.0
RECV_BYTES = 1 << 16
#: Longest wait for executing requests when the front end goes or stops a ring (they
#: become stale after it).
STOP_WAIT_S = 5.0
#: Longest wait of ``vf_resume`` for stale executions of the heads it is to re-execute
#: (below the PF's call timeout; the caller may try again).
RESUME_WAIT_S = 4.0
#: Longest wait for the IO threads at shutdown.
POOL_STOP_S = 5.0

T = TypeVar("T")
#: (vf index, event, reason): how the worker reports, never blocking.
Reporter = Callable[[VfEvent, str | None], None]


class WorkerStopped(RpcError):
    def __init__(self, vf: int) -> None:
        super().__init__(ErrorCode.WRONG_STATE, f"VF {vf} data path is stopped")


@dataclass(slots=True)
class _Ring:
    index: int
    vq: Virtqueue | None  # None while the DMA window is revoked (SAVED)
    kick_fd: int | None
    call_fd: int | None
    err_fd: int | None
    enabled: bool
    #: the eventfds this ring owns (duplicates taken at a restore); the others are lent
    #: by the vhost-user session, which says when to close them
    owned: set[int]


@dataclass(slots=True, eq=False)
class _Job:
    """One command request handed to an IO thread."""

    ring: int
    chain: DescriptorChain
    request: CommandRequest
    target: Target
    data_out: list[memoryview]
    data_in: list[memoryview]
    #: the mapping its views are of (kept mapped while the job runs)
    memory: _Memory | None
    start_ns: int
    result: ScsiResult | None = None
    error: str | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.ring, self.chain.head)

    def release(self) -> None:
        """Drop every view of guest memory (the job is finished)."""
        for view in (*self.data_out, *self.data_in):
            with contextlib.suppress(BufferError):
                view.release()
        self.data_out = []
        self.data_in = []
        self.memory = None


@dataclass(slots=True)
class _Memory:
    maps: list[SharedMemory]
    #: per map: (gpa, size, front-end user address or None, offset in its file)
    regions: list[tuple[int, int, int | None, int]]
    memory: RegionMemory


class VfWorker:
    """The thread of one assigned VF (see the module rules)."""

    def __init__(self, index: int, *, listener: socket.socket, socket_path: Path,
                 socket_inode: int, settings: VscsiSettings, stats: VfStats,
                 report: Reporter, logger: logging.Logger,
                 poll_budget_ns: int = POLL_BUDGET_NS, io_threads: int = 0,
                 auditor: Auditor | None = None) -> None:
        """``io_threads`` 0: requests execute on the VF thread, one at a time; N > 0:
        on N IO threads of this VF (see the module rules)."""
        if io_threads < 0:
            raise ValueError(f"io_threads must be >= 0, not {io_threads}")
        self.index = index
        self._auditor = auditor  # None: the audit is off (plain guest memory)
        self._listener = listener
        self._socket_path = socket_path
        self._socket_inode = socket_inode
        self._settings = settings
        self._stats = stats
        self._report = report
        self._log = logger
        self._poll_budget = poll_budget_ns
        self._sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._commands: queue.SimpleQueue[tuple[Callable[[VfWorker], Any], Future[Any]]] = \
            queue.SimpleQueue()
        self._barrier_lock = threading.Lock()
        # configuration (from the PF's VF record snapshots)
        self._vm: VmRef | None = None
        self._targets: Mapping[TargetId, Target] = {}
        self._luns: dict[tuple[int, int], LunInfo] = {}
        # the front end
        self._conn: socket.socket | None = None
        self._peer_pid = 0
        self._session: BackendSession | None = None
        self._parser: MessageParser | None = None
        self._features = 0
        self._features_known = False
        self._memory: _Memory | None = None
        self._setups: dict[int, VringSetup] = {}
        self._rings: dict[int, _Ring] = {}
        self._kicks: dict[int, int] = {}  # registered kick fd -> vring index
        # device state
        self._connect_reported = False
        self._quiesced = False
        self._saved: VfQueueRecord | None = None
        self._faulted: str | None = None
        self._pending_fault: str | None = None
        self._events_missed = False
        self._polling = False
        self._last_activity = 0
        #: requests fetched, not completed, and not handed over by a drain that missed
        #: its deadline (read by the PF side without a lock)
        self.outstanding = 0
        self._handed_over = False
        # concurrent IO (see the module rules)
        self._pool = IoPool(io_threads, f"vf{index}") if io_threads else None
        self._done: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._done_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._executing: dict[tuple[int, int], _Job] = {}
        self._stale: dict[tuple[int, int], _Job] = {}
        #: control requests waiting for the executing commands (keyed like jobs)
        self._deferred: dict[tuple[int, int], DescriptorChain] = {}
        #: guest memory no longer ours but still used by stale requests
        self._retired: list[_Memory] = []
        #: the token of the last save that left stale requests
        self._save_token: str | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"vf{index}", daemon=True)

    # -- the PF side ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def native_id(self) -> int | None:
        return self._thread.native_id

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def fault(self) -> str | None:
        """Why the VF faulted, until a reset (read by the PF side without a lock; the
        PF's own record says ERROR a moment later, when the reporter has run)."""
        return self._faulted

    @property
    def front_end_pid(self) -> int | None:
        """The pid of the connected front end (read by the PF side without a lock)."""
        return self._peer_pid if self._conn is not None else None

    def call(self, fn: Callable[[VfWorker], T], timeout: float) -> T:
        """Run ``fn`` on the VF thread and return its result (or raise its exception);
        ``RpcError(TIMEOUT)`` if it did not finish within ``timeout`` seconds."""
        if threading.get_ident() == self._thread.ident:
            return fn(self)
        if not self._thread.is_alive():
            raise WorkerStopped(self.index)
        fut: Future[T] = Future()
        self._commands.put((fn, fut))
        signal_eventfd(self._wake)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            raise RpcError(ErrorCode.TIMEOUT,
                           f"VF {self.index} data path did not answer within "
                           f"{timeout:g} s") from None

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- commands (run on the VF thread) -----------------------------------------------

    def apply_config(self, vf: VfRecord, initiator: Wwn | None,
                     targets: Mapping[TargetId, Target]) -> None:
        """A new snapshot of the VF: its VM, its targets (mapping + bound vport)."""
        self._vm = vf.vm
        self._targets = targets
        old, self._luns = self._luns, visible_luns(vf.mapping, initiator)
        if self._conn is not None and (vf.vm is None or vf.vm.pid != self._peer_pid):
            log_event(self._log, "vf_disconnect", vf=self.index, pid=self._peer_pid,
                      reason="the VF is no longer assigned to this process")
            self._drop_connection(report=True)
        if old != self._luns and self._features_known:
            self._post_events(rescan_events(
                old, self._luns, hotplug=has(self._features, ScsiFeature.HOTPLUG),
                change=has(self._features, ScsiFeature.CHANGE)))

    def quiesce(self) -> int:
        """Claim B1: stop fetching from the VM's queues (requests wait in them)."""
        self._quiesced = True
        self._polling = False
        self._handed_over = False
        self._sync_kicks()
        return self._count_outstanding()

    def drain(self, timeout_ms: int) -> DrainResult:
        """Claim B2: finish what was fetched (requests executing on the IO threads,
        restored heads), within ``timeout_ms``. Claim X2: what is still outstanding at
        the deadline is handed over (reported, and no longer counted as outstanding).
        On a SAVED VF: wait for the stale executions the save left, and report those
        still running."""
        deadline = time.monotonic() + timeout_ms / 1000
        if self._saved is not None:
            self._wait_jobs(lambda: not self._stale, deadline)
            stale = tuple(h for _, h in sorted(self._stale))
            return DrainResult(not stale, stale)
        self._handed_over = False
        if self._memory is not None:
            self._wait_jobs(lambda: not self._executing, deadline)
            self._answer_deferred()
            self._finish_in_flight(deadline)
        heads = tuple(h for r in self._rings.values() if r.vq is not None
                      for h in r.vq.in_flight)
        self._after_fault()
        if heads and self._quiesced:
            self._handed_over = True
            log_event(self._log, "vf_drain_expired", vf=self.index, handed_over=len(heads),
                      executing=len(self._executing))
        self._count_outstanding()
        return DrainResult(not heads, heads)

    def save(self) -> SavedQueueState:
        """Claims B3, B4: hand the queue state over and revoke the DMA window."""
        if not self._quiesced:
            raise RpcError(ErrorCode.WRONG_STATE, f"VF {self.index} is not quiesced")
        if self._saved is not None:
            raise RpcError(ErrorCode.WRONG_STATE, f"VF {self.index} is saved already")
        fds: list[int] = []
        try:
            regions: list[RegionRecord] = []
            if self._memory is not None:
                for shm, (gpa, size, user, offset) in zip(self._memory.maps,
                                                          self._memory.regions, strict=True):
                    fds.append(os.dup(shm.fd))
                    regions.append(RegionRecord(gpa, size, user, offset, len(fds) - 1))
            queues: list[QueueRecord] = []
            for index in sorted(self._rings):
                ring = self._rings[index]
                if ring.vq is None:
                    continue
                kick = call = None
                if ring.kick_fd is not None:
                    fds.append(os.dup(ring.kick_fd))
                    kick = len(fds) - 1
                if ring.call_fd is not None:
                    fds.append(os.dup(ring.call_fd))
                    call = len(fds) - 1
                queues.append(QueueRecord(index, ring.enabled, ring.vq.save(), kick, call))
            saved = {q.index for q in queues}
            executing = tuple(sorted(k for k in self._executing if k[0] in saved))
            token = os.urandom(8).hex() if executing else None
            record = VfQueueRecord(self.index, self._features, self._settings.sense_size,
                                   self._settings.cdb_size, tuple(regions), tuple(queues),
                                   self._events_missed, executing, token)
            data = record.to_dict()
        except BaseException:
            close_fds(fds)
            raise
        # revoke the DMA window: no view of guest memory survives this (but those of the
        # requests still executing: they become stale, their results are never pushed,
        # and the memory is unmapped when the last of them has finished)
        self._saved = record
        self._save_token = token
        self._polling = False
        self._make_stale(lambda key: True)
        self._deferred.clear()
        for ring in self._rings.values():
            ring.vq = None
        self._sync_kicks()
        self._unmap()
        log_event(self._log, "vf_saved", vf=self.index, queues=len(record.queues),
                  fds=len(fds), executing=len(executing))
        return SavedQueueState(data, tuple(fds))

    def restore(self, data: Mapping[str, Any], fds: Sequence[int]) -> None:
        """Take a queue state (claims X1, B7); ``fds`` are borrowed (duplicated here)."""
        try:
            record = VfQueueRecord.from_dict(data, fds=len(fds))
        except VfStateError as exc:
            raise RpcError(ErrorCode.INVALID_PARAMS, f"vf_state_restore: {exc}") from None
        s = self._settings
        if (record.sense_size, record.cdb_size) != (s.sense_size, s.cdb_size):
            raise RpcError(ErrorCode.INVALID_PARAMS,
                           f"vf_state_restore: the record's sense/cdb sizes "
                           f"{record.sense_size}/{record.cdb_size} differ from this VF's "
                           f"{s.sense_size}/{s.cdb_size}")
        if any(q.index >= s.num_vrings for q in record.queues):
            raise RpcError(ErrorCode.INVALID_PARAMS,
                           f"vf_state_restore: a vring index is beyond this VF's "
                           f"{s.num_vrings} vrings")
        if record.executing and record.saver != self._save_token:
            raise RpcError(ErrorCode.INVALID_PARAMS,
                           f"vf_state_restore: the record lists {len(record.executing)} "
                           f"request(s) VF {record.vf} was still executing when it saved; "
                           "they must be seen finished (vf_drain of that VF) before "
                           "another VF serves the queues")
        own: list[int] = []
        maps: list[SharedMemory] = []
        adopted: set[int] = set()
        error: RpcError | None = None
        done = False
        try:
            for fd in fds:
                own.append(os.dup(fd))
            for q in record.queues:
                for pos in (q.kick_fd, q.call_fd):
                    if pos is not None:
                        check_eventfd(own[pos], f"queue {q.index}")
            for region in record.regions:
                maps.append(SharedMemory(own[region.fd], region.size,
                                         offset=region.mmap_offset, owns_fd=True))
                adopted.add(region.fd)
            memory = self._guest_memory(
                [MemoryRegion(r.gpa, m.buffer, r.user_addr)
                 for r, m in zip(record.regions, maps, strict=True)],
                [(r.gpa, r.size) for r in record.regions])
            rings = {q.index: _Ring(q.index, Virtqueue.restore(q.state, memory,
                                                               barrier=self._barrier),
                                    None if q.kick_fd is None else own[q.kick_fd],
                                    None if q.call_fd is None else own[q.call_fd],
                                    None, q.enabled,
                                    {own[p] for p in (q.kick_fd, q.call_fd) if p is not None})
                     for q in record.queues}
            done = True
        except (BadEventFd, OSError) as exc:
            error = RpcError(ErrorCode.BAD_FDS, f"vf_state_restore: {exc}")
        except SharedMemoryError as exc:
            error = RpcError(ErrorCode.BAD_FDS, f"vf_state_restore: memory: {exc}")
        except (GuestMemoryError, VirtqueueError, ValueError) as exc:
            error = RpcError(ErrorCode.INVALID_PARAMS, f"vf_state_restore: {exc}")
        finally:
            if not done:  # whatever went wrong: nothing of it is kept
                memory = None  # type: ignore[assignment]
                rings = {}
                unmap_all(maps, self._log, self.index)
                close_fds(fd for i, fd in enumerate(own) if i not in adopted)
        if error is not None:
            raise error
        # the new state replaces whatever was there
        for ring in list(self._rings.values()):
            self._forget_ring(ring)
        self._unmap()
        self._memory = _Memory(maps, [(r.gpa, r.size, r.user_addr, r.mmap_offset)
                                      for r in record.regions], memory)
        for ring in rings.values():
            if ring.kick_fd is not None:
                os.set_blocking(ring.kick_fd, False)
        self._rings = rings
        self._features = record.features
        self._features_known = True
        self._events_missed = record.events_missed
        self._saved = None
        self._quiesced = True
        self._handed_over = False
        self._sync_kicks()
        self._count_outstanding()
        log_event(self._log, "vf_restored", vf=self.index, queues=len(rings),
                  in_flight=self.outstanding, stale=len(self._stale))

    def resume(self) -> None:
        """Fetch again from the restored (or quiesced) positions; heads still in flight
        are re-read and executed first."""
        if self._saved is not None:
            raise RpcError(ErrorCode.WRONG_STATE,
                           f"VF {self.index} is saved; vf_state_restore first")
        owed = {(r.index, h) for r in self._rings.values() if r.vq is not None
                 for h in r.vq.in_flight}
        if not self._wait_jobs(lambda: not owed & self._stale.keys(),
                               time.monotonic() + RESUME_WAIT_S):
            raise RpcError(ErrorCode.TIMEOUT,
                           f"VF {self.index}: {len(owed & self._stale.keys())} request(s) of "
                           "the restored state are still executing from before the save; "
                           "vf_resume again later")
        self._quiesced = False
        self._handed_over = False
        self._connect_reported = True  # the PF moves the VF to CONNECTED
        if self._memory is not None:
            self._finish_in_flight(None)
        self._count_outstanding()
        self._sync_kicks()
        if self._events_missed:
            self._deliver_missed()
        self._after_fault()
        self._last_activity = time.monotonic_ns()
        self._polling = True  # look at the rings at once

    def reset(self) -> None:
        """Function-level reset: drop the front end and every ring, forget faults."""
        self._drop_connection(report=False)
        for ring in list(self._rings.values()):
            self._forget_ring(ring)
        self._unmap()
        self._faulted = None
        self._pending_fault = None
        self._quiesced = False
        self._saved = None
        self._handed_over = False
        self._deferred.clear()
        self._events_missed = False
        self._connect_reported = False
        self._features_known = False
        self._stats.clear()
        self.outstanding = 0

    def stop(self) -> None:
        self._stop = True

    # -- the loop ---------------------------------------------------------------------

    def _barrier(self) -> None:
        # A full fence between publishing used.idx and reading the driver's suppression
        # fields (VIRTIO 1.x 2.7.7.2): a lock round trip is a locked instruction on x86.
        with self._barrier_lock:
            pass

    def _run(self) -> None:
        sel = self._sel
        sel.register(self._wake, selectors.EVENT_READ, "wake")
        sel.register(self._listener, selectors.EVENT_READ, "listen")
        if self._pool is not None:
            sel.register(self._done_fd, selectors.EVENT_READ, "done")
        try:
            while not self._stop:
                try:
                    self._iterate()
                except Exception as exc:  # a bug: log it, fault this VF, keep serving
                    log_event(self._log, "vf_internal_error", level=logging.ERROR,
                              vf=self.index, exc_info=exc)
                    self._pending_fault = f"internal error ({type(exc).__name__})"
                    time.sleep(0.01)  # never a hot loop, whatever the bug
                self._after_fault()
        finally:
            self._shutdown()

    def _iterate(self) -> None:
        timeout = 0 if self._polling else None
        for key, _ in self._sel.select(timeout):
            tag = key.data
            if tag == "wake":
                clear_eventfd(self._wake)
                self._run_commands()
            elif tag == "listen":
                self._accept()
            elif tag == "conn":
                self._read_connection()
            elif tag == "done":
                clear_eventfd(self._done_fd)  # the results are taken in _work
            else:
                clear_eventfd(key.fd)
                self._stats.kicks += 1
            self._after_fault()
            if self._stop:
                return
        cost = time.thread_time_ns()
        self._work()
        self._count_outstanding()  # kept live for the PF's vf_get / adapter_get_stats
        BULK_GATE.after_round(self.index, time.thread_time_ns() - cost)  # VFs share CPU

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(self)
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
            self._after_fault()

    def _shutdown(self) -> None:
        self._drop_connection(report=False)
        for ring in list(self._rings.values()):
            self._forget_ring(ring)
        self._unmap()
        stopped = True
        if self._pool is not None:
            stopped = self._pool.stop(POOL_STOP_S)
            self._reap()
            if not stopped:
                log_event(self._log, "vf_io_threads_stuck", level=logging.ERROR,
                          vf=self.index, stale=len(self._stale))
        with contextlib.suppress(Exception):
            self._sel.close()
        self._listener.close()
        unlink_if_ours(self._socket_path, self._socket_inode)
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                break
            if fut.set_running_or_notify_cancel():
                fut.set_exception(WorkerStopped(self.index))
        os.close(self._wake)
        if stopped:  # else a stuck IO thread may still signal it
            os.close(self._done_fd)
        log_event(self._log, "vf_thread_stopped", vf=self.index)

    # -- accepting the front end -------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log_event(self._log, "vf_accept_failed", level=logging.WARNING,
                          vf=self.index, error=str(exc))
                return
            try:
                pid, uid, _gid = peer_credentials(conn)
            except OSError as exc:
                conn.close()
                log_event(self._log, "vf_refused", level=logging.WARNING, vf=self.index,
                          reason=f"no peer credentials: {exc}")
                continue
            if self._conn is not None:
                # A restarted VM process: its predecessor's end-of-stream may be waiting
                # behind this accept in the same selector round. Look first.
                self._read_connection()
                self._after_fault()
            vm = self._vm
            reason = None
            if vm is None:
                reason = "the VF is not assigned to a VM"
            elif pid != vm.pid:
                reason = f"peer pid {pid} is not the pid {vm.pid} of VM {vm.name}"
            elif self._faulted is not None:
                reason = f"the VF is in ERROR ({self._faulted}); vf_reset first"
            elif self._conn is not None:
                reason = f"a front end (pid {self._peer_pid}) is connected already"
            if reason is not None:
                self._stats.refused += 1
                log_event(self._log, "vf_refused", level=logging.WARNING, vf=self.index,
                          pid=pid, uid=uid, reason=reason)
                conn.close()
                continue
            conn.setblocking(False)
            self._conn = conn
            self._peer_pid = pid
            self._session = BackendSession(self._settings.backend_config())
            self._parser = MessageParser(Channel.FRONTEND_REQUESTS)
            self._sel.register(conn, selectors.EVENT_READ, "conn")
            self._stats.connections += 1
            log_event(self._log, "vf_connect", vf=self.index, pid=pid)

    def _read_connection(self) -> None:
        while self._conn is not None and self._pending_fault is None:
            conn, parser = self._conn, self._parser
            assert parser is not None
            try:
                data, fds, flags, _ = socket.recv_fds(conn, RECV_BYTES, MAX_FDS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log_event(self._log, "vf_disconnect", vf=self.index, pid=self._peer_pid,
                          reason=f"receive failed: {exc}")
                self._drop_connection(report=True)
                return
            if flags & socket.MSG_CTRUNC:
                close_fds(fds)
                self._pending_fault = "vhost-user: more file descriptors than a message " \
                                      "may carry"
                return
            if not data and not fds:
                log_event(self._log, "vf_disconnect", vf=self.index, pid=self._peer_pid,
                          reason="the front end closed the connection")
                self._drop_connection(report=True)
                return
            try:
                messages = parser.feed(data, fds)
            except VhostUserProtocolError as exc:
                close_fds(exc.fds)
                self._pending_fault = f"vhost-user: {exc}"
                return
            for message in messages:
                if self._session is None or self._pending_fault is not None:
                    close_fds(message.fds)
                    continue
                self._apply(self._session.handle(message))

    def _send(self, message: VhostUserMessage) -> bool:
        conn = self._conn
        if conn is None:
            close_fds(message.fds)
            return False
        data = message.encode()
        fds = list(message.fds)
        deadline = time.monotonic() + SEND_TIMEOUT_S
        try:
            while data:
                try:
                    sent = socket.send_fds(conn, [data], fds) if fds else conn.send(data)
                except (BlockingIOError, InterruptedError):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("the front end does not read its replies") \
                            from None
                    with selectors.DefaultSelector() as wsel:
                        wsel.register(conn, selectors.EVENT_WRITE)
                        wsel.select(left)
                    continue
                data = data[sent:]
                fds = []
        except (OSError, TimeoutError) as exc:
            log_event(self._log, "vf_disconnect", vf=self.index, pid=self._peer_pid,
                      reason=f"send failed: {exc}")
            self._drop_connection(report=True)
            return False
        finally:
            close_fds(message.fds)
        return True

    # -- carrying out the session's actions -------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, CloseFds):
                self._release_fds(action.fds)
            elif self._pending_fault is not None or self._conn is None:
                if isinstance(action, MapMemory):
                    close_fds(action.fds)
            elif isinstance(action, SendReply):
                self._send(action.message)
            elif isinstance(action, MapMemory):
                self._map_memory(action)
            elif isinstance(action, StartVring):
                self._start_vring(action.setup)
            elif isinstance(action, StopVring):
                self._stop_vring(action.index)
            elif isinstance(action, EnableVring):
                self._enable_vring(action.index, action.enabled)
            elif isinstance(action, UpdateVringAddr):
                self._update_vring_addr(action)
            elif isinstance(action, SetVringKick | SetVringCall | SetVringErr):
                self._set_vring_fd(action)
            elif isinstance(action, FeaturesChanged):
                self._features = action.features
            elif isinstance(action, ResetDevice):
                for ring in list(self._rings.values()):
                    self._forget_ring(ring)
                self._setups.clear()
                self._features_known = False
                self._polling = False
            elif isinstance(action, Refused):
                log_event(self._log, "vf_vhost_refused", vf=self.index,
                          request=getattr(action.request, "name", action.request),
                          reason=action.reason)
            elif isinstance(action, CloseConnection):
                self._pending_fault = f"vhost-user: {action.reason}"
            elif isinstance(action, SetLogBase):
                # LOG_SHMFD is never offered, so the session refuses SET_LOG_BASE first.
                log_event(self._log, "vf_vhost_refused", vf=self.index,
                          request="SET_LOG_BASE", reason="dirty logging is not supported")

    def _release_fds(self, fds: tuple[int, ...]) -> None:
        """The session is done with these fds: forget every use of them, then close."""
        for fd in fds:
            if fd in self._kicks:
                self._sel.unregister(fd)
                del self._kicks[fd]
            for ring in self._rings.values():
                if ring.kick_fd == fd:
                    ring.kick_fd = None
                if ring.call_fd == fd:
                    ring.call_fd = None
                if ring.err_fd == fd:
                    ring.err_fd = None
        close_fds(fds)

    def _map_memory(self, action: MapMemory) -> None:
        if self._saved is not None:
            # The DMA window is revoked: the front end's new table is not mapped.
            close_fds(action.fds)
            log_event(self._log, "vf_memory_ignored", vf=self.index,
                      reason="the VF is SAVED (DMA window revoked)")
            return
        maps: list[SharedMemory] = []
        error = None
        try:
            for region, fd in zip(action.regions, action.fds, strict=True):
                maps.append(SharedMemory(fd, region.memory_size, offset=region.mmap_offset,
                                         owns_fd=True))
            memory = self._guest_memory(
                [MemoryRegion(r.guest_phys_addr, m.buffer, r.userspace_addr)
                 for r, m in zip(action.regions, maps, strict=True)],
                [(r.guest_phys_addr, r.memory_size) for r in action.regions])
        except (SharedMemoryError, GuestMemoryError, ValueError, OverflowError) as exc:
            error = f"memory table: {exc}"
        if error is not None:
            memory = None  # type: ignore[assignment]
            close_fds(action.fds[len(maps):])
            unmap_all(maps, self._log, self.index)
            self._pending_fault = error
            return
        # running rings move to the new table (same guest addresses, new mappings)
        try:
            for ring in self._rings.values():
                if ring.vq is not None:
                    ring.vq = Virtqueue.restore(ring.vq.save(), memory, barrier=self._barrier)
        except VirtqueueError as exc:
            error = f"vring {ring.index} is not in the new memory table: {exc}"
        old = self._memory
        self._memory = _Memory(maps, [(r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                       r.mmap_offset) for r in action.regions], memory)
        if old is not None and self._holds(old):
            self._retired.append(old)  # executing requests have views of it
            del old
        elif old is not None:
            old_maps = old.maps
            del old  # its RegionMemory holds views of the old maps
            unmap_all(old_maps, self._log, self.index)
        if error is not None:
            self._pending_fault = error
            return
        log_event(self._log, "vf_memory", vf=self.index, regions=len(maps),
                  bytes=sum(m.size for m in maps))

    def _guest_memory(self, regions: list[MemoryRegion],
                      granted: list[tuple[int, int]]) -> RegionMemory:
        """The VF's view of the front end's memory table (audited with ``--audit``)."""
        if self._auditor is None:
            return RegionMemory(regions)
        return self._auditor.memory(self.index, regions, granted)

    def _start_vring(self, setup: VringSetup) -> None:
        self._setups[setup.index] = setup
        self._features = setup.features
        self._features_known = True
        if self._saved is not None:
            return  # remembered; served again after a restore
        if self._memory is None:
            self._pending_fault = f"vring {setup.index} started before a memory table"
            return
        try:
            for fd, what in ((setup.kick_fd, "kick"), (setup.call_fd, "call"),
                             (setup.err_fd, "err")):
                if fd is not None:
                    check_eventfd(fd, f"vring {setup.index} {what}")
            config = setup.queue_config(self._memory.memory)
            vq = Virtqueue(self._memory.memory, config, last_avail_idx=setup.base,
                           barrier=self._barrier)
        except (BadEventFd, VirtqueueError) as exc:
            self._pending_fault = str(exc)
            return
        old = self._rings.get(setup.index)
        if old is not None:
            self._forget_ring(old)
        if setup.kick_fd is not None:
            os.set_blocking(setup.kick_fd, False)
        self._rings[setup.index] = _Ring(setup.index, vq, setup.kick_fd, setup.call_fd,
                                         setup.err_fd, setup.enabled, set())
        self._sync_kicks()
        log_event(self._log, "vf_vring_start", vf=self.index, vring=setup.index,
                  size=config.size, base=setup.base, event_idx=config.event_idx,
                  indirect=config.indirect)
        if not self._connect_reported:
            self._connect_reported = True
            self._report(VfEvent.FRONTEND_CONNECT, None)
        if setup.index == EVENTQ and self._events_missed:
            self._deliver_missed()

    def _stop_vring(self, index: int) -> None:
        """GET_VRING_BASE: stop the ring and tell the front end where to resume."""
        ring = self._rings.get(index)
        if ring is not None and ring.vq is not None:
            # requests of this ring still executing finish first (else they go stale)
            self._wait_jobs(lambda: not any(k[0] == index for k in self._executing),
                            time.monotonic() + STOP_WAIT_S)
            self._answer_deferred()
            self._finish_in_flight(None, only=ring)
            base = ring.vq.last_avail_idx
        elif self._saved is not None and any(q.index == index for q in self._saved.queues):
            base = next(q.state.last_avail_idx for q in self._saved.queues if q.index == index)
        else:
            setup = self._setups.get(index)
            base = 0 if setup is None else setup.base
        if ring is not None:
            self._forget_ring(ring)
        self._setups.pop(index, None)
        assert self._session is not None
        self._apply(self._session.vring_stopped(index, base))
        log_event(self._log, "vf_vring_stop", vf=self.index, vring=index, base=base)

    def _enable_vring(self, index: int, enabled: bool) -> None:
        setup = self._setups.get(index)
        if setup is not None:
            self._setups[index] = _replace_setup(setup, enabled=enabled)
        ring = self._rings.get(index)
        if ring is not None:
            ring.enabled = enabled
            self._sync_kicks()
            if enabled:
                self._polling = True
                self._last_activity = time.monotonic_ns()
                if index == EVENTQ and self._events_missed:
                    self._deliver_missed()

    def _update_vring_addr(self, action: UpdateVringAddr) -> None:
        setup = self._setups.get(action.index)
        ring = self._rings.get(action.index)
        if setup is None:
            return
        setup = _replace_setup(setup, addr=action.addr)
        self._setups[action.index] = setup
        if ring is None or ring.vq is None or self._memory is None:
            return
        try:
            config = setup.queue_config(self._memory.memory)
            st = ring.vq.save()
            ring.vq = Virtqueue.restore(
                QueueState(config.size, config.desc_addr, config.avail_addr, config.used_addr,
                           st.last_avail_idx, st.used_idx, st.in_flight, config.event_idx,
                           config.indirect), self._memory.memory, barrier=self._barrier)
        except VirtqueueError as exc:
            self._pending_fault = str(exc)

    def _set_vring_fd(self, action: SetVringKick | SetVringCall | SetVringErr) -> None:
        setup = self._setups.get(action.index)
        field = {SetVringKick: "kick_fd", SetVringCall: "call_fd",
                 SetVringErr: "err_fd"}[type(action)]
        if setup is not None:
            self._setups[action.index] = _replace_setup(setup, **{field: action.fd})
        if action.fd is not None:
            try:
                check_eventfd(action.fd, f"vring {action.index} {field}")
            except BadEventFd as exc:
                self._pending_fault = str(exc)
                return
        ring = self._rings.get(action.index)
        if ring is None:
            return
        # the front end's word replaces a restored ring's own eventfd
        old = getattr(ring, field)
        if old is not None and old in ring.owned:
            if old in self._kicks:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(old)
                del self._kicks[old]
            ring.owned.discard(old)
            close_fds((old,))
        setattr(ring, field, action.fd)
        if isinstance(action, SetVringKick):
            if action.fd is not None:
                os.set_blocking(action.fd, False)
            self._sync_kicks()

    # -- rings ------------------------------------------------------------------------

    def _serving(self) -> bool:
        return (self._memory is not None and not self._quiesced and self._saved is None
                and self._faulted is None and self._pending_fault is None)

    def _serving_rings(self) -> list[_Ring]:
        if not self._serving():
            return []
        return [r for r in self._rings.values()
                if r.vq is not None and r.enabled and r.index != EVENTQ]

    def _sync_kicks(self) -> None:
        """Watch exactly the kick eventfds of the rings being served (and the event
        queue's, whose kicks bring buffers)."""
        want: dict[int, int] = {}
        if self._serving():
            for ring in self._rings.values():
                if ring.vq is not None and ring.enabled and ring.kick_fd is not None:
                    want[ring.kick_fd] = ring.index
        for fd in list(self._kicks):
            if want.get(fd) != self._kicks[fd]:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(fd)
                del self._kicks[fd]
        for fd, index in want.items():
            if fd not in self._kicks:
                try:
                    self._sel.register(fd, selectors.EVENT_READ, ("kick", index))
                except (KeyError, ValueError, OSError) as exc:
                    self._pending_fault = f"vring {index} kick eventfd: {exc}"
                    return
                self._kicks[fd] = index

    def _work(self) -> None:
        """Serve the rings; manage the adaptive doorbell."""
        done = 0
        if self._executing or self._stale:
            done = self._reap()  # results of the IO threads, also while quiesced
        if self._deferred:
            self._answer_deferred()  # TMFs, once nothing is executing
        rings = self._serving_rings()
        if not rings:
            self._polling = False
            if self._serving() and self._events_missed:
                self._deliver_missed()
            return
        try:
            for ring in rings:
                done += self._service(ring)
            if self._events_missed:
                self._deliver_missed()
        except (VirtqueueError, RequestFault, GuestMemoryError) as exc:
            self._pending_fault = f"vring {ring.index}: {_detached(exc)}"
            self._signal_err(ring)
            return
        now = time.monotonic_ns()
        if done:
            self._last_activity = now
            if not self._polling:
                self._polling = True
                for r in rings:
                    assert r.vq is not None
                    r.vq.disable_kicks()
            return
        if self._polling and now - self._last_activity >= self._poll_budget:
            # Re-enable kicks on EVERY ring, then look again: a chain published before
            # the re-enable brought no kick.
            pending = False
            for r in rings:
                assert r.vq is not None
                try:
                    pending = r.vq.enable_kicks() or pending
                except VirtqueueError as exc:  # the available index jumped meanwhile
                    self._pending_fault = f"vring {r.index}: {_detached(exc)}"
                    self._signal_err(r)
                    return
            if pending:
                self._last_activity = now
            else:
                self._polling = False

    def _service(self, ring: _Ring) -> int:
        vq = ring.vq
        memory = self._memory
        assert vq is not None and memory is not None
        done = 0
        moved = 0  # data bytes this round: bounded too (fairness: BATCH_BYTES)
        while done < BATCH and moved < BATCH_BYTES and not self._deferred:
            start = time.perf_counter_ns()
            chain = vq.pop()
            if chain is None:
                break
            moved += max(chain.readable_length, chain.writable_length)
            if ring.index == CONTROLQ and self._executing:
                # a TMF finds the task set empty: it waits for the executing commands,
                # and nothing new is fetched meanwhile
                self._deferred[(ring.index, chain.head)] = chain
                done += 1
                break
            if ring.index == CONTROLQ:
                control = execute_control(chain, memory.memory, self._targets)
                vq.push_used(chain.head, control.written)
                self._stats.record_control(control)
            elif self._pool is not None:
                self._submit(ring, chain, memory, start)
            else:
                with BULK_GATE.transfer(max(chain.readable_length, chain.writable_length),
                                         self.index, pause=False):  # after_round pauses
                    outcome = execute_command(chain, memory.memory, self._targets,
                                              self._settings)
                vq.push_used(chain.head, outcome.written)
                self._stats.record_command(outcome, time.perf_counter_ns() - start)
            done += 1
        if done and vq.should_notify() and signal_eventfd(ring.call_fd):
            self._stats.notifications += 1
        return done

    def _finish_in_flight(self, deadline: float | None, only: _Ring | None = None) -> None:
        """Execute the heads a restored queue still owes a used element (re-reading their
        chains). Ring faults are recorded as a pending fault."""
        memory = self._memory
        if memory is None:
            return
        for ring in [only] if only is not None else list(self._rings.values()):
            vq = ring.vq
            if vq is None:
                continue
            pushed = 0
            try:
                for head in vq.in_flight:
                    if deadline is not None and time.monotonic() > deadline:
                        return
                    key = (ring.index, head)
                    if key in self._executing or key in self._stale:
                        continue  # its execution (current or stale) is not over
                    if ring.index == CONTROLQ and self._executing:
                        continue  # a TMF waits for the executing commands
                    chain = vq.read_chain(head)
                    if ring.index == CONTROLQ:
                        self._deferred.pop(key, None)
                        vq.push_used(head, execute_control(chain, memory.memory,
                                                           self._targets).written)
                    elif ring.index == EVENTQ:
                        # an event buffer taken and never filled: hand it back as
                        # NO_EVENT (the driver re-posts it)
                        vq.push_used(head, chain.write(memory.memory,
                                                       event_bytes(None, False)))
                    else:
                        outcome = execute_command(chain, memory.memory, self._targets,
                                                  self._settings)
                        vq.push_used(head, outcome.written)
                        self._stats.record_command(outcome, 0)
                    pushed += 1
                if pushed and vq.should_notify():
                    signal_eventfd(ring.call_fd)
            except (VirtqueueError, RequestFault, GuestMemoryError) as exc:
                self._pending_fault = f"vring {ring.index}: {_detached(exc)}"
                return

    def _count_outstanding(self) -> int:
        count = sum(len(r.vq.in_flight) for r in self._rings.values() if r.vq is not None)
        self.outstanding = 0 if self._handed_over else count
        return count

    # -- the event queue --------------------------------------------------------------

    def _event_ring(self) -> _Ring | None:
        ring = self._rings.get(EVENTQ)
        if ring is None or ring.vq is None or not ring.enabled or not self._serving():
            return None
        return ring

    def _post_events(self, events: list[VirtioScsiEvent]) -> None:
        for event in events:
            if not self._write_event(event):
                self._events_missed = True
                self._stats.events_missed += 1
        if events:
            log_event(self._log, "vf_events", vf=self.index, events=len(events),
                      missed=self._events_missed)

    def _deliver_missed(self) -> None:
        if self._write_event(None):
            log_event(self._log, "vf_events", vf=self.index, events=0, missed=True)

    def _write_event(self, event: VirtioScsiEvent | None) -> bool:
        """Write ``event`` (None: NO_EVENT) into the next event buffer, carrying
        EVENTS_MISSED when events were dropped; False when no buffer is there."""
        ring = self._event_ring()
        memory = self._memory
        if ring is None or memory is None:
            return False
        vq = ring.vq
        assert vq is not None
        try:
            while True:
                chain = vq.pop()
                if chain is None:
                    return False
                if chain.writable_length < VirtioScsiEvent.SIZE:
                    vq.push_used(chain.head, 0)  # too short: given back unused
                    continue
                written = chain.write(memory.memory, event_bytes(event, self._events_missed))
                vq.push_used(chain.head, written)
                self._events_missed = False
                self._stats.events_posted += 1
                if vq.should_notify():
                    signal_eventfd(ring.call_fd)
                return True
        except (VirtqueueError, GuestMemoryError) as exc:
            self._pending_fault = f"vring {EVENTQ}: {_detached(exc)}"
            return False

    # -- teardown ---------------------------------------------------------------------

    def _signal_err(self, ring: _Ring) -> None:
        signal_eventfd(ring.err_fd)

    def _after_fault(self) -> None:
        """Carry out a fault recorded inside an ``except`` block (see the rules)."""
        reason = self._pending_fault
        if reason is None:
            return
        self._pending_fault = None
        self._stats.faults += 1
        self._faulted = reason
        log_event(self._log, "vf_fault", level=logging.WARNING, vf=self.index, reason=reason)
        self._drop_connection(report=False)
        for ring in list(self._rings.values()):
            self._forget_ring(ring)
        self._unmap()
        if self._vm is not None:
            self._report(VfEvent.FAULT, reason)

    def _drop_connection(self, *, report: bool) -> None:
        """The front end is gone: finish what is in flight, release its fds, unmap."""
        conn = self._conn
        if conn is None:
            return
        if self._pending_fault is None and self._faulted is None and self._saved is None:
            # used.idx == last_avail_idx for a reconnect (what is still executing after
            # the bound goes stale)
            self._wait_jobs(lambda: not self._executing, time.monotonic() + STOP_WAIT_S)
            self._answer_deferred()
            self._finish_in_flight(None)
        session, parser = self._session, self._parser
        self._conn = None
        self._session = None
        self._parser = None
        if parser is not None:
            close_fds(parser.held_fds())  # fds of a message the front end never finished
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn)
        conn.close()
        if session is not None:
            for action in session.disconnected():
                if isinstance(action, CloseFds):
                    self._release_fds(action.fds)
        # The front end is gone (a restarted VM sets its rings up again): every ring and
        # the memory go, restored ones too.
        for ring in list(self._rings.values()):
            self._forget_ring(ring)
        self._setups.clear()
        self._features_known = False
        self._polling = False
        self._unmap()
        self._quiesced = False
        if report and self._connect_reported:
            self._report(VfEvent.FRONTEND_DISCONNECT, None)
        self._connect_reported = False

    def _forget_ring(self, ring: _Ring) -> None:
        self._make_stale(lambda key: key[0] == ring.index)
        for key in [k for k in self._deferred if k[0] == ring.index]:
            del self._deferred[key]
        for fd in (ring.kick_fd,):
            if fd is not None and fd in self._kicks:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(fd)
                del self._kicks[fd]
        close_fds(ring.owned)
        ring.owned = set()
        ring.vq = None
        self._rings.pop(ring.index, None)

    def _unmap(self) -> None:
        mem = self._memory
        if mem is None:
            return
        self._memory = None
        if self._holds(mem):
            # stale requests still move data through it: unmapped when they are done
            self._retired.append(mem)
            log_event(self._log, "vf_unmap_after_stale", vf=self.index,
                      stale=len(self._stale))
            return
        maps = mem.maps
        del mem
        unmap_all(maps, self._log, self.index)

    # -- concurrent IO (see the module rules) -----------------------------------------

    def _holds(self, mem: _Memory) -> bool:
        """Whether a request executing (or stale) uses views of ``mem``."""
        return any(job.memory is mem for jobs in (self._executing, self._stale)
                   for job in jobs.values())

    def _make_stale(self, which: Callable[[tuple[int, int]], bool]) -> None:
        """The executing requests ``which`` selects lose their ring: results dropped."""
        keys = [k for k in self._executing if which(k)]
        for key in keys:
            self._stale[key] = self._executing.pop(key)
        if keys:
            log_event(self._log, "vf_requests_stale", vf=self.index, count=len(keys),
                      stale=len(self._stale))

    def _submit(self, ring: _Ring, chain: DescriptorChain, memory: _Memory,
                start: int) -> None:
        """Decode a command chain here, execute it on an IO thread (or answer it at
        once: BAD_TARGET)."""
        pool, vq = self._pool, ring.vq
        assert pool is not None and vq is not None
        request = parse_command(chain, memory.memory, self._settings)
        number = request.target
        target = self._targets.get(TargetId(number)) if number is not None else None
        if target is None:
            outcome = answer_command(chain, memory.memory, self._settings, request,
                                     int(VirtioScsiResponse.BAD_TARGET))
            vq.push_used(chain.head, outcome.written)
            self._stats.record_command(outcome, time.perf_counter_ns() - start)
            return
        job = _Job(ring.index, chain, request, target,
                   segment_views(memory.memory, request.data_out),
                   segment_views(memory.memory, request.data_in), memory, start)
        self._executing[job.key] = job
        pool.submit(lambda: self._execute(job))

    def _execute(self, job: _Job) -> None:
        """On an IO thread: the SCSI execution, then the result back to the VF thread."""
        try:
            size = sum(v.nbytes for v in job.data_out) + sum(v.nbytes for v in job.data_in)
            with BULK_GATE.transfer(size, self.index):  # VFs take turns at bulk transfers
                job.result = job.target.execute_lun_bytes(
                    job.request.lun8, job.request.header.cdb, job.data_out, job.data_in)
        except Exception as exc:  # a bug (the SCSI core answers every failure itself)
            log_event(self._log, "vf_internal_error", level=logging.ERROR, vf=self.index,
                      exc_info=exc)
            job.error = f"{type(exc).__name__}: {exc}"
        self._done.put(job)
        signal_eventfd(self._done_fd)

    def _reap(self, first: _Job | None = None) -> int:
        """Complete the finished requests (``first`` and whatever else is there):
        response header, used element, one notification per ring; stale ones are
        dropped. Returns how many were completed."""
        touched: dict[int, _Ring] = {}
        completed = 0
        job = first
        while True:
            if job is None:
                try:
                    job = self._done.get_nowait()
                except queue.Empty:
                    break
            ring = self._finish_job(job)
            job = None
            if ring is not None:
                touched[ring.index] = ring
                completed += 1
        self._release_retired()
        for ring in touched.values():
            vq = ring.vq
            if vq is None:
                continue
            try:
                if vq.should_notify() and signal_eventfd(ring.call_fd):
                    self._stats.notifications += 1
            except VirtqueueError as exc:
                self._pending_fault = f"vring {ring.index}: {_detached(exc)}"
                self._signal_err(ring)
        return completed

    def _finish_job(self, job: _Job) -> _Ring | None:
        key = job.key
        job.release()
        if self._executing.get(key) is not job:
            if self._stale.get(key) is job:
                del self._stale[key]
                if not self._stale:
                    log_event(self._log, "vf_stale_done", vf=self.index)
            return None
        del self._executing[key]
        ring = self._rings.get(job.ring)
        memory = self._memory
        if ring is None or ring.vq is None or memory is None:
            return None  # unreachable: a ring that goes makes its requests stale first
        if job.error is not None:
            self._pending_fault = f"internal error on an IO thread ({job.error})"
            return None
        assert job.result is not None
        try:
            outcome = complete_command(job.chain, memory.memory, self._settings, job.request,
                                       job.result)
            ring.vq.push_used(key[1], outcome.written)
        except (VirtqueueError, GuestMemoryError) as exc:
            self._pending_fault = f"vring {ring.index}: {_detached(exc)}"
            self._signal_err(ring)
            return None
        self._stats.record_command(outcome, time.perf_counter_ns() - job.start_ns)
        return ring

    def _wait_jobs(self, done: Callable[[], bool], deadline: float) -> bool:
        """Complete finished requests until ``done()`` or the deadline; ``done()``."""
        while True:
            self._reap()
            if done():
                return True
            left = deadline - time.monotonic()
            if left <= 0 or not (self._executing or self._stale):
                return done()
            try:
                job = self._done.get(timeout=min(left, 0.1))
            except queue.Empty:
                continue
            self._reap(job)

    def _answer_deferred(self) -> None:
        """Answer the control requests that waited for the executing commands."""
        if self._executing or not self._deferred:
            return
        memory = self._memory
        waiting = sorted(self._deferred.items())
        self._deferred.clear()
        if memory is None:
            return
        for (index, head), chain in waiting:
            ring = self._rings.get(index)
            if ring is None or ring.vq is None:
                continue
            try:
                control = execute_control(chain, memory.memory, self._targets)
                ring.vq.push_used(head, control.written)
                self._stats.record_control(control)
                if ring.vq.should_notify():
                    signal_eventfd(ring.call_fd)
            except (VirtqueueError, RequestFault, GuestMemoryError) as exc:
                self._pending_fault = f"vring {index}: {_detached(exc)}"
                self._signal_err(ring)
                return

    def _release_retired(self) -> None:
        if self._retired:
            free = self._split_retired()
            if free:
                unmap_all(free, self._log, self.index)

    def _split_retired(self) -> list[SharedMemory]:
        """The maps of retired memory no request uses any more (dropped from the list;
        no reference to them is left in this frame when it returns)."""
        keep: list[_Memory] = []
        free: list[SharedMemory] = []
        for mem in self._retired:
            if self._holds(mem):
                keep.append(mem)
            else:
                free.extend(mem.maps)
        self._retired = keep
        return free


def _detached(exc: BaseException) -> BaseException:
    """``exc`` without its traceback (nor its causes'): a broken Virtqueue keeps the
    error that broke it, and a traceback would keep frames holding views of guest
    memory alive in a cycle, so the memory could not be unmapped when the VF faults."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        cur.__traceback__ = None
        cur = cur.__cause__ or cur.__context__
    return exc


def _replace_setup(setup: VringSetup, **changes: Any) -> VringSetup:
    return replace(setup, **changes)
