"""ChunkSet against a plain Python set."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfdirect.core.alloc import ChunkSet

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(1, 12)), max_size=60)


@given(ops)
def test_matches_a_set(steps: list[tuple[bool, int, int]]) -> None:
    cs = ChunkSet()
    model: set[int] = set()
    for add, start, length in steps:
        run = set(range(start, start + length))
        if add:
            if run & model:
                with pytest.raises(ValueError, match="overlaps"):
                    cs.add(start, start + length)
            else:
                cs.add(start, start + length)
                model |= run
        elif run <= model:
            cs.remove(start, start + length)
            model -= run
        else:
            with pytest.raises(ValueError, match="not inside"):
                cs.remove(start, start + length)
        # canonical runs: sorted, disjoint, not touching
        runs = cs.runs()
        assert {i for a, b in runs for i in range(a, b)} == model
        assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(runs))
        assert len(cs) == len(model)
        for probe in range(0, 75, 7):
            assert (probe in cs) == (probe in model)
            assert cs.covers(probe, probe + 3) == set(range(probe, probe + 3)).issubset(model)
            assert cs.overlaps(probe, probe + 3) == bool(set(range(probe, probe + 3)) & model)
        assert cs.first() == (min(model) if model else None)
        assert cs == ChunkSet(runs)
        assert cs.copy() == cs


def test_first_fit_and_errors() -> None:
    cs = ChunkSet(((0, 2), (5, 9), (20, 30)))
    assert cs.first_fit(1) == 0
    assert cs.first_fit(3) == 5
    assert cs.first_fit(5) == 20
    assert cs.first_fit(11) is None
    assert "x" not in cs
    with pytest.raises(ValueError, match="empty"):
        cs.add(3, 3)
    with pytest.raises(ValueError, match="empty"):
        cs.remove(4, 3)
    assert cs.covers(7, 7) and not cs.overlaps(7, 7)
    assert bool(cs) and not ChunkSet()
    assert repr(ChunkSet(((1, 2),))) == "ChunkSet(((1, 2),))"
