"""The block-device interface every executor of SCSI commands works against.

A physical LUN backend (file, block device), the VF's translated view of a virtual disk
and test doubles all provide :class:`BlockDevice`. Data moves through caller-owned
buffers (``memoryview`` objects, for instance slices of mapped guest memory), so that a
read lands in its final place with no intermediate copy.

Failures are reported with the exceptions below; executors turn them into SCSI sense at
one place (:mod:`vfdirect.core.scsi.lu`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


class BlockError(Exception):
    """Base class of the failures a block device reports for one IO."""


class MediumError(BlockError):
    """The medium could not be read or written (the backing store returned EIO)."""

    def __init__(self, message: str, *, write: bool) -> None:
        super().__init__(message)
        self.write = write


class AccessDenied(BlockError):
    """The fabric refused the IO: the initiator port is not logged in, not zoned with the
    array port, or the LUN is not masked to it."""


class BlockRangeError(BlockError):
    """An IO outside the device's capacity reached the device (a bug in the caller: SCSI
    executors check ranges before calling)."""


@runtime_checkable
class BlockDevice(Protocol):
    """A fixed-size array of ``num_blocks`` blocks of ``block_size`` bytes.

    ``bufs`` passed to :meth:`read_blocks`/:meth:`write_blocks` together hold a whole
    number of blocks; the IO covers ``sum(len(b) for b in bufs) // block_size`` blocks
    starting at ``lba``. Implementations must not keep references to the buffers after
    returning.
    """

    @property
    def block_size(self) -> int: ...

    @property
    def num_blocks(self) -> int: ...

    def read_blocks(self, lba: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` with the blocks starting at ``lba``."""

    def write_blocks(self, lba: int, bufs: Sequence[memoryview], *, fua: bool = False) -> None:
        """Write ``bufs`` starting at ``lba``; with ``fua`` the data is on stable storage
        before this returns (SBC-3 FUA)."""

    def flush(self) -> None:
        """Make every completed write durable (SYNCHRONIZE CACHE)."""
