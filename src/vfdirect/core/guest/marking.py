"""Marking the guest's own writes into its memory for live migration (pure).

While the hypervisor pre-copies a running VM's memory it must learn every page the
GUEST writes (device writes it tracks itself: the mediated path does them). The guest
runtime therefore marks, in a dirty map shared with the hypervisor
(:class:`~vfdirect.core.migration.dirty.PageMarks`), each page before AND after it
writes it (that module's docstring says why both).

Every write path of the guest runtime goes through one of two routes:

* :class:`MarkedMemory`, a :class:`~vfdirect.core.virtio.memory.GuestMemory` wrapping the
  real one: ``write`` and ``store_u16/u32/u64`` mark the range before and after the
  store. Everything that writes guest memory through the memory object (the journal, the
  guest header and boot count, the firmware table page, ring creation, indirect tables,
  event buffers, TMF requests, the stall clock) is covered by handing it this wrapper;
* zero-copy views cannot be watched, so the code that writes through cached views marks
  explicitly (:func:`mark_of` finds the marker of a memory): the virtio-scsi driver marks
  its whole metadata area (request table, vrings, indirect tables, event buffers: one
  contiguous range of a few pages) before and after every operation that may store into
  it, and the data slot it fills with data-out bytes. ``view``/``views`` of this class
  return the inner memory's views unchanged: callers that write through them must mark.

``mark`` is any ``(gpa, length) -> None`` callable (``PageMarks.mark`` in the VM
process); ``None`` everywhere means no tracking at no cost.
"""

from __future__ import annotations

from collections.abc import Callable

from vfdirect.core.virtio.memory import BytesLike, GuestMemory

__all__ = ["Mark", "MarkedMemory", "byte_map_marker", "mark_of"]

#: Marks the pages of ``[gpa, gpa + length)`` dirty.
Mark = Callable[[int, int], None]


class MarkedMemory:
    """A :class:`GuestMemory` whose stores mark their pages before and after."""

    __slots__ = ("inner", "mark")

    def __init__(self, inner: GuestMemory, mark: Mark) -> None:
        self.inner = inner
        self.mark = mark

    def contains(self, gpa: int, length: int) -> bool:
        return self.inner.contains(gpa, length)

    def view(self, gpa: int, length: int) -> memoryview:
        return self.inner.view(gpa, length)

    def views(self, gpa: int, length: int) -> tuple[memoryview, ...]:
        return self.inner.views(gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        return self.inner.read(gpa, length)

    def write(self, gpa: int, data: BytesLike) -> None:
        length = memoryview(data).nbytes
        self.mark(gpa, length)
        self.inner.write(gpa, data)
        self.mark(gpa, length)

    def load_u16(self, gpa: int) -> int:
        return self.inner.load_u16(gpa)

    def load_u32(self, gpa: int) -> int:
        return self.inner.load_u32(gpa)

    def load_u64(self, gpa: int) -> int:
        return self.inner.load_u64(gpa)

    def store_u16(self, gpa: int, value: int) -> None:
        self.mark(gpa, 2)
        self.inner.store_u16(gpa, value)
        self.mark(gpa, 2)

    def store_u32(self, gpa: int, value: int) -> None:
        self.mark(gpa, 4)
        self.inner.store_u32(gpa, value)
        self.mark(gpa, 4)

    def store_u64(self, gpa: int, value: int) -> None:
        self.mark(gpa, 8)
        self.inner.store_u64(gpa, value)
        self.mark(gpa, 8)

    def __repr__(self) -> str:
        return f"MarkedMemory({self.inner!r})"


def mark_of(memory: GuestMemory) -> Mark | None:
    """The marker of ``memory`` when it is a :class:`MarkedMemory`, else ``None``."""
    return memory.mark if isinstance(memory, MarkedMemory) else None


def byte_map_marker(view: memoryview, memory_size: int, page_size: int = 4096) -> Mark:
    """A fast ``mark`` over a dirty byte map (the format of
    :class:`~vfdirect.core.migration.dirty.PageMarks`: one byte per page, set to 1):
    the same stores as ``PageMarks.mark``, about twice as fast for the one-page marks
    that dominate (the guest marks each store twice). ``view`` must stay valid while
    the marker is used (the caller releases it after)."""
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two")
    pages = -(-memory_size // page_size)
    if view.nbytes < pages:
        raise ValueError(f"a dirty map of {view.nbytes} bytes is too small for {pages} pages")
    shift = page_size.bit_length() - 1
    ones = b"\x01" * max(pages, 1)

    def mark(gpa: int, length: int) -> None:
        if length <= 0:
            return
        first = gpa >> shift
        last = (gpa + length - 1) >> shift
        if first < 0 or last >= pages:  # clipped to the memory (the store will fail)
            first, last = max(first, 0), min(last, pages - 1)
            if first > last:
                return
        if first == last:
            view[first] = 1
        else:
            view[first:last + 1] = ones[:last + 1 - first]

    return mark
