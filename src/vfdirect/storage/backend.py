"""What a physical LUN backend is, and the part the descriptor-based ones share.

A :class:`LunBackend` is a :class:`~vfdirect.core.block.BlockDevice` that can also zero a
range (so that freed extents read as zeros for their next owner) and be closed. Three
implementations pass one conformance suite (``tests/storage/test_storage_backends.py``):
:class:`~.memory.MemoryBackend`, :class:`~.file.FileBackend` (sparse file, the default)
and :class:`~.blockdev.BlockDeviceBackend` (an existing block device, e.g. a loop device).

Common rules, enforced by every backend:

* an IO whose range leaves ``[0, num_blocks)`` raises
  :class:`~vfdirect.core.block.BlockRangeError` before touching anything;
* buffers whose total length is not a whole number of blocks are a caller's bug
  (``ValueError``); so is any IO on a closed backend;
* ``write_blocks(..., fua=True)`` returns only once the data is durable (SBC-3 FUA);
  ``flush()`` makes all completed writes durable (SYNCHRONIZE CACHE).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from vfdirect.core.block import BlockDevice, BlockRangeError
from vfdirect.storage._posixio import Writer, preadv_full, total_bytes
from vfdirect.storage.faults import FaultInjector, VolatileCache


@runtime_checkable
class LunBackend(BlockDevice, Protocol):
    """A physical LUN's block store."""

    def zero_blocks(self, lba: int, count: int) -> None:
        """Make ``[lba, lba + count)`` read as zeros, durably."""

    def close(self) -> None:
        """Release the backing store; idempotent."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def check_io(lba: int, nbytes: int, block_size: int, num_blocks: int, what: str) -> int:
    """Blocks covered by an IO of ``nbytes`` at ``lba``, after checking its range."""
    count, rest = divmod(nbytes, block_size)
    if rest:
        raise ValueError(f"{what}: {nbytes} bytes is not whole {block_size}-byte blocks")
    if lba < 0 or lba + count > num_blocks:
        raise BlockRangeError(f"{what}: blocks [{lba}, {lba + count}) outside [0, {num_blocks})")
    return count


class FdBackend:
    """Shared IO of the backends that hold a file descriptor (file, block device)."""

    def __init__(self, fd: int, block_size: int, num_blocks: int, name: str) -> None:
        self._fd = fd
        self._block_size = block_size
        self._num_blocks = num_blocks
        self._name = name
        self._writer = Writer(fd)
        #: Test-only fault injection (:mod:`.faults`); None (the norm) costs one test per IO.
        self._faults: FaultInjector | None = None

    # -- BlockDevice -------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        self._check_open()
        return self._fd

    def read_blocks(self, lba: int, bufs: Sequence[memoryview]) -> None:
        self._check_open()
        nbytes = total_bytes(bufs)
        check_io(lba, nbytes, self._block_size, self._num_blocks, self._name)
        if self._faults is not None:
            cache = self._fault(f"read at block {lba}", write=False)
            if cache is not None:  # test-only volatile write cache (.faults)
                fd, offset = self._fd, lba * self._block_size
                cache.read(lba, bufs, lambda: preadv_full(fd, bufs, offset, nbytes))
                return
        preadv_full(self._fd, bufs, lba * self._block_size, nbytes)

    def write_blocks(self, lba: int, bufs: Sequence[memoryview], *, fua: bool = False) -> None:
        self._check_open()
        nbytes = total_bytes(bufs)
        check_io(lba, nbytes, self._block_size, self._num_blocks, self._name)
        if self._faults is not None:
            cache = self._fault(f"write at block {lba}", write=True)
            if cache is not None:  # test-only volatile write cache (.faults)
                cache.write(self._writer, lba, bufs, fua=fua)
                return
        self._writer.write(bufs, lba * self._block_size, nbytes, fua=fua)

    def _fault(self, what: str, *, write: bool) -> VolatileCache | None:
        """Run the injected faults of this IO (``self._faults`` is set); the volatile
        write cache the IO goes through, if the faults ask for one."""
        assert self._faults is not None
        spec = self._faults.before_io(f"{self._name}: {what}", write=write)
        return self._faults.cache(spec, self._block_size, self._writer)

    def flush(self) -> None:
        self._check_open()
        if self._faults is not None:
            cache = self._fault("flush", write=True)
            if cache is not None:  # test-only volatile write cache (.faults)
                cache.flush(self._writer)
                return
        self._writer.sync()

    # -- LunBackend --------------------------------------------------------------------

    def zero_blocks(self, lba: int, count: int) -> None:
        self._check_open()
        if count < 0:
            raise ValueError(f"{self._name}: negative block count {count}")
        check_io(lba, count * self._block_size, self._block_size, self._num_blocks, self._name)
        if self._faults is not None:
            cache = self._fault(f"zero at block {lba}", write=True)
            if cache is not None:
                cache.discard(lba, count)
        offset, length = lba * self._block_size, count * self._block_size
        if not self._zero_fast(offset, length):
            self._writer.write_zeros(offset, length)
        # Zeroing precedes handing the space to a new owner: make it stick.
        self._writer.sync()

    def _zero_fast(self, offset: int, length: int) -> bool:
        """Zero by releasing space; False to fall back to writing zeros."""
        return False

    def close(self) -> None:
        if self._fd >= 0:
            if self._faults is not None:
                self._faults.close(self._writer)
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ValueError(f"{self._name}: backend is closed")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._name!r}, block_size={self._block_size}, "
            f"num_blocks={self._num_blocks}{', closed' if self._fd < 0 else ''})"
        )
