"""Dirty-page tracking for live migration: one byte per guest page (pure).

A byte map, not a bitmap: the guest (or the mediated path) sets a page's byte and the
hypervisor clears it, each with a plain one-byte store, so two processes sharing the map
never do a read-modify-write of each other's bits (Python has no atomic OR on shared
memory, which vhost-user's LOG_SHMFD bitmap needs).

The protocol that makes pre-copy correct with concurrent writers:

* a writer marks a page, writes it, and marks it again (:meth:`PageMarks.mark` before and
  after): the first mark covers a VM stopped between the store and its mark; the second
  covers the hypervisor clearing the first mark and copying the page before the store;
* the hypervisor clears the marks it found, then runs a full memory barrier, then copies
  the pages (:meth:`PageMarks.collect` clears and calls ``barrier``): a store after the
  clear marks the page again and it goes in the next round.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

__all__ = ["PAGE_SIZE", "PageMarks", "page_runs"]

PAGE_SIZE = 4096
_RUN = re.compile(rb"[^\x00]+")


def page_runs(pages: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted page numbers as ``(first, count)`` runs of consecutive pages."""
    start = prev = -2
    for p in sorted(set(pages)):
        if p == prev + 1:
            prev = p
            continue
        if start >= 0:
            yield start, prev - start + 1
        start = prev = p
    if start >= 0:
        yield start, prev - start + 1


class PageMarks:
    """A dirty byte per page of a memory of ``memory_size`` bytes, kept in ``buffer``
    (a bytearray, or a shared-memory view another process also maps)."""

    def __init__(self, buffer: memoryview | bytearray, memory_size: int,
                 page_size: int = PAGE_SIZE) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two")
        if memory_size < 0:
            raise ValueError("negative memory size")
        self.page_size = page_size
        self.memory_size = memory_size
        self.pages = self.size_for(memory_size, page_size)
        view = memoryview(buffer).cast("B")
        if len(view) < self.pages:
            raise ValueError(f"a dirty map of {len(view)} bytes is too small for "
                             f"{self.pages} pages")
        self._map = view[:self.pages]
        self._shift = page_size.bit_length() - 1

    @staticmethod
    def size_for(memory_size: int, page_size: int = PAGE_SIZE) -> int:
        """Bytes of map a memory of ``memory_size`` bytes needs."""
        return -(-memory_size // page_size)

    def mark(self, addr: int, length: int) -> None:
        """Mark the pages that ``[addr, addr + length)`` touches (clipped to the memory)."""
        if length <= 0:
            return
        first = max(addr, 0) >> self._shift
        last = min((addr + length - 1) >> self._shift, self.pages - 1)
        if first > last:
            return
        if first == last:
            self._map[first] = 1
        else:
            self._map[first:last + 1] = b"\x01" * (last - first + 1)

    def mark_all(self) -> None:
        self._map[:] = b"\x01" * self.pages

    def clear_all(self) -> None:
        self._map[:] = bytes(self.pages)

    def is_marked(self, page: int) -> bool:
        return bool(self._map[page])

    def count(self) -> int:
        """Pages marked now (a snapshot)."""
        return self.pages - bytes(self._map).count(0)

    def collect(self, barrier: Callable[[], None] | None = None) -> list[tuple[int, int]]:
        """Clear the marks found and return them as ``(first page, count)`` runs; then
        ``barrier`` (a full fence) before the caller reads those pages."""
        snapshot = bytes(self._map)
        runs = [(m.start(), m.end() - m.start()) for m in _RUN.finditer(snapshot)]
        for first, count in runs:
            self._map[first:first + count] = bytes(count)
        if barrier is not None:
            barrier()
        return runs

    def release(self) -> None:
        """Drop the view of the buffer (so a shared mapping can be closed)."""
        self._map.release()
