"""The default physical LUN backend: a sparse file.

A new LUN is a file of ``num_blocks * block_size`` bytes made with ``ftruncate``: it
takes no space until written, and every block reads as zeros, so the allocator may hand
its chunks out as clean (``Datastore.lun_add(..., fresh=True)``). Zeroing punches holes
(``fallocate(PUNCH_HOLE | KEEP_SIZE)``), which also gives the space back to the file
system; where that is not supported, zeros are written.
"""

from __future__ import annotations

import os
from pathlib import Path

from vfdirect.core.array import BLOCK_SIZES
from vfdirect.storage._posixio import punch_hole
from vfdirect.storage.backend import FdBackend
from vfdirect.storage.faults import injector_for


class FileBackend(FdBackend):
    """A physical LUN kept in a (sparse) regular file."""

    def __init__(self, path: str | os.PathLike[str], block_size: int = 512) -> None:
        """Open an existing LUN file; its size must be a whole number of blocks."""
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block size {block_size} is not one of {BLOCK_SIZES}")
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size == 0 or size % block_size:
                raise ValueError(
                    f"{self.path}: size {size} is not a positive multiple of {block_size}"
                )
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd, block_size, size // block_size, str(self.path))
        # Test-only: a slow/failing disk on demand (VFDIRECT_STORAGE_FAULTS=1, see .faults).
        self._faults = injector_for(self.path)

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], block_size: int, num_blocks: int
    ) -> FileBackend:
        """Make a new sparse LUN file (refusing to overwrite one) and open it."""
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block size {block_size} is not one of {BLOCK_SIZES}")
        if num_blocks < 1:
            raise ValueError("a LUN has at least one block")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, block_size * num_blocks)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return cls(path, block_size)

    def _zero_fast(self, offset: int, length: int) -> bool:
        return punch_hole(self._fd, offset, length)
