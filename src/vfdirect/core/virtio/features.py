"""Virtio feature bits (VIRTIO 1.x 6 "Reserved Feature Bits", 5.6.3 for virtio-scsi).

A feature is a bit *number*; :func:`bit` turns it into a mask, :func:`has` tests a mask.
Device-type bits (0 to 23) are in :mod:`vfdirect.core.virtio.scsi`.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

__all__ = ["VirtioFeature", "bit", "has", "mask"]


class VirtioFeature(IntEnum):
    """Transport and ring feature bit numbers (VIRTIO 1.x 6)."""

    #: Legacy: notify even when the available ring is empty (6.3, legacy interface).
    NOTIFY_ON_EMPTY = 24
    #: Legacy: the device accepts arbitrary message framing (6.3; implied by VERSION_1).
    ANY_LAYOUT = 27
    #: Indirect descriptors, 2.7.5.3.
    RING_INDIRECT_DESC = 28
    #: used_event / avail_event notification suppression, 2.7.7 and 2.7.10.
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    #: The device sits behind a platform IOMMU (formerly IOMMU_PLATFORM).
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40
    ADMIN_VQ = 41


def bit(feature: int) -> int:
    """The mask of one feature bit number."""
    return 1 << int(feature)


def mask(features: Iterable[int]) -> int:
    """The mask of several feature bit numbers."""
    result = 0
    for feature in features:
        result |= 1 << int(feature)
    return result


def has(features: int, feature: int) -> bool:
    """Whether the mask ``features`` has bit number ``feature``."""
    return bool(features >> int(feature) & 1)
