"""One VF's data path as the PF sees it: the :class:`~vfdirect.core.adapter.VfDataPath`
the model calls, in front of the VF thread.

Rules of this module:

* the model calls these hooks under the admin lock, from the PF's worker thread; each
  is posted to the VF thread and waited for with a bounded timeout (a VF thread that
  does not answer is ``TIMEOUT``, never a hung PF);
* the VF thread exists while the VF is assigned to a VM: :meth:`VfDevice.configure`
  starts it (binding the VF's socket at the path ``vf_assign`` announces, so the socket
  exists when the reply reaches the hypervisor) and stops it when the VF loses its VM;
* the SCSI targets are built here, on the caller's thread, from the record's mapping
  and the bound vport's login (:func:`~vfdirect.core.adapter.build_targets`, every LUN
  behind the fabric guard of that port name), and rebuilt only when the mapping
  generation or the port name changes;
* ``epoch`` counts assignments and resets; an event the VF thread reports carries the
  epoch it was reported in, and is dropped if a reset or a new assignment came first
  (checked under the admin lock), so a late FAULT never lands on a VF that was reset.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from vfdirect.adapter.log import log_event
from vfdirect.adapter.platform import HostPlatform
from vfdirect.adapter.vf.fds import bind_stream
from vfdirect.adapter.vf.worker import POLL_BUDGET_NS, VfWorker
from vfdirect.core.adapter.platform import DrainResult, SavedQueueState
from vfdirect.core.adapter.scsi_view import build_targets
from vfdirect.core.adapter.vf import VfEvent, VfRecord, VmRef
from vfdirect.core.adapter.vf_stats import VfStats
from vfdirect.core.adapter.vscsi import VscsiSettings
from vfdirect.core.ids import TargetId, VfIndex
from vfdirect.core.rpc import ErrorCode, RpcError
from vfdirect.core.scsi import Target
from vfdirect.core.wwn import Wwn

#: Longest wait for the VF thread to carry out a request of the PF.
CALL_TIMEOUT_S = 5.0
#: Longest wait for a VF thread to stop.
JOIN_TIMEOUT_S = 5.0

T = TypeVar("T")
#: (vf, event, reason, epoch) -> None; must not block
EventSink = Callable[[int, VfEvent, "str | None", int], None]


class VfDevice:
    """VF ``index``: the PF's hooks, its statistics, and its thread while assigned."""

    def __init__(self, index: int, *, platform: HostPlatform, settings: VscsiSettings,
                 events: EventSink, logger: logging.Logger,
                 poll_budget_ns: int = POLL_BUDGET_NS,
                 call_timeout: float = CALL_TIMEOUT_S, io_threads: int = 0) -> None:
        self.index = index
        self._platform = platform
        self._settings = settings
        self._events = events
        self._log = logger
        self._poll_budget = poll_budget_ns
        self._timeout = call_timeout
        self._io_threads = io_threads
        self._lock = threading.Lock()
        self._worker: VfWorker | None = None
        self._vm: VmRef | None = None
        self._stats = VfStats()
        self._targets_key: tuple[int, Wwn | None] | None = None
        self._targets: Mapping[TargetId, Target] = {}
        #: bumped by every assignment change and reset (see the rules)
        self.epoch = 0

    # -- VfDataPath -------------------------------------------------------------------

    def configure(self, vf: VfRecord, initiator: Wwn | None) -> None:
        if vf.vm != self._vm:
            self.epoch += 1
            self._vm = vf.vm
        if vf.vm is None:
            self._targets_key = None
            self._targets = {}
            self._stop_worker()
            return
        targets = self._build_targets(vf, initiator)
        worker = self._ensure_worker()
        if worker is None:
            return
        try:
            worker.call(lambda w: w.apply_config(vf, initiator, targets), self._timeout)
        except RpcError as exc:
            # The snapshot stays queued: the thread applies it when it gets to it.
            log_event(self._log, "vf_configure_late", level=logging.WARNING, vf=self.index,
                      error=exc.message)

    def outstanding(self) -> int:
        worker = self._worker
        return 0 if worker is None else worker.outstanding

    def quiesce(self) -> int:
        return self._call(lambda w: w.quiesce())

    def drain(self, timeout_ms: int) -> DrainResult:
        return self._call(lambda w: w.drain(timeout_ms), self._timeout + timeout_ms / 1000)

    def save(self) -> SavedQueueState:
        return self._call(lambda w: w.save())

    def restore(self, record: Mapping[str, Any], fds: Sequence[int]) -> None:
        self._call(lambda w: w.restore(record, fds))

    def resume(self) -> None:
        self._call(lambda w: w.resume())

    def reset(self) -> None:
        self.epoch += 1
        worker = self._worker
        if worker is None:
            self._stats.clear()
            return
        try:
            worker.call(lambda w: w.reset(), self._timeout)
        except RpcError as exc:
            log_event(self._log, "vf_reset_late", level=logging.WARNING, vf=self.index,
                      error=exc.message)

    def stats(self) -> Mapping[str, Any]:
        worker = self._worker
        return {**self._stats.snapshot(),
                "thread_id": None if worker is None else worker.native_id,
                "front_end_pid": None if worker is None else worker.front_end_pid,
                "fault": None if worker is None else worker.fault,
                **({} if (auditor := self._platform.auditor) is None else
                   {"audit": auditor.vf_snapshot(self.index)})}

    # -- lifecycle --------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the VF thread (adapter shutdown)."""
        self.epoch += 1
        self._stop_worker()

    @property
    def socket_path(self) -> Path:
        return Path(self._platform.vf_socket_path(VfIndex(self.index)))

    # -- internals --------------------------------------------------------------------

    def _call(self, fn: Callable[[VfWorker], T], timeout: float | None = None) -> T:
        worker = self._worker
        if worker is None:
            raise RpcError(ErrorCode.WRONG_STATE,
                           f"VF {self.index} has no data path thread (not assigned)")
        return worker.call(fn, self._timeout if timeout is None else timeout)

    def _report(self, event: VfEvent, reason: str | None) -> None:
        self._events(self.index, event, reason, self.epoch)

    def _ensure_worker(self) -> VfWorker | None:
        with self._lock:
            worker = self._worker
            if worker is not None and worker.alive:
                return worker
            path = self.socket_path
            try:
                listener, inode = bind_stream(path)
            except OSError as exc:
                reason = f"cannot bind the VF socket {path}: {exc}"
                log_event(self._log, "vf_socket_failed", level=logging.ERROR, vf=self.index,
                          error=reason)
                self._report(VfEvent.FAULT, reason)
                return None
            worker = VfWorker(self.index, listener=listener, socket_path=path,
                              socket_inode=inode, settings=self._settings, stats=self._stats,
                              report=self._report, logger=self._log,
                              poll_budget_ns=self._poll_budget,
                              io_threads=self._io_threads, auditor=self._platform.auditor)
            worker.start()
            self._worker = worker
            log_event(self._log, "vf_listen", vf=self.index, socket=str(path),
                      vm=None if self._vm is None else self._vm.name,
                      pid=None if self._vm is None else self._vm.pid)
            return worker

    def _stop_worker(self) -> None:
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is None:
            return
        if worker.alive:
            with contextlib.suppress(RpcError):
                worker.call(lambda w: w.stop(), self._timeout)
        if not worker.join(JOIN_TIMEOUT_S):
            log_event(self._log, "vf_thread_stuck", level=logging.ERROR, vf=self.index)

    def _build_targets(self, vf: VfRecord, initiator: Wwn | None) -> Mapping[TargetId, Target]:
        key = (vf.mapping_generation, initiator)
        if key == self._targets_key:
            return self._targets
        targets: Mapping[TargetId, Target] = {}
        if vf.mapping is not None and initiator is not None:
            try:
                auditor = self._platform.auditor
                scope = None if auditor is None else auditor.scope(self.index, (vf.mapping,))
                targets = build_targets(
                    vf.mapping,
                    lambda e: self._platform.block_device(initiator, e.layout, audit=scope),
                    on_internal_error=self._scsi_bug)
            except RpcError as exc:
                log_event(self._log, "vf_targets_failed", level=logging.ERROR, vf=self.index,
                          error=exc.message)
                return {}  # not cached: the next snapshot tries again
        self._targets_key = key
        self._targets = targets
        return targets

    def _scsi_bug(self, exc: BaseException) -> None:
        log_event(self._log, "vf_scsi_internal_error", level=logging.ERROR, vf=self.index,
                  exc_info=exc)
