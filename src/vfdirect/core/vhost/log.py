"""The vhost-user dirty log (vhost-user.rst "Migration"), pure.

Rules of this module:

* the log is a bitmap over guest-physical pages of ``VHOST_LOG_PAGE`` (4 KiB): bit
  ``page % 8`` of byte ``page // 8`` is guest page ``page = gpa // 4096``. The shell maps
  the fd of SET_LOG_BASE (``mmap_size`` bytes from ``mmap_offset``) and hands the
  memoryview to :class:`DirtyLog`;
* while VHOST_F_LOG_ALL is negotiated the back end marks every page it writes (data
  buffers and, with VHOST_VRING_F_LOG, the used ring at its ``log_guest_addr``).
  :meth:`Virtqueue <vfdirect.core.virtio.ring.Virtqueue>`'s ``on_write`` hook can call
  :meth:`DirtyLog.mark` directly;
* marking is a byte read-modify-write (Python has no atomic OR). The front end collects
  and clears the log with an atomic exchange, so a race with it can only re-mark pages
  it already collected (a harmless extra copy), never lose a mark. Two back-end
  threads must not mark the same log concurrently: the shell serialises them;
* a write beyond the log's size is the front end's fault (its log is too small for its
  own memory table) and raises :class:`DirtyLogError`.
"""

from __future__ import annotations

from collections.abc import Iterator

from vfdirect.core.vhost.messages import VHOST_LOG_PAGE

__all__ = ["DirtyLog", "DirtyLogError", "log_bytes_for"]


class DirtyLogError(ValueError):
    """A page to mark lies beyond the dirty log the front end supplied."""


def log_bytes_for(memory_end: int) -> int:
    """Bytes of log needed to cover guest addresses ``[0, memory_end)``."""
    pages = (memory_end + VHOST_LOG_PAGE - 1) // VHOST_LOG_PAGE
    return (pages + 7) // 8


class DirtyLog:
    """A dirty-page bitmap in a buffer shared with the front end."""

    def __init__(self, buffer: memoryview) -> None:
        view = memoryview(buffer)
        self._log = view.cast("B") if view.format != "B" else view
        if self._log.readonly:
            raise DirtyLogError("the dirty log must be writable")

    @property
    def pages_covered(self) -> int:
        return self._log.nbytes * 8

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page touched by ``[gpa, gpa+length)``."""
        if length <= 0:
            return
        if gpa < 0:
            raise DirtyLogError(f"negative address {gpa}")
        first = gpa // VHOST_LOG_PAGE
        last = (gpa + length - 1) // VHOST_LOG_PAGE
        if last >= self.pages_covered:
            raise DirtyLogError(f"page {last} is beyond the {self.pages_covered}-page log")
        log = self._log
        page = first
        while page <= last:
            byte, bit = divmod(page, 8)
            if bit == 0 and last - page >= 7:
                log[byte] = 0xFF  # a whole byte of pages at once
                page += 8
                continue
            log[byte] |= 1 << bit
            page += 1

    def is_dirty(self, page: int) -> bool:
        if not 0 <= page < self.pages_covered:
            return False
        return bool(self._log[page // 8] >> (page % 8) & 1)

    def dirty_pages(self) -> Iterator[int]:
        """Dirty page numbers in ascending order (for tests and the hypervisor)."""
        for byte, value in enumerate(self._log):
            if value:
                for bit in range(8):
                    if value >> bit & 1:
                        yield byte * 8 + bit
