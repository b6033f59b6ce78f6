"""A physical LUN on an existing block device (a disk partition, a loop device...).

Geometry comes from the device itself: the logical block size from ``BLKSSZGET`` and the
size from ``BLKGETSIZE64``. IO goes through the page cache like the file backend's;
zeroing uses ``BLKZEROOUT`` (which drops the cached pages of the range), or writes zeros.
The device's previous content is unknown, so its chunks join a datastore dirty
(``Datastore.lun_add(..., fresh=False)``) and are zeroed before first use.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vfdirect.core.array import BLOCK_SIZES
from vfdirect.storage._posixio import blk_zeroout, blockdev_geometry
from vfdirect.storage.backend import FdBackend


class BlockDeviceBackend(FdBackend):
    """A physical LUN that is a whole block device, opened read-write."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if not stat.S_ISBLK(os.fstat(fd).st_mode):
                raise ValueError(f"{self.path} is not a block device")
            block_size, size = blockdev_geometry(fd)
            if block_size not in BLOCK_SIZES:
                raise ValueError(f"{self.path}: logical block size {block_size} unsupported")
            if size < block_size:
                raise ValueError(f"{self.path}: device is empty")
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd, block_size, size // block_size, str(self.path))

    def _zero_fast(self, offset: int, length: int) -> bool:
        return blk_zeroout(self._fd, offset, length)
