"""Sharing the adapter between its VFs (issue 8, exhaustion): one VF's flood must not
stretch another VF's latency.

Every VF has its own thread (and, with ``--io-threads``, its own IO threads), all in one
Python process. Two things decide who runs, and both let a busy VF starve a light one:

* the interpreter lock. A VF thread decoding a long chain (126 segments: ~1-2 ms of
  Python) or a batch of them holds it; another VF thread that needs it waits until the
  holder makes a system call, or for the switch interval, 5 ms by default. Each of the
  light VF's requests needs the lock several times, so a flooding neighbour adds
  milliseconds to its latency. :data:`SWITCH_INTERVAL_S` (set by the VF manager while
  it runs) bounds each such wait to 0.5 ms: VF threads take turns at that quantum;
* the CPUs. Moving a large transfer between a LUN and guest memory is a memory copy in
  the kernel that keeps a CPU busy for milliseconds (32 MiB: ~10 ms). A VF with N IO
  threads moving the largest requests occupies N CPUs, whatever the other VFs need.
  :class:`BulkGate` lets at most ``lanes`` (half the CPUs, at least one) bulk
  transfers (:data:`BULK_BYTES` or more) move at once in the whole adapter, in arrival
  order, so that VFs with bulk work take turns; small transfers never wait. While
  another VF does small (latency-bound) IO, each bulk transfer is followed by a pause
  as long as itself (:data:`PAUSE_RATIO`): the bulk movers leave at least half of
  their CPU time to the others (a per-VF budget, not a priority: with nobody else
  active, bulk transfers run back to back);
* a VF thread's own work: decoding a batch of long chains (and, without IO threads,
  executing them) costs milliseconds of CPU per polling round. A round that cost more
  than :data:`ROUND_BUDGET_NS` of the thread's CPU time, while another VF does small
  IO, is followed by the same pause (:meth:`BulkGate.after_round`);
* the kernel's scheduler. Pausing alone leaves the latency-bound VF competing for a CPU
  with the copies that do run: its thread and its VM's poller wait a time slice behind
  them. A bulk transfer therefore runs with its thread at nice :data:`BULK_NICE` (a
  Linux thread's own priority, ``setpriority`` on its thread id) and gets its priority
  back after: the scheduler then prefers any thread serving small IO. Only where the
  adapter may lower a nice value again (root) does it raise one.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: The interpreter's switch interval while the VFs run (see the module text).
SWITCH_INTERVAL_S = 0.0005
#: Transfers of at least this many bytes go through the :class:`BulkGate`.
BULK_BYTES = 256 * 1024
#: The nice value of a thread while it moves a bulk transfer (0: not reniced).
BULK_NICE = 19
#: While another VF does small IO, a bulk transfer is followed by a pause this many
#: times its duration (bulk movers get at most half of their lanes), ...
PAUSE_RATIO = 1.0
#: ... when that VF's last small transfer is this recent, ...
RECENT_NS = 50_000_000
#: ... and never longer than this.
MAX_PAUSE_NS = 50_000_000
#: A VF thread's polling round costing more CPU than this is paused likewise.
ROUND_BUDGET_NS = 1_000_000


def bulk_lanes(cpus: int | None) -> int:
    """Bulk transfers allowed at once on a machine with ``cpus`` CPUs: half of them
    (at least one), the other half stays for everything else."""
    return max(1, (cpus or 1) // 2)


class BulkGate:
    """At most ``lanes`` bulk transfers at once, waiting ones served first come, first
    served (:class:`threading.Semaphore` wakes its waiters in order). While another VF
    did a small transfer in the last ``recent_ns``, a bulk transfer keeps its lane for a
    pause of ``pause_ratio`` times its own duration (at most ``max_pause_ns``) before it
    lets the next one go: bulk movers then get at most ``1 / (1 + pause_ratio)`` of their
    lanes, and the CPU they leave serves the latency-bound VFs. With no such VF, bulk
    transfers run back to back."""

    def __init__(self, lanes: int, threshold: int = BULK_BYTES, *,
                 pause_ratio: float = PAUSE_RATIO, recent_ns: int = RECENT_NS,
                 max_pause_ns: int = MAX_PAUSE_NS, round_budget_ns: int = ROUND_BUDGET_NS,
                 clock: Callable[[], int] = time.monotonic_ns,
                 sleep: Callable[[float], None] = time.sleep,
                 bulk_nice: int | None = None) -> None:
        """``bulk_nice``: the nice value of a thread during a bulk transfer (default
        :data:`BULK_NICE` when this process may lower it back, i.e. as root; else 0)."""
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, not {lanes}")
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, not {threshold}")
        if pause_ratio < 0:
            raise ValueError(f"pause_ratio must be >= 0, not {pause_ratio}")
        self.lanes = lanes
        self.threshold = threshold
        self.pause_ratio = pause_ratio
        self.recent_ns = recent_ns
        self.max_pause_ns = max_pause_ns
        self.round_budget_ns = round_budget_ns
        self._clock = clock
        self._sleep = sleep
        if bulk_nice is None:
            bulk_nice = BULK_NICE if os.geteuid() == 0 else 0
        self.bulk_nice = bulk_nice
        self._sem = threading.Semaphore(lanes)
        self._lock = threading.Lock()
        #: when each VF last did a small transfer (a single store per transfer)
        self._small: dict[int, int] = {}
        #: bulk transfers let through, how many waited for a lane, pauses made
        self.bulk = 0
        self.waited = 0
        self.pauses = 0
        self.paused_ns = 0

    def after_round(self, vf: int, cost_ns: int) -> None:
        """A VF thread's polling round cost ``cost_ns`` of CPU: past the round budget
        (:data:`ROUND_BUDGET_NS`), while another VF does small IO, the thread pauses
        ``pause_ratio`` times that cost (decoding long chains is CPU the other VFs
        need as much as the data copies)."""
        if cost_ns >= self.round_budget_ns:
            self._pause(vf, self._clock() - cost_ns)

    @contextmanager
    def transfer(self, nbytes: int, vf: int = -1, *, pause: bool = True) -> Iterator[None]:
        """Hold a lane for VF ``vf``'s transfer of ``nbytes`` (none when it is small);
        ``pause``: pause after a bulk one (a VF thread pauses after its whole round
        instead, :meth:`after_round`)."""
        if nbytes < self.threshold:
            self._small[vf] = self._clock()
            yield
            return
        waited = not self._sem.acquire(blocking=False)
        if waited:
            self._sem.acquire()
        with self._lock:
            self.bulk += 1
            self.waited += waited
        start = self._clock()
        restore = self._renice()
        try:
            yield
        finally:
            if restore is not None:
                self._set_nice(*restore)
            try:
                if pause:
                    self._pause(vf, start)
            finally:
                self._sem.release()

    def _renice(self) -> tuple[int, int] | None:
        """Lower this thread's priority for a bulk transfer; ``(tid, nice)`` to put
        back, or ``None`` when it was not changed."""
        if not self.bulk_nice:
            return None
        tid = threading.get_native_id()
        try:
            before = os.getpriority(os.PRIO_PROCESS, tid)
        except OSError:
            return None
        if before >= self.bulk_nice or not self._set_nice(tid, self.bulk_nice):
            return None
        return tid, before

    def _set_nice(self, tid: int, nice: int) -> bool:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:  # not allowed here (no privilege, a sandbox): stop trying
            self.bulk_nice = 0
            return False
        return True

    def _pause(self, vf: int, start: int) -> None:
        if not self.pause_ratio:
            return
        now = self._clock()
        if not any(other != vf and now - last < self.recent_ns
                   for other, last in list(self._small.items())):
            return
        pause = min(int((now - start) * self.pause_ratio), self.max_pause_ns)
        if pause <= 0:
            return
        with self._lock:
            self.pauses += 1
            self.paused_ns += pause
        self._sleep(pause / 1e9)


#: The adapter's gate (one adapter per process).
BULK_GATE = BulkGate(bulk_lanes(os.cpu_count()))
