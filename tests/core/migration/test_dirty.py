"""Dirty-page marks (claim X5's pure part): marking, collecting and page runs, checked
against a plain set of pages."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfdirect.core.migration.dirty import PAGE_SIZE, PageMarks, page_runs

PAGE = 512

writes = st.lists(st.tuples(st.integers(-2 * PAGE, 40 * PAGE), st.integers(-4, 6 * PAGE)),
                  max_size=12)


def expected_pages(memory_size: int, ws: list[tuple[int, int]]) -> set[int]:
    pages = -(-memory_size // PAGE)
    out: set[int] = set()
    for addr, length in ws:
        if length <= 0:
            continue
        lo, hi = max(addr, 0), min(addr + length, pages * PAGE)
        out |= {p for p in range(lo // PAGE, pages) if p * PAGE < hi} if lo < hi else set()
    return out


@given(st.integers(1, 32 * PAGE), writes)
def test_marks_match_the_pages_written(memory_size: int, ws: list[tuple[int, int]]) -> None:
    marks = PageMarks(bytearray(PageMarks.size_for(memory_size, PAGE)), memory_size, PAGE)
    for addr, length in ws:
        marks.mark(addr, length)
    want = expected_pages(memory_size, ws)
    assert marks.count() == len(want)
    assert {p for p in range(marks.pages) if marks.is_marked(p)} == want


@given(st.integers(1, 32 * PAGE), writes)
def test_collect_returns_the_runs_and_clears_before_the_barrier(
        memory_size: int, ws: list[tuple[int, int]]) -> None:
    marks = PageMarks(bytearray(PageMarks.size_for(memory_size, PAGE)), memory_size, PAGE)
    for addr, length in ws:
        marks.mark(addr, length)
    want = expected_pages(memory_size, ws)
    seen_at_barrier: list[int] = []
    runs = marks.collect(barrier=lambda: seen_at_barrier.append(marks.count()))
    assert runs == list(page_runs(sorted(want)))
    assert seen_at_barrier == [0]
    assert marks.count() == 0 and marks.collect() == []


@given(st.lists(st.integers(0, 200), max_size=60, unique=True))
def test_page_runs_cover_exactly_the_pages_in_maximal_runs(pages: list[int]) -> None:
    """Distinct page numbers, in any order (a repeated number yields a repeated run)."""
    runs = list(page_runs(pages))
    covered = [p for first, count in runs for p in range(first, first + count)]
    assert covered == sorted(set(pages))
    assert all(count >= 1 for _, count in runs)
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(runs))


def test_mark_all_and_clear_all() -> None:
    marks = PageMarks(bytearray(4), 3 * PAGE + 1, PAGE)
    marks.mark_all()
    assert marks.count() == 4 and marks.collect() == [(0, 4)]
    marks.mark(0, 1)
    marks.clear_all()
    assert marks.count() == 0


def test_default_page_size_and_shared_views() -> None:
    shared = bytearray(8)
    a = PageMarks(memoryview(shared), 8 * PAGE_SIZE)
    b = PageMarks(memoryview(shared), 8 * PAGE_SIZE)
    a.mark(PAGE_SIZE * 3 + 5, 1)
    assert b.is_marked(3) and b.collect() == [(3, 1)] and not a.is_marked(3)
    a.release()
    b.release()


@pytest.mark.parametrize(("args", "message"), [
    ((bytearray(4), 4 * 1000, 1000), "page size 1000 is not a power of two"),
    ((bytearray(4), -1, PAGE), "negative memory size"),
    ((bytearray(2), 3 * PAGE, PAGE), "a dirty map of 2 bytes is too small for 3 pages"),
])
def test_bad_arguments(args: tuple[bytearray, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PageMarks(*args)
