"""The migration report (claim X4): phase rules, counters, outcome, a validating versioned
dict form that survives JSON, and the summary rows the CLI and dashboard show."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfdirect.core.migration.record import (
    REPORT_FORMAT,
    MigrationReport,
    Outcome,
    Phase,
    ReportError,
)

MS = 1_000_000


def full_report() -> MigrationReport:
    """The phases of a committed migration, as the source host would record them."""
    r = MigrationReport(migration="mig-1", vm="vm-a")
    r.enter(Phase.PREPARE, 0)
    r.leave(Phase.PREPARE, 5 * MS)
    r.enter(Phase.QUIESCE, 5 * MS)
    r.outstanding_at_quiesce = 7
    r.leave(Phase.QUIESCE, 6 * MS)
    r.enter(Phase.DRAIN, 6 * MS)
    r.drained = True
    r.leave(Phase.DRAIN, 9 * MS)
    r.enter(Phase.HANDOFF, 9 * MS)
    r.handed_over_heads = 2
    r.leave(Phase.HANDOFF, 10 * MS)
    r.enter(Phase.MEDIATED, 10 * MS)
    r.enter(Phase.PRECOPY, 10 * MS)
    r.guest_in_flight_at_handoff = 4
    r.add_round(pages=100, bytes=409_600, dirty_pages=12, duration_ns=40 * MS)
    r.add_round(pages=12, bytes=49_152, dirty_pages=3, duration_ns=5 * MS)
    r.leave(Phase.PRECOPY, 55 * MS)
    r.enter(Phase.STOP_COPY, 55 * MS)
    r.add_round(pages=3, bytes=12_288, dirty_pages=0, duration_ns=MS, final=True)
    r.leave(Phase.STOP_COPY, 58 * MS)
    r.leave(Phase.MEDIATED, 58 * MS)
    r.downtime_ns = 3 * MS
    r.mediated_requests = 40
    r.note_stall(2.5)
    r.note_stall(1.0)
    r.enter(Phase.DESTINATION, 58 * MS)
    r.leave(Phase.DESTINATION, 70 * MS)
    r.enter(Phase.COMMIT, 70 * MS)
    r.leave(Phase.COMMIT, 71 * MS)
    r.bytes_sent = 470_000
    r.finish(Outcome.COMMITTED)
    return r


def test_claim_X4_report_of_a_committed_migration() -> None:
    r = full_report()
    assert r.summary_rows() == [
        ("prepare", 5.0), ("quiesce", 1.0), ("drain", 3.0), ("handoff", 1.0),
        ("mediated", 48.0), ("precopy", 45.0), ("stop_copy", 3.0), ("destination", 12.0),
        ("commit", 1.0)]
    d = r.to_dict()
    assert d["format"] == REPORT_FORMAT and d["version"] == 1
    assert d["outstanding_at_quiesce"] == 7 and d["drained"] is True
    assert d["worst_stall_ms"] == 2.5
    assert d["guest_in_flight_at_handoff"] == 4
    assert [(x["round"], x["final"]) for x in d["precopy_rounds"]] == [
        (0, False), (1, False), (2, True)]
    assert d["precopy_rounds"][1] == {"round": 1, "pages": 12, "bytes": 49_152,
                                      "dirty_pages": 3, "duration_ns": 5 * MS,
                                      "final": False}
    assert [p["phase"] for p in d["phases"]][:6] == [
        "prepare", "quiesce", "drain", "handoff", "mediated", "precopy"]
    back = MigrationReport.from_dict(json.loads(json.dumps(d)))
    assert back == r and back.to_dict() == d


def test_phases_overlap_and_open_phases() -> None:
    r = MigrationReport()
    r.enter("mediated", 10)
    r.enter("precopy", 12)
    assert r.is_open(Phase.MEDIATED) and r.is_open("precopy")
    r.leave("precopy", 20)
    assert r.duration_ns("precopy") == 8 and r.duration_ns("mediated") is None
    assert r.duration_ns("drain") is None and not r.is_open("drain")
    assert r.summary_rows() == [("mediated", None), ("precopy", 8e-6)]
    assert r.summary_rows(now_ns=30) == [("mediated", 20e-6), ("precopy", 8e-6)]
    assert MigrationReport.from_dict(r.to_dict()) == r


def test_phase_rules() -> None:
    r = MigrationReport()
    with pytest.raises(ReportError, match="phase drain was never entered"):
        r.leave(Phase.DRAIN, 5)
    r.enter(Phase.DRAIN, 5)
    with pytest.raises(ReportError, match="phase drain was already entered"):
        r.enter(Phase.DRAIN, 6)
    with pytest.raises(ReportError, match="cannot end at 4 ns, before it started at 5 ns"):
        r.leave(Phase.DRAIN, 4)
    r.leave(Phase.DRAIN, 5)
    with pytest.raises(ReportError, match="already left"):
        r.leave(Phase.DRAIN, 9)
    with pytest.raises(ValueError, match="'nap' is not a valid Phase"):
        r.enter("nap", 1)
    with pytest.raises(ReportError, match="start time: expected a non-negative integer"):
        r.enter(Phase.QUIESCE, -1)
    with pytest.raises(ReportError, match="start time"):
        r.enter(Phase.QUIESCE, 1.5)  # type: ignore[arg-type]


def test_outcome_rules() -> None:
    r = MigrationReport()
    assert r.outcome is Outcome.RUNNING and r.error is None
    with pytest.raises(ReportError, match="outcome aborted needs an error"):
        r.finish(Outcome.ABORTED)
    r.error = "destination lost the LUN"
    r.finish("failed")
    assert r.outcome is Outcome.FAILED and r.error == "destination lost the LUN"
    with pytest.raises(ReportError, match="already ended"):
        r.finish(Outcome.COMMITTED)
    done = MigrationReport()
    done.finish(Outcome.COMMITTED, "source cleanup: logout failed")
    assert MigrationReport.from_dict(done.to_dict()) == done


def test_outcome_assigned_as_a_string_still_serializes() -> None:
    r = MigrationReport()
    r.outcome = "committed"  # type: ignore[assignment]
    assert MigrationReport.from_dict(r.to_dict()).outcome is Outcome.COMMITTED


def test_counters() -> None:
    r = MigrationReport()
    assert r.add_round(pages=1, bytes=4096, dirty_pages=0, duration_ns=3).round == 0
    assert r.add_round(pages=1, bytes=1, dirty_pages=0, duration_ns=0, round=5).round == 5
    assert r.add_round(pages=1, bytes=1, dirty_pages=0, duration_ns=0).round == 6
    with pytest.raises(ReportError, match="pre-copy round 6 after round 6"):
        r.add_round(pages=1, bytes=1, dirty_pages=0, duration_ns=0, round=6)
    r.add_round(pages=0, bytes=0, dirty_pages=0, duration_ns=0, final=True)
    with pytest.raises(ReportError, match="no pre-copy round can follow the final one"):
        r.add_round(pages=1, bytes=1, dirty_pages=0, duration_ns=0)
    assert r.bytes_sent == 0
    r = MigrationReport()
    with pytest.raises(ReportError, match="dirty_pages: expected a non-negative integer"):
        r.add_round(pages=1, bytes=1, dirty_pages=-1, duration_ns=0)
    assert r.precopy_rounds == []
    with pytest.raises(ReportError, match="stall"):
        r.note_stall(float("nan"))
    r.note_stall(0)
    assert r.worst_stall_ms == 0.0


def mutated(change: Any) -> dict[str, Any]:
    d = copy.deepcopy(full_report().to_dict())
    change(d)
    return d


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(format="x"), "format 'x' is not 'vfdirect.migration-report'"),
    (lambda d: d.update(version=2), "version 2 is not supported"),
    (lambda d: d.pop("vm"), "missing vm"),
    (lambda d: d.update(extra=1), "unknown keys extra"),
    (lambda d: d.update(vm=1), "vm: expected a string"),
    (lambda d: d.update(outcome="won"), "outcome 'won' is not one of"),
    (lambda d: d.update(outcome="aborted"), "outcome aborted needs an error"),
    (lambda d: d.update(error=5), "error: expected a string"),
    (lambda d: d.update(phases={}), "phases: expected a list"),
    (lambda d: d["phases"].append(dict(d["phases"][0])), "phase prepare appears twice"),
    (lambda d: d["phases"][0].update(phase="nap"), r"phases\[0\]: unknown phase 'nap'"),
    (lambda d: d["phases"][1].update(end_ns=0), r"phases\[1\]: ends at 0 ns, before"),
    (lambda d: d["phases"][1].update(start_ns=-3), r"phases\[1\].start_ns"),
    (lambda d: d["phases"][1].pop("end_ns"), r"phases\[1\]: missing end_ns"),
    (lambda d: d["phases"][1].update(x=1), r"phases\[1\]: unknown keys x"),
    (lambda d: d.update(drained="yes"), "drained: expected true, false or null"),
    (lambda d: d.update(outstanding_at_quiesce=True), "outstanding_at_quiesce"),
    (lambda d: d.update(handed_over_heads=None), "handed_over_heads"),
    (lambda d: d["precopy_rounds"][1].update(round=0), r"\[1\]: pre-copy round 0 after round 0"),
    (lambda d: d["precopy_rounds"][0].update(final=True), r"\[1\]: no pre-copy round can follow"),
    (lambda d: d["precopy_rounds"][0].update(final=1), r"\[0\].final: expected true or false"),
    (lambda d: d.update(guest_in_flight_at_handoff=-2), "guest_in_flight_at_handoff"),
    (lambda d: d["precopy_rounds"][0].update(bytes=-1), r"precopy_rounds\[0\].bytes"),
    (lambda d: d["precopy_rounds"].append(3), r"precopy_rounds\[3\]: expected an object"),
    (lambda d: d.update(worst_stall_ms="slow"), "worst_stall_ms"),
    (lambda d: d.update(worst_stall_ms=-1.0), "worst_stall_ms"),
    (lambda d: d.update(downtime_ns=1.5), "downtime_ns"),
    (lambda d: d.update(bytes_sent=-1), "bytes_sent"),
])
def test_from_dict_refuses_bad_reports(change: Any, message: str) -> None:
    with pytest.raises(ReportError, match=message):
        MigrationReport.from_dict(mutated(change))


def test_from_dict_refuses_non_objects() -> None:
    with pytest.raises(ReportError, match="expected an object, got list"):
        MigrationReport.from_dict([])


counts = st.integers(0, 2**63)


@st.composite
def reports(draw: st.DrawFn) -> MigrationReport:
    """Any report the API can build."""
    r = MigrationReport(migration=draw(st.text(max_size=8)), vm=draw(st.text(max_size=8)))
    for phase in draw(st.lists(st.sampled_from(list(Phase)), unique=True)):
        start = draw(counts)
        r.enter(phase, start)
        if draw(st.booleans()):
            r.leave(phase, start + draw(st.integers(0, 10**12)))
    r.outstanding_at_quiesce = draw(st.none() | counts)
    r.drained = draw(st.none() | st.booleans())
    r.handed_over_heads = draw(counts)
    r.guest_in_flight_at_handoff = draw(st.none() | counts)
    n = draw(st.integers(0, 4))
    for i in range(n):
        r.add_round(pages=draw(counts), bytes=draw(counts), dirty_pages=draw(counts),
                    duration_ns=draw(counts), final=i == n - 1 and draw(st.booleans()),
                    round=draw(st.none() | st.integers(len(r.precopy_rounds) * 10,
                                                       len(r.precopy_rounds) * 10 + 9)))
    r.downtime_ns = draw(st.none() | counts)
    for stall in draw(st.lists(st.floats(0, 1e9), max_size=3)):
        r.note_stall(stall)
    r.mediated_requests = draw(counts)
    r.bytes_sent = draw(counts)
    outcome = draw(st.sampled_from(list(Outcome)))
    if outcome is not Outcome.RUNNING:
        needs_error = outcome in (Outcome.ABORTED, Outcome.FAILED)
        r.finish(outcome, draw(st.text(min_size=1)) if needs_error
                 else draw(st.none() | st.text(min_size=1)))
    return r


@given(reports())
def test_report_round_trips_through_json(report: MigrationReport) -> None:
    d = report.to_dict()
    back = MigrationReport.from_dict(json.loads(json.dumps(d)))
    assert back == report
    assert back.to_dict() == d
    rows = back.summary_rows()
    assert [name for name, _ in rows] == [p.value for p in Phase if p in report.phases]
    assert all(ms is None or ms >= 0 for _, ms in rows)
