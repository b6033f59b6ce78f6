"""The datastore allocator (pure core): extents, vdisk layouts and zero-on-reuse.

* :mod:`.extent`: :class:`Extent`, a run of blocks on one physical LUN;
* :mod:`.layout`: :class:`VdiskLayout`, a vdisk's placements and the translation of a
  virtual range into mapped segments and holes;
* :mod:`.datastore`: :class:`Datastore`, which hands out chunks to thick and thin vdisks
  and keeps freed space dirty until the shell has zeroed it;
* :mod:`.chunkset`: the run-length set the datastore counts space with.
"""

from vfdirect.core.alloc.chunkset import ChunkSet
from vfdirect.core.alloc.datastore import DEFAULT_CHUNK_BYTES, Datastore, SpaceUsage
from vfdirect.core.alloc.errors import (
    AllocError,
    LayoutError,
    LunConfigError,
    OutOfSpaceError,
    SpaceAllocationFailed,
    UnknownVdiskError,
    VdiskExistsError,
    VirtualRangeError,
    ZeroingError,
)
from vfdirect.core.alloc.extent import Extent
from vfdirect.core.alloc.layout import Hole, MappedSegment, Placement, Segment, VdiskLayout

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "AllocError",
    "ChunkSet",
    "Datastore",
    "Extent",
    "Hole",
    "LayoutError",
    "LunConfigError",
    "MappedSegment",
    "OutOfSpaceError",
    "Placement",
    "Segment",
    "SpaceAllocationFailed",
    "SpaceUsage",
    "UnknownVdiskError",
    "VdiskExistsError",
    "VdiskLayout",
    "VirtualRangeError",
    "ZeroingError",
]
