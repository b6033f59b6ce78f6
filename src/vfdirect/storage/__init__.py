"""Physical storage (shell): LUN backends, storage arrays and the vdisk data path.

* :mod:`.backend`: :class:`LunBackend`, the contract; :mod:`.file` (sparse file, the
  default), :mod:`.blockdev` (an existing block device) and :mod:`.memory` implement it;
* :mod:`.array`: :class:`StorageArray`, a WWN, target ports and LUNs in a directory;
* :mod:`.pool`: :class:`LunPool`, open backends by LUN key; zeroing of freed space;
* :mod:`.vdisk`: :class:`VdiskBlockDevice`, a virtual disk reached through the fabric.
"""

from vfdirect.storage.array import (
    ArrayMetadataError,
    BackingKind,
    LunEntry,
    LunExistsError,
    StorageArray,
    StorageError,
    UnknownLunError,
)
from vfdirect.storage.backend import LunBackend
from vfdirect.storage.blockdev import BlockDeviceBackend
from vfdirect.storage.file import FileBackend
from vfdirect.storage.memory import MemoryBackend
from vfdirect.storage.pool import LunPool, scrub, vdisk_delete
from vfdirect.storage.vdisk import ThinAllocator, VdiskBlockDevice, open_vdisk

__all__ = [
    "ArrayMetadataError",
    "BackingKind",
    "BlockDeviceBackend",
    "FileBackend",
    "LunBackend",
    "LunEntry",
    "LunExistsError",
    "LunPool",
    "MemoryBackend",
    "StorageArray",
    "StorageError",
    "ThinAllocator",
    "UnknownLunError",
    "VdiskBlockDevice",
    "open_vdisk",
    "scrub",
    "vdisk_delete",
]
