"""Virtio cores (pure): guest memory, split virtqueues (device and driver side), the
queue state record, and the virtio-scsi wire formats.

* :mod:`.memory`: :class:`GuestMemory` (the interface) and :class:`RegionMemory`;
* :mod:`.layout`: split-ring layout, flags, :class:`VirtqueueConfig`, :func:`need_event`;
* :mod:`.ring`: :class:`Virtqueue`, the device side (the VF, the mediated path);
* :mod:`.driver`: :class:`SplitQueueDriver`, the driver side (the guest runtime), whose
  state lives in guest memory;
* :mod:`.state`: :class:`QueueState`, what migrates (claim B3);
* :mod:`.scsi`: virtio-scsi requests, responses, control and event structures, config;
* :mod:`.features`: transport feature bits;
* :mod:`.errors`: the error types and which side each blames.
"""

from vfdirect.core.virtio.driver import DriverLayout, SplitQueueDriver, UsedElement
from vfdirect.core.virtio.errors import (
    DeviceProtocolError,
    DriverStateError,
    GuestMemoryError,
    QueueFullError,
    VirtqueueError,
    VirtqueueFault,
    VirtqueueUsageError,
)
from vfdirect.core.virtio.features import VirtioFeature
from vfdirect.core.virtio.layout import (
    AvailFlag,
    DescFlag,
    UsedFlag,
    VirtqueueConfig,
    legacy_layout,
    need_event,
)
from vfdirect.core.virtio.memory import GuestMemory, GuestRegion, MemoryRegion, RegionMemory
from vfdirect.core.virtio.ring import DescriptorChain, Segment, Virtqueue
from vfdirect.core.virtio.state import QueueState, QueueStateError

__all__ = [
    "AvailFlag",
    "DescFlag",
    "DescriptorChain",
    "DeviceProtocolError",
    "DriverLayout",
    "DriverStateError",
    "GuestMemory",
    "GuestMemoryError",
    "GuestRegion",
    "MemoryRegion",
    "QueueFullError",
    "QueueState",
    "QueueStateError",
    "RegionMemory",
    "Segment",
    "SplitQueueDriver",
    "UsedElement",
    "UsedFlag",
    "VirtioFeature",
    "Virtqueue",
    "VirtqueueConfig",
    "VirtqueueError",
    "VirtqueueFault",
    "VirtqueueUsageError",
    "legacy_layout",
    "need_event",
]
