"""A set of integers held as sorted, disjoint, non-adjacent half-open runs.

The allocator keeps, per physical LUN, the free chunks and the dirty (freed, not yet
zeroed) chunks in one of these. The representation is canonical (runs are merged as soon
as they touch), so two sets with the same members have the same runs, the same dump and
make the same allocation choices.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator


class ChunkSet:
    """Members are chunk indices; every update names a run ``[start, end)``."""

    __slots__ = ("_count", "_ends", "_starts")

    def __init__(self, runs: tuple[tuple[int, int], ...] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._count = 0
        for start, end in runs:
            self.add(start, end)

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChunkSet):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int):
            return False
        i = bisect_right(self._starts, index) - 1
        return i >= 0 and index < self._ends[i]

    def __repr__(self) -> str:
        return f"ChunkSet({self.runs()!r})"

    def runs(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self._starts, self._ends, strict=True))

    def iter_runs(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends, strict=True)

    def covers(self, start: int, end: int) -> bool:
        """Whether every index of ``[start, end)`` is a member."""
        if start >= end:
            return True
        i = bisect_right(self._starts, start) - 1
        return i >= 0 and end <= self._ends[i]

    def overlaps(self, start: int, end: int) -> bool:
        """Whether some index of ``[start, end)`` is a member."""
        if start >= end:
            return False
        i = bisect_right(self._starts, start) - 1
        if i >= 0 and self._ends[i] > start:
            return True
        return i + 1 < len(self._starts) and self._starts[i + 1] < end

    def add(self, start: int, end: int) -> None:
        """Add ``[start, end)``, none of which may be a member yet."""
        if start >= end:
            raise ValueError(f"empty or reversed run [{start}, {end})")
        if self.overlaps(start, end):
            raise ValueError(f"run [{start}, {end}) overlaps {self!r}")
        i = bisect_right(self._starts, start)
        merge_left = i > 0 and self._ends[i - 1] == start
        merge_right = i < len(self._starts) and self._starts[i] == end
        if merge_left and merge_right:
            self._ends[i - 1] = self._ends[i]
            del self._starts[i], self._ends[i]
        elif merge_left:
            self._ends[i - 1] = end
        elif merge_right:
            self._starts[i] = start
        else:
            self._starts.insert(i, start)
            self._ends.insert(i, end)
        self._count += end - start

    def remove(self, start: int, end: int) -> None:
        """Remove ``[start, end)``, all of which must be members."""
        if start >= end:
            raise ValueError(f"empty or reversed run [{start}, {end})")
        i = bisect_right(self._starts, start) - 1
        if i < 0 or end > self._ends[i]:
            raise ValueError(f"run [{start}, {end}) is not inside {self!r}")
        run_start, run_end = self._starts[i], self._ends[i]
        if run_start == start and run_end == end:
            del self._starts[i], self._ends[i]
        elif run_start == start:
            self._starts[i] = end
        elif run_end == end:
            self._ends[i] = start
        else:
            self._ends[i] = start
            self._starts.insert(i + 1, end)
            self._ends.insert(i + 1, run_end)
        self._count -= end - start

    def first(self) -> int | None:
        return self._starts[0] if self._starts else None

    def first_fit(self, length: int) -> int | None:
        """Start of the lowest run holding ``length`` members, if any."""
        for start, end in zip(self._starts, self._ends, strict=True):
            if end - start >= length:
                return start
        return None

    def copy(self) -> ChunkSet:
        other = ChunkSet()
        other._starts = list(self._starts)
        other._ends = list(self._ends)
        other._count = self._count
        return other
