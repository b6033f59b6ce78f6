"""Pre-copy convergence: each stopping rule at its boundary."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfdirect.core.migration.policy import PrecopyPolicy, Step

PAGE = 4096
BW = 100 * PAGE * 1000  # 100 pages per millisecond


def test_converges_exactly_at_the_safe_budget() -> None:
    # budget 10 ms * 0.5 = 5 ms = 500 pages at this bandwidth
    p = PrecopyPolicy(max_downtime_ms=10)
    assert p.budget_ms == 5.0
    assert p.next_step(1, 501, PAGE, BW) == Step.ANOTHER_ROUND
    assert p.reason == "continuing" and p.estimate_ms == pytest.approx(5.01)
    assert p.next_step(2, 500, PAGE, BW) == "stop_and_copy"
    assert p.reason == "converged" and p.estimate_ms == pytest.approx(5.0)


def test_safety_factor_is_configurable() -> None:
    p = PrecopyPolicy(max_downtime_ms=10, safety=1.0)
    assert p.next_step(1, 1000, PAGE, BW) == Step.STOP_AND_COPY


def test_nothing_dirty_stops_even_with_unknown_bandwidth() -> None:
    p = PrecopyPolicy(max_downtime_ms=1)
    assert p.next_step(1, 0, PAGE, 0) == Step.STOP_AND_COPY
    assert p.reason == "converged"


def test_unknown_bandwidth_never_converges_by_estimate() -> None:
    p = PrecopyPolicy(max_downtime_ms=1000)
    assert p.next_step(1, 1, PAGE, 0) == Step.ANOTHER_ROUND
    assert p.estimate_ms == math.inf


def test_min_rounds_come_first() -> None:
    p = PrecopyPolicy(max_downtime_ms=10, min_rounds=3)
    assert p.next_step(1, 0, PAGE, BW) == Step.ANOTHER_ROUND
    assert p.reason == "min_rounds"
    assert p.next_step(2, 0, PAGE, BW) == Step.ANOTHER_ROUND
    assert p.next_step(3, 0, PAGE, BW) == Step.STOP_AND_COPY


def test_max_rounds() -> None:
    p = PrecopyPolicy(max_downtime_ms=1, max_rounds=4)
    dirty = [10_000, 9_000, 8_000, 7_000]  # always shrinking, never within budget
    steps = [p.next_step(i + 1, d, PAGE, BW) for i, d in enumerate(dirty)]
    assert steps == [Step.ANOTHER_ROUND] * 3 + [Step.STOP_AND_COPY]
    assert p.reason == "max_rounds"


def test_stops_when_the_dirty_set_stops_shrinking_for_three_rounds() -> None:
    p = PrecopyPolicy(max_downtime_ms=1)
    assert p.next_step(1, 5000, PAGE, BW) == Step.ANOTHER_ROUND
    assert p.next_step(2, 4000, PAGE, BW) == Step.ANOTHER_ROUND  # new smallest
    assert p.next_step(3, 4000, PAGE, BW) == Step.ANOTHER_ROUND  # 1 round not smaller
    assert p.next_step(4, 4500, PAGE, BW) == Step.ANOTHER_ROUND  # 2
    assert p.next_step(5, 4001, PAGE, BW) == Step.STOP_AND_COPY  # 3
    assert p.reason == "not_converging"


def test_a_new_smallest_dirty_set_resets_the_stall_count() -> None:
    p = PrecopyPolicy(max_downtime_ms=1)
    for i, dirty in enumerate([5000, 5000, 5000, 4999, 5000, 5000], start=1):
        assert p.next_step(i, dirty, PAGE, BW) == Step.ANOTHER_ROUND
    assert p.next_step(7, 5000, PAGE, BW) == Step.STOP_AND_COPY


def test_rounds_must_be_reported_in_order() -> None:
    p = PrecopyPolicy(max_downtime_ms=1)
    with pytest.raises(ValueError, match="round 2 reported after round 0"):
        p.next_step(2, 1, PAGE, BW)
    p.next_step(1, 100, PAGE, BW)
    with pytest.raises(ValueError, match="round 1 reported after round 1"):
        p.next_step(1, 1, PAGE, BW)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_downtime_ms": 0}, "max_downtime_ms must be a positive number"),
    ({"max_downtime_ms": math.nan}, "max_downtime_ms"),
    ({"max_downtime_ms": 5, "max_rounds": 0}, "max_rounds must be an integer >= 1"),
    ({"max_downtime_ms": 5, "min_rounds": 4, "max_rounds": 3}, "max_rounds must be"),
    ({"max_downtime_ms": 5, "min_rounds": -1}, "min_rounds"),
    ({"max_downtime_ms": 5, "safety": 0}, "safety"),
    ({"max_downtime_ms": 5, "stall_rounds": 0}, "stall_rounds"),
])
def test_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrecopyPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("args", "message"), [
    ((1, -1, PAGE, BW), "dirty_pages"),
    ((1, 1, 0, BW), "page_size"),
    ((1, 1, PAGE, -5), "bandwidth"),
    ((1, 1, PAGE, math.nan), "bandwidth"),
    ((0, 1, PAGE, BW), "round_no"),
])
def test_bad_arguments(args: tuple[int, int, int, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrecopyPolicy(max_downtime_ms=5).next_step(*args)


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=40),
       st.integers(1, 30), st.floats(0.1, 1000))
def test_always_stops_by_max_rounds(dirty: list[int], max_rounds: int,
                                    downtime: float) -> None:
    p = PrecopyPolicy(max_downtime_ms=downtime, max_rounds=max_rounds)
    for i, d in enumerate(dirty, start=1):
        step = p.next_step(i, d, PAGE, BW)
        if step == Step.STOP_AND_COPY:
            assert i <= max_rounds
            if p.reason == "converged":
                assert d * PAGE / BW * 1000 <= downtime / 2 + 1e-9
            return
        assert i < max_rounds
