"""The worst IO stall the guest sees (pure: the shell passes wall-clock nanoseconds).

A stall is a gap during which IO was outstanding and nothing completed: it starts at the
later of the last completion and the moment IO became outstanding (a submission with
nothing in flight) and ends at the next completion. Times are wall clock
(``time.time_ns()``) so that a gap can span two VM processes: the time of the last
completion is kept in guest memory (the stall clock of the guest header, see
:mod:`vfdirect.core.guest.layout`) and a process started on that memory (``--restart``,
a migration's destination) starts its first gap there: its first completion measures
the stall across the restart (:attr:`StallMeter.restart_stall_ns`). That assumes the
stopped process had IO outstanding when it stopped (the verify and load workloads
always do); a VM idle before its stop reports its idle time as well.
"""

from __future__ import annotations

__all__ = ["StallMeter"]


class StallMeter:
    """Tracks the longest completion gap with IO outstanding."""

    __slots__ = ("_gap_start", "_pending_restart", "last_ns", "max_ns", "restart_stall_ns")

    def __init__(self, resumed_from_ns: int = 0) -> None:
        #: the longest gap seen (ns)
        self.max_ns = 0
        #: the gap across the restart, once the first completion after it came
        self.restart_stall_ns: int | None = None
        #: wall-clock ns of the last completion (0: none)
        self.last_ns = max(0, resumed_from_ns)
        self._pending_restart = resumed_from_ns > 0
        self._gap_start: int | None = resumed_from_ns if resumed_from_ns > 0 else None

    def submitted(self, now_ns: int, outstanding_before: int) -> None:
        """A command was submitted while ``outstanding_before`` were in flight."""
        if outstanding_before <= 0 and self._gap_start is None:
            self._gap_start = now_ns

    def completed(self, now_ns: int, outstanding_after: int) -> int | None:
        """Completions were reaped at ``now_ns``; ``outstanding_after`` are still in
        flight. Returns the stall across the restart when this is the first completion
        after one, else ``None``."""
        gap = 0 if self._gap_start is None else max(0, now_ns - self._gap_start)
        self.max_ns = max(self.max_ns, gap)
        across: int | None = None
        if self._pending_restart:
            self._pending_restart = False
            self.restart_stall_ns = across = gap
        self.last_ns = now_ns
        self._gap_start = now_ns if outstanding_after > 0 else None
        return across

    def worst_ns(self, now_ns: int | None = None) -> int:
        """The longest gap so far, the open one included when ``now_ns`` is given."""
        if now_ns is None or self._gap_start is None:
            return self.max_ns
        return max(self.max_ns, now_ns - self._gap_start)

    @staticmethod
    def ms(ns: int | None) -> float | None:
        return None if ns is None else round(ns / 1e6, 3)
