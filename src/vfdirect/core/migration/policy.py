"""When to stop pre-copy: the convergence policy (pure).

After each pre-copy round the caller reports the round's number (from 1) and how many pages
are dirty now (what the next round, or stop-and-copy, would have to send).
:meth:`PrecopyPolicy.next_step` answers ``"another_round"`` or ``"stop_and_copy"``; the
rules, first match wins:

1. before ``min_rounds`` rounds are done: another round;
2. nothing dirty: stop (``converged``);
3. the estimated time to send the dirty set, ``dirty_pages * page_size / bandwidth``, is
   within ``safety`` (default 0.5) of the downtime budget ``max_downtime_ms``: stop
   (``converged``); an unknown bandwidth (0) never converges this way;
4. ``max_rounds`` rounds done: stop (``max_rounds``);
5. the dirty set has not shrunk below its smallest size so far for ``stall_rounds``
   (default 3) rounds in a row: stop (``not_converging``), since more rounds only
   resend the pages the guest keeps writing;
6. otherwise another round (``continuing``).

:attr:`PrecopyPolicy.reason` and :attr:`PrecopyPolicy.estimate_ms` say why and by how much
the last decision went, for the migration report and logs.
"""

from __future__ import annotations

import math
from enum import StrEnum

__all__ = ["PrecopyPolicy", "Step"]


class Step(StrEnum):
    ANOTHER_ROUND = "another_round"
    STOP_AND_COPY = "stop_and_copy"


def _int(value: int, name: str, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


class PrecopyPolicy:
    """The convergence rules of the module docstring, for one migration (it remembers the
    dirty-set sizes seen, so rounds must be reported in order: 1, 2, 3, ...)."""

    def __init__(self, max_downtime_ms: float, max_rounds: int = 30, min_rounds: int = 1,
                 *, safety: float = 0.5, stall_rounds: int = 3) -> None:
        if (isinstance(max_downtime_ms, bool) or not isinstance(max_downtime_ms, int | float)
                or not math.isfinite(max_downtime_ms) or max_downtime_ms <= 0):
            raise ValueError(f"max_downtime_ms must be a positive number, "
                             f"got {max_downtime_ms!r}")
        if not 0 < safety <= 1:
            raise ValueError(f"safety must be in (0, 1], got {safety!r}")
        self.max_downtime_ms = float(max_downtime_ms)
        self.min_rounds = _int(min_rounds, "min_rounds", 0)
        self.max_rounds = _int(max_rounds, "max_rounds", max(self.min_rounds, 1))
        self.safety = safety
        self.stall_rounds = _int(stall_rounds, "stall_rounds", 1)
        self.last_round = 0
        self.smallest: int | None = None
        self.stalled = 0
        self.reason = ""
        self.estimate_ms: float | None = None

    @staticmethod
    def send_time_ms(dirty_pages: int, page_size: int, bandwidth_bytes_per_s: float
                     ) -> float:
        """Milliseconds to send ``dirty_pages`` at ``bandwidth_bytes_per_s`` (infinite if
        the bandwidth is not known, i.e. 0, and something is dirty)."""
        if dirty_pages == 0:
            return 0.0
        if bandwidth_bytes_per_s <= 0:
            return math.inf
        return dirty_pages * page_size * 1000.0 / bandwidth_bytes_per_s

    @property
    def budget_ms(self) -> float:
        """The send time below which pre-copy has converged."""
        return self.max_downtime_ms * self.safety

    def next_step(self, round_no: int, dirty_pages: int, page_size: int,
                  bandwidth_bytes_per_s: float) -> Step:
        _int(round_no, "round_no", 1)
        if round_no != self.last_round + 1:
            raise ValueError(f"round {round_no} reported after round {self.last_round}")
        _int(dirty_pages, "dirty_pages", 0)
        _int(page_size, "page_size", 1)
        if (isinstance(bandwidth_bytes_per_s, bool)
                or not isinstance(bandwidth_bytes_per_s, int | float)
                or not bandwidth_bytes_per_s >= 0):
            raise ValueError(f"bandwidth_bytes_per_s must be a number >= 0, "
                             f"got {bandwidth_bytes_per_s!r}")
        self.last_round = round_no
        if self.smallest is None or dirty_pages < self.smallest:
            self.smallest, self.stalled = dirty_pages, 0
        else:
            self.stalled += 1
        self.estimate_ms = self.send_time_ms(dirty_pages, page_size, bandwidth_bytes_per_s)
        if round_no < self.min_rounds:
            return self._answer(Step.ANOTHER_ROUND, "min_rounds")
        if self.estimate_ms <= self.budget_ms:
            return self._answer(Step.STOP_AND_COPY, "converged")
        if round_no >= self.max_rounds:
            return self._answer(Step.STOP_AND_COPY, "max_rounds")
        if self.stalled >= self.stall_rounds:
            return self._answer(Step.STOP_AND_COPY, "not_converging")
        return self._answer(Step.ANOTHER_ROUND, "continuing")

    def _answer(self, step: Step, reason: str) -> Step:
        self.reason = reason
        return step
