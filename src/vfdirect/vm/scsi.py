"""The VM's SCSI host (shell): the pure virtio-scsi driver plus its vhost-user front end,
the clock, and the wait loop.

* :meth:`ScsiHost.submit` queues a command with a completion callback; the kick is sent
  only when the driver says the device asked for one (VIRTIO 1.x 2.7.10, EVENT_IDX);
* :meth:`ScsiHost.poll` reaps completions and runs their callbacks. When nothing is
  there it first **busy-polls** the used rings for ``spin_s`` (waking a process on the
  other core costs tens of microseconds, more than a fast VF needs to answer), and only
  then sleeps on the call eventfds, never past the next command deadline;
* every poll round also expires commands past their deadline (the driver posts ABORT
  TASK) and hands device events to ``on_event``;
* when the back end drops the connection, :attr:`ScsiHost.reconnect` (if set) connects
  again; the vrings resume at ``used.idx`` and the commands still published are served;
* completions of commands submitted by a killed earlier process (``recovered``) have no
  callback here: they go to ``on_orphan`` (the workload resolves them with its journal).
  Every completion's tag is released after its callback ran;
* the worst IO stall (:class:`~vfdirect.core.guest.stall.StallMeter`): every reap that
  completes something stores the wall-clock time in the guest's stall clock (guest
  memory, so the next process on this memory measures the stall across a restart and
  logs it as ``vm_stall``);
* :attr:`ScsiHost.safe_point` runs at the top of every poll round: no store into guest
  memory is under way there (every store, and its dirty-log marks, happens inside a
  driver, journal or header call that has returned), so the VM process may stop itself
  there for a migration's stop-and-copy (``vm-run``: SIGUSR2).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from vfdirect.core.guest.stall import StallMeter
from vfdirect.core.guest.virtscsi import AbortOutcome, Completion, ScsiEvent
from vfdirect.core.virtio.scsi import TaskAttribute
from vfdirect.vm.frontend import Disconnected, VhostUserFrontend
from vfdirect.vm.guest import Guest
from vfdirect.vm.log import log_event

__all__ = ["DEFAULT_SPIN_S", "ScsiHost"]

#: Busy-poll window before sleeping. A cross-core wake-up costs ~28 us on this host, and
#: the VF (Python on both sides) answers a 512-byte read in ~200-400 us: measured over
#: 300 synchronous reads, a 50 us window caught almost none (every read slept), 200 us
#: caught ~95% and cut the mean latency by ~60%, 1 ms left no sleep at all.
DEFAULT_SPIN_S = 200e-6

Callback = Callable[[Completion], None]


class ScsiHost:
    """Commands in, completions out, over one VF."""

    def __init__(self, guest: Guest, frontend: VhostUserFrontend, *,
                 clock: Callable[[], float] = time.monotonic, spin_s: float = DEFAULT_SPIN_S,
                 command_timeout: float | None = None,
                 logger: logging.Logger | None = None,
                 wall_clock: Callable[[], int] = time.time_ns) -> None:
        self.guest = guest
        self.driver = guest.driver
        self.frontend = frontend
        self._clock = clock
        self.spin_s = spin_s
        if command_timeout is not None:
            self.driver.command_timeout = command_timeout
        self._callbacks: dict[int, Callback] = {}
        self._log = logger or logging.getLogger("vfdirect.vm")
        self.on_orphan: Callback = self._default_orphan
        self.on_event: Callable[[list[ScsiEvent]], None] = lambda events: None
        self.on_abort: Callable[[AbortOutcome], None] = lambda outcome: None
        #: Called when the back end dropped the connection (None: the error propagates).
        #: It reconnects (the front end's reconnect rule resumes every vring at used.idx)
        #: or raises.
        self.reconnect: Callable[[], None] | None = None
        #: Called where the VM may stop (no store in progress): see the module.
        self.safe_point: Callable[[], None] = lambda: None
        self.completed = 0
        #: completions of commands an earlier process submitted (``recovered``)
        self.orphans = 0
        self.reconnects = 0
        self._wall = wall_clock
        #: the worst IO stall; its first gap starts at the stall clock found in memory
        self.stall = StallMeter(guest.last_completion_ns())

    def max_stall_ms(self) -> float:
        """The longest gap with IO outstanding and nothing completed, the open one
        included (ms)."""
        worst = self.stall.worst_ns(self._wall() if self.driver.outstanding else None)
        return round(worst / 1e6, 3)

    def stall_report(self) -> dict[str, float | None]:
        return {"max_stall_ms": self.max_stall_ms(),
                "restart_stall_ms": StallMeter.ms(self.stall.restart_stall_ns)}

    @property
    def outstanding(self) -> int:
        return len(self._callbacks)

    @property
    def free_tags(self) -> int:
        return self.driver.free_tags

    def submit(self, target: int, lun: int, cdb: bytes, callback: Callback, *,
               data_out: bytes | memoryview = b"", data_in: int = 0, cookie: int = 0,
               task_attr: int = TaskAttribute.SIMPLE, kick: bool = True) -> int:
        """Queue one command; ``callback(completion)`` runs from :meth:`poll`. Raises
        ``QueueFullError`` (TagsExhausted included) when the guest is at its depth."""
        before = self.driver.outstanding
        tag = self.driver.submit(target, lun, cdb, data_out=data_out, data_in=data_in,
                                 cookie=cookie, task_attr=task_attr, now=self._clock())
        if before == 0:
            self.stall.submitted(self._wall(), before)
        self._callbacks[tag] = callback
        if kick:
            self.flush_kicks()
        return tag

    def flush_kicks(self) -> None:
        kicks = self.driver.take_kicks()
        if kicks:
            self.frontend.kick(kicks)

    # -- completions ----------------------------------------------------------------------

    def _reap(self) -> int:
        completions = self.driver.poll()
        if completions:
            self._completed_at(self._wall())
        failed: Exception | None = None
        for completion in completions:
            callback = self._callbacks.pop(completion.tag, None)
            try:
                if callback is None:
                    self.orphans += 1
                    self.on_orphan(completion)
                else:
                    callback(completion)
            except Exception as exc:  # deliver the others first, then raise the first
                failed = failed or exc
            finally:
                self.driver.release(completion.tag)
        self.completed += len(completions)
        if failed is not None:
            raise failed
        events = self.driver.take_events()
        if events:
            self.on_event(events)
        for outcome in self.driver.take_aborts():
            log_event(self._log, "abort_task_done", level=logging.WARNING,
                      tag=outcome.tag, cookie=outcome.cookie, response=outcome.response)
            self.on_abort(outcome)
        self.flush_kicks()  # event buffers re-posted
        return len(completions)

    def _completed_at(self, now_ns: int) -> None:
        across = self.stall.completed(now_ns, self.driver.outstanding)
        self.guest.set_last_completion_ns(now_ns)
        if across is not None:
            log_event(self._log, "vm_stall", stall_ms=StallMeter.ms(across),
                      boot_count=self.guest.boot_count,
                      last_completion_before_ns=now_ns - across, first_completion_ns=now_ns,
                      note="the IO stall across the restart of the VM process")

    def _expire(self) -> None:
        aborted = self.driver.expire(self._clock())
        for tag in aborted:
            log_event(self._log, "command_timeout", level=logging.WARNING, tag=tag,
                      action="ABORT TASK posted")
        if aborted:
            self.flush_kicks()

    def poll(self, timeout: float = 0.0) -> int:
        """Reap and run callbacks; wait up to ``timeout`` seconds for a first completion
        (busy-poll, then sleep). Returns the number of completions handled."""
        self.safe_point()
        self._expire()
        done = self._reap()
        if done or timeout <= 0:
            return done
        clock = self._clock
        start = clock()
        end = start + timeout
        spin_end = start + min(self.spin_s, timeout)
        driver = self.driver
        while clock() < spin_end:
            if driver.pending_used():
                return self._reap()
        while True:
            now = clock()
            if now >= end:
                return self._reap()
            self.frontend.drain_calls()
            # Re-check after draining: a notification consumed above is not lost.
            if driver.pending_used():
                return self._reap()
            self.safe_point()
            deadline = driver.next_deadline()
            wait = end - now if deadline is None else max(0.0, min(end, deadline) - now)
            try:
                self.frontend.wait(wait)
            except Disconnected:
                if self.reconnect is None:
                    raise
                log_event(self._log, "vf_disconnected", level=logging.WARNING,
                          outstanding=self.outstanding)
                self.reconnect()
                self.reconnects += 1
                log_event(self._log, "vf_reconnected", bases=self.frontend.bases)
            self._expire()
            done = self._reap()
            if done:
                return done

    def _default_orphan(self, completion: Completion) -> None:
        log_event(self._log, "orphan_completion", tag=completion.tag,
                  cookie=hex(completion.cookie), response=completion.response,
                  status=completion.status)
