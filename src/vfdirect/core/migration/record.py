"""The per-migration report: phase timings, IO counts, pre-copy rounds, outcome (claim X4).

Pure: every time is an ``int`` of nanoseconds the caller passes in (from its monotonic
clock); nothing here reads a clock.

Rules:

* a :class:`Phase` is entered at most once (:meth:`MigrationReport.enter`) and left at most
  once, not before it was entered (:meth:`MigrationReport.leave`); phases may overlap:
  ``mediated`` spans from the end of ``handoff`` to the end of ``stop_copy`` and so covers
  ``precopy``;
* a phase still open has no end (``end_ns`` None);
* the outcome starts ``running`` and is set once, by :meth:`MigrationReport.finish`, to
  ``committed``, ``aborted`` or ``failed``; ``aborted`` and ``failed`` need an ``error``
  saying why (a committed migration may carry one too: a cleanup that failed after the
  commit point);
* pre-copy rounds are numbered in increasing order from 0 (by default round 0 is the first
  pass over all of memory; :class:`PrecopyPolicy` counts the rounds after it from 1); only
  the last may be ``final``, the pass that sends the last dirty pages with the VM stopped;
* :meth:`MigrationReport.to_dict` gives a JSON-able object of format
  ``vfdirect.migration-report`` version 1 and :meth:`MigrationReport.from_dict` reads one
  back, refusing (with :class:`ReportError`, naming the field) anything that does not follow
  these rules, unknown keys included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "MigrationReport",
    "Outcome",
    "Phase",
    "PhaseSpan",
    "PrecopyRound",
    "ReportError",
]

REPORT_FORMAT = "vfdirect.migration-report"
REPORT_VERSION = 1


class Phase(StrEnum):
    PREPARE = "prepare"
    QUIESCE = "quiesce"
    DRAIN = "drain"
    HANDOFF = "handoff"
    MEDIATED = "mediated"
    PRECOPY = "precopy"
    STOP_COPY = "stop_copy"
    DESTINATION = "destination"
    COMMIT = "commit"
    ABORT = "abort"


class Outcome(StrEnum):
    RUNNING = "running"
    COMMITTED = "committed"
    ABORTED = "aborted"
    FAILED = "failed"


class ReportError(ValueError):
    """A report operation breaks the rules, or a report object is not a valid v1 report."""


@dataclass
class PhaseSpan:
    start_ns: int
    end_ns: int | None = None

    @property
    def duration_ns(self) -> int | None:
        return None if self.end_ns is None else self.end_ns - self.start_ns


@dataclass(frozen=True)
class PrecopyRound:
    """One pre-copy round: ``pages`` and ``bytes`` sent, ``dirty_pages`` found dirty when it
    ended (what the next round or stop-and-copy has to send), its ``duration_ns``;
    ``final`` for the stop-and-copy pass."""

    round: int
    pages: int
    bytes: int
    dirty_pages: int
    duration_ns: int
    final: bool = False

    def to_dict(self) -> dict[str, int | bool]:
        return {"round": self.round, "pages": self.pages, "bytes": self.bytes,
                "dirty_pages": self.dirty_pages, "duration_ns": self.duration_ns,
                "final": self.final}


def _count(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ReportError(f"{name}: expected a non-negative integer, got {value!r}")
    return value


def _opt_count(value: Any, name: str) -> int | None:
    return None if value is None else _count(value, name)


def _opt_ms(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0):
        raise ReportError(f"{name}: expected a non-negative number of milliseconds, "
                          f"got {value!r}")
    return float(value)


def _keys(obj: Any, name: str, required: set[str], optional: frozenset[str] = frozenset()
          ) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ReportError(f"{name}: expected an object, got {type(obj).__name__}")
    missing = required - obj.keys()
    if missing:
        raise ReportError(f"{name}: missing {', '.join(sorted(missing))}")
    unknown = obj.keys() - required - optional
    if unknown:
        raise ReportError(f"{name}: unknown keys {', '.join(sorted(map(str, unknown)))}")
    return obj


_ROUND_KEYS = {"round", "pages", "bytes", "dirty_pages", "duration_ns"}
_ROUND_OPTIONAL = frozenset({"final"})
_PHASE_KEYS = {"phase", "start_ns", "end_ns"}
_REPORT_KEYS = {"format", "version", "migration", "vm", "outcome", "error", "phases",
                "outstanding_at_quiesce", "drained", "handed_over_heads",
                "guest_in_flight_at_handoff",
                "precopy_rounds", "downtime_ns", "worst_stall_ms", "mediated_requests",
                "bytes_sent"}


@dataclass
class MigrationReport:
    """What one migration did. Counters:

    * ``outstanding_at_quiesce``: requests the VF still had in flight when it stopped
      fetching (None until known);
    * ``drained``: whether the drain finished before its deadline (None until it ended);
    * ``handed_over_heads``: descriptor heads handed to the mediated path unanswered;
    * ``guest_in_flight_at_handoff``: requests the guest had submitted and not yet seen
      answered when the queues were handed over (None until known);
    * ``precopy_rounds``: one :class:`PrecopyRound` per round, numbered from 1;
    * ``downtime_ns``: how long the VM was paused (None until known);
    * ``worst_stall_ms``: the longest IO stall the guest saw (None until reported);
    * ``mediated_requests``: requests the mediated path served;
    * ``bytes_sent``: stream bytes the source sent.
    """

    migration: str = ""
    vm: str = ""
    phases: dict[Phase, PhaseSpan] = field(default_factory=dict)
    outstanding_at_quiesce: int | None = None
    drained: bool | None = None
    handed_over_heads: int = 0
    guest_in_flight_at_handoff: int | None = None
    precopy_rounds: list[PrecopyRound] = field(default_factory=list)
    downtime_ns: int | None = None
    worst_stall_ms: float | None = None
    mediated_requests: int = 0
    bytes_sent: int = 0
    outcome: Outcome = Outcome.RUNNING
    error: str | None = None

    # -- phases --------------------------------------------------------------------

    def enter(self, phase: Phase | str, now_ns: int) -> None:
        phase = Phase(phase)
        _count(now_ns, f"{phase}: start time")
        if phase in self.phases:
            raise ReportError(f"phase {phase} was already entered")
        self.phases[phase] = PhaseSpan(now_ns)

    def leave(self, phase: Phase | str, now_ns: int) -> None:
        phase = Phase(phase)
        span = self.phases.get(phase)
        if span is None:
            raise ReportError(f"phase {phase} was never entered")
        if span.end_ns is not None:
            raise ReportError(f"phase {phase} was already left")
        if _count(now_ns, f"{phase}: end time") < span.start_ns:
            raise ReportError(f"phase {phase} cannot end at {now_ns} ns, before it "
                              f"started at {span.start_ns} ns")
        span.end_ns = now_ns

    def is_open(self, phase: Phase | str) -> bool:
        span = self.phases.get(Phase(phase))
        return span is not None and span.end_ns is None

    def duration_ns(self, phase: Phase | str) -> int | None:
        """The phase's duration; None if it never started or is still open."""
        span = self.phases.get(Phase(phase))
        return None if span is None else span.duration_ns

    # -- counters and outcome --------------------------------------------------------

    def add_round(self, *, pages: int, bytes: int, dirty_pages: int, duration_ns: int,
                  round: int | None = None, final: bool = False) -> PrecopyRound:
        """Record a pre-copy round; ``round`` defaults to one more than the last (0 for the
        first). ``bytes_sent`` is the caller's to keep (e.g. from
        :attr:`StreamEncoder.bytes_encoded`)."""
        last = self.precopy_rounds[-1] if self.precopy_rounds else None
        if last is not None and last.final:
            raise ReportError("no pre-copy round can follow the final one")
        number = (0 if last is None else last.round + 1) if round is None \
            else _count(round, "round")
        if last is not None and number <= last.round:
            raise ReportError(f"pre-copy round {number} after round {last.round}")
        entry = PrecopyRound(number, _count(pages, "pages"), _count(bytes, "bytes"),
                             _count(dirty_pages, "dirty_pages"),
                             _count(duration_ns, "duration_ns"), bool(final))
        self.precopy_rounds.append(entry)
        return entry

    def note_stall(self, stall_ms: float) -> None:
        """Keep the worst IO stall the guest reported."""
        value = _opt_ms(stall_ms, "stall")
        assert value is not None
        if self.worst_stall_ms is None or value > self.worst_stall_ms:
            self.worst_stall_ms = value

    def finish(self, outcome: Outcome | str, error: str | None = None) -> None:
        """Set the outcome, once; ``error`` (default: the ``error`` already set) is needed
        for ``aborted`` and ``failed``."""
        outcome = Outcome(outcome)
        error = self.error if error is None else error
        if self.outcome is not Outcome.RUNNING:
            raise ReportError(f"the migration already ended ({self.outcome})")
        self._check_outcome(outcome, error)
        self.outcome, self.error = outcome, error

    @staticmethod
    def _check_outcome(outcome: Outcome, error: str | None) -> None:
        if error is not None and not isinstance(error, str):
            raise ReportError(f"error: expected a string, got {error!r}")
        if outcome in (Outcome.ABORTED, Outcome.FAILED) and not error:
            raise ReportError(f"outcome {outcome} needs an error saying why")

    # -- views -----------------------------------------------------------------------

    def summary_rows(self, now_ns: int | None = None) -> list[tuple[str, float | None]]:
        """``(phase, duration in ms)`` for each phase entered, in :class:`Phase` order; an
        open phase is measured up to ``now_ns`` if given, else its duration is None."""
        rows: list[tuple[str, float | None]] = []
        for phase in Phase:
            span = self.phases.get(phase)
            if span is None:
                continue
            end = span.end_ns if span.end_ns is not None else now_ns
            rows.append((phase.value, None if end is None
                         else max(end - span.start_ns, 0) / 1e6))
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "migration": self.migration,
            "vm": self.vm,
            "outcome": Outcome(self.outcome).value,
            "error": self.error,
            "phases": [{"phase": p.value, "start_ns": s.start_ns, "end_ns": s.end_ns}
                       for p, s in sorted(self.phases.items(),
                                          key=lambda kv: (kv[1].start_ns,
                                                          list(Phase).index(kv[0])))],
            "outstanding_at_quiesce": self.outstanding_at_quiesce,
            "drained": self.drained,
            "handed_over_heads": self.handed_over_heads,
            "guest_in_flight_at_handoff": self.guest_in_flight_at_handoff,
            "precopy_rounds": [r.to_dict() for r in self.precopy_rounds],
            "downtime_ns": self.downtime_ns,
            "worst_stall_ms": self.worst_stall_ms,
            "mediated_requests": self.mediated_requests,
            "bytes_sent": self.bytes_sent,
        }

    @classmethod
    def from_dict(cls, obj: Any) -> MigrationReport:
        """Read a report :meth:`to_dict` made (e.g. after a JSON round trip)."""
        if not isinstance(obj, dict):
            raise ReportError(f"report: expected an object, got {type(obj).__name__}")
        if obj.get("format") != REPORT_FORMAT:
            raise ReportError(f"report: format {obj.get('format')!r} is not "
                              f"{REPORT_FORMAT!r}")
        if obj.get("version") != REPORT_VERSION:
            raise ReportError(f"report: version {obj.get('version')!r} is not supported "
                              f"(this side reads version {REPORT_VERSION})")
        _keys(obj, "report", _REPORT_KEYS)
        report = cls()
        for key in ("migration", "vm"):
            if not isinstance(obj[key], str):
                raise ReportError(f"report: {key}: expected a string, got {obj[key]!r}")
        report.migration, report.vm = obj["migration"], obj["vm"]
        try:
            outcome = Outcome(obj["outcome"])
        except ValueError:
            raise ReportError(f"report: outcome {obj['outcome']!r} is not one of "
                              f"{', '.join(o.value for o in Outcome)}") from None
        cls._check_outcome(outcome, obj["error"])
        report.outcome, report.error = outcome, obj["error"]
        if not isinstance(obj["phases"], list):
            raise ReportError("report: phases: expected a list")
        for i, item in enumerate(obj["phases"]):
            where = f"report: phases[{i}]"
            _keys(item, where, _PHASE_KEYS)
            try:
                phase = Phase(item["phase"])
            except ValueError:
                raise ReportError(f"{where}: unknown phase {item['phase']!r}") from None
            if phase in report.phases:
                raise ReportError(f"{where}: phase {phase} appears twice")
            start = _count(item["start_ns"], f"{where}.start_ns")
            end = _opt_count(item["end_ns"], f"{where}.end_ns")
            if end is not None and end < start:
                raise ReportError(f"{where}: ends at {end} ns, before its start at "
                                  f"{start} ns")
            report.phases[phase] = PhaseSpan(start, end)
        report.outstanding_at_quiesce = _opt_count(obj["outstanding_at_quiesce"],
                                                   "report: outstanding_at_quiesce")
        if obj["drained"] is not None and not isinstance(obj["drained"], bool):
            raise ReportError(f"report: drained: expected true, false or null, got "
                              f"{obj['drained']!r}")
        report.drained = obj["drained"]
        report.handed_over_heads = _count(obj["handed_over_heads"],
                                          "report: handed_over_heads")
        report.guest_in_flight_at_handoff = _opt_count(
            obj["guest_in_flight_at_handoff"], "report: guest_in_flight_at_handoff")
        if not isinstance(obj["precopy_rounds"], list):
            raise ReportError("report: precopy_rounds: expected a list")
        for i, item in enumerate(obj["precopy_rounds"]):
            where = f"report: precopy_rounds[{i}]"
            _keys(item, where, _ROUND_KEYS, _ROUND_OPTIONAL)
            values = {k: _count(item[k], f"{where}.{k}") for k in _ROUND_KEYS}
            final = item.get("final", False)
            if not isinstance(final, bool):
                raise ReportError(f"{where}.final: expected true or false, got {final!r}")
            try:
                report.add_round(**values, final=final)
            except ReportError as exc:
                raise ReportError(f"{where}: {exc}") from None
        report.downtime_ns = _opt_count(obj["downtime_ns"], "report: downtime_ns")
        report.worst_stall_ms = _opt_ms(obj["worst_stall_ms"], "report: worst_stall_ms")
        report.mediated_requests = _count(obj["mediated_requests"],
                                          "report: mediated_requests")
        report.bytes_sent = _count(obj["bytes_sent"], "report: bytes_sent")
        return report
