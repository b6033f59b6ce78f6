"""Errors of the virtio cores.

Rules of this module (after h11's split between "you did something illegal" and "the
peer did"):

* :class:`GuestMemoryError`: an access fell outside the granted guest memory;
* :class:`VirtqueueError` (with its :class:`VirtqueueFault` hint): the *driver* (the
  guest) put something malformed in shared memory. The device side raises only this for
  anything it reads from a ring; the VF answers it by entering its error state (VIRTIO
  1.x 2.1.2, DEVICE_NEEDS_RESET). It is never ``IndexError`` or ``struct.error``;
* :class:`DeviceProtocolError`: the *device* broke the ring protocol (driver side sees a
  used element for a head it never made available, a used index that jumped too far);
* :class:`DriverStateError`: the driver state kept in guest memory is not a valid state
  (wrong magic, version, or inconsistent with the rings) so a driver cannot attach;
* :class:`VirtqueueUsageError` and :class:`QueueFullError`: our own caller misused the
  API (pushing a head that is not in flight, adding to a full queue). These are bugs or
  back-pressure on our side, never the peer's fault.
"""

from __future__ import annotations

from enum import Enum


class GuestMemoryError(Exception):
    """An access to guest-physical (or front-end user) addresses outside the granted
    regions, across a hole between regions, or misaligned where alignment is required."""

    def __init__(self, message: str, *, address: int = 0, length: int = 0) -> None:
        super().__init__(message)
        self.address = address
        self.length = length


class VirtqueueFault(Enum):
    """What was wrong in the shared ring: a machine-readable hint carried by
    :class:`VirtqueueError` (for logs, statistics and the VF error record)."""

    BAD_CONFIG = "bad queue configuration"
    BAD_AVAIL_IDX = "available index moved by more than the queue size"
    BAD_HEAD = "head index out of range"
    BAD_NEXT = "next index out of range"
    DUPLICATE_HEAD = "head already in flight"
    LOOP = "descriptor chain loops"
    CHAIN_TOO_LONG = "descriptor chain longer than the queue size"
    OUT_OF_BOUNDS = "buffer outside guest memory"
    INDIRECT_NOT_NEGOTIATED = "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC"
    INDIRECT_WITH_NEXT = "indirect descriptor with VIRTQ_DESC_F_NEXT"
    NESTED_INDIRECT = "indirect descriptor inside an indirect table"
    BAD_INDIRECT_LEN = "indirect table length not a non-zero multiple of 16"
    READABLE_AFTER_WRITABLE = "device-readable descriptor after a device-writable one"
    BAD_STATE = "queue state record is invalid"


class VirtqueueError(Exception):
    """The driver put something malformed in a virtqueue; the VF enters its error state."""

    def __init__(self, message: str, *, fault: VirtqueueFault, head: int | None = None) -> None:
        super().__init__(message)
        self.fault = fault
        self.head = head


class VirtqueueUsageError(ValueError):
    """Our caller misused a ring object (a bug on our side, not the peer's)."""


class QueueFullError(VirtqueueUsageError):
    """The driver has not enough free descriptors for the chain; reap completions first."""


class DeviceProtocolError(Exception):
    """The device broke the split-ring protocol (seen by the driver side)."""


class DriverStateError(Exception):
    """The driver state block in guest memory is missing, of another version, or does not
    agree with the rings; no driver can attach to it."""
