"""Errors of the datastore allocator.

* :class:`AllocError` and its subclasses: a control-plane operation (create, delete,
  allocate, mark zeroed, load) was refused; the allocator's state is unchanged;
* :class:`SpaceAllocationFailed` and :class:`VirtualRangeError` are
  :class:`~vfdirect.core.block.BlockError` s, raised on the data path of a virtual disk,
  so that the IO executor turns them into sense at its one place.
"""

from __future__ import annotations

from vfdirect.core.block import BlockError, BlockRangeError


class AllocError(Exception):
    """An allocator operation was refused; nothing changed."""


class OutOfSpaceError(AllocError):
    """Not enough clean free space for the request. Space that is free but still waits
    for zeroing (see :meth:`Datastore.pending_zero`) is counted apart, so the message
    says when scrubbing would help."""

    def __init__(self, message: str, *, needed_blocks: int, free_blocks: int,
                 dirty_blocks: int) -> None:
        super().__init__(message)
        self.needed_blocks = needed_blocks
        self.free_blocks = free_blocks
        self.dirty_blocks = dirty_blocks


class UnknownVdiskError(AllocError, KeyError):
    """No virtual disk with that id in the datastore."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class VdiskExistsError(AllocError):
    """A virtual disk with that id already exists in the datastore."""


class LunConfigError(AllocError, ValueError):
    """A physical LUN cannot join or leave the datastore (block size, duplicate, in use)."""


class ZeroingError(AllocError, ValueError):
    """:meth:`Datastore.mark_zeroed` was given a range that is not waiting for zeroing."""


class LayoutError(AllocError, ValueError):
    """A virtual disk layout or a dump is malformed."""


class SpaceAllocationFailed(BlockError):
    """A write to an unallocated chunk of a thin virtual disk found no free space: SBC-3
    logical block provisioning's DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT
    (27h/07h). Raised by the data path; the write did not happen."""


class VirtualRangeError(BlockRangeError):
    """A virtual LBA range does not fit in the virtual disk."""
