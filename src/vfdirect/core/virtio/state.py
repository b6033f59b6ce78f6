"""The queue state record (SYSTEM.md 2 "Queue state"; claim B3: "state information
indicative of locations of requests in the request queue").

Rules of this module:

* a :class:`QueueState` holds guest addresses and indices, never pointers or buffers
  (Firecracker/Cloud Hypervisor style): the queue's size and the guest-physical addresses
  of its three areas, the negotiated ring features, the device's private
  ``last_avail_idx`` and ``used_idx``, and the heads popped but not yet used (in the
  order they were popped);
* it is checked when built, so that a record that exists is consistent: every popped
  head gets exactly one used element, hence ``len(in_flight) == last_avail_idx -
  used_idx (mod 2^16)``; heads are distinct and below the queue size;
* :meth:`QueueState.to_dict` gives plain data with a format name, a version and a CRC;
  :meth:`QueueState.from_dict` checks format, version, checksum, types and ranges before
  it trusts anything, and raises :class:`QueueStateError` otherwise.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vfdirect.core.virtio.errors import VirtqueueError, VirtqueueFault
from vfdirect.core.virtio.layout import VirtqueueConfig, is_valid_queue_size

__all__ = ["QUEUE_STATE_FORMAT", "QUEUE_STATE_VERSION", "QueueState", "QueueStateError"]

QUEUE_STATE_FORMAT = "vfdirect.virtqueue-state"
QUEUE_STATE_VERSION = 1


class QueueStateError(VirtqueueError):
    """A queue state record (or its plain-data form) is malformed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, fault=VirtqueueFault.BAD_STATE)


@dataclass(frozen=True, slots=True)
class QueueState:
    """Everything needed to resume serving one split virtqueue from guest memory."""

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    last_avail_idx: int
    used_idx: int
    in_flight: tuple[int, ...] = ()
    event_idx: bool = False
    indirect: bool = False

    def __post_init__(self) -> None:
        if not is_valid_queue_size(self.size):
            raise QueueStateError(f"queue size {self.size} is not a power of 2 in 1..32768")
        for name in ("desc_addr", "avail_addr", "used_addr"):
            value = getattr(self, name)
            if not 0 <= value < 1 << 64:
                raise QueueStateError(f"{name} {value!r} is not a 64-bit address")
        for name in ("last_avail_idx", "used_idx"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFF:
                raise QueueStateError(f"{name} {value!r} is not a 16-bit index")
        if len(set(self.in_flight)) != len(self.in_flight):
            raise QueueStateError("a head is in flight twice")
        for head in self.in_flight:
            if not 0 <= head < self.size:
                raise QueueStateError(f"in-flight head {head} is not below size {self.size}")
        outstanding = (self.last_avail_idx - self.used_idx) & 0xFFFF
        if outstanding != len(self.in_flight):
            raise QueueStateError(
                f"{len(self.in_flight)} heads in flight, but last_avail_idx "
                f"{self.last_avail_idx} - used_idx {self.used_idx} = {outstanding}")
        try:
            self.config  # noqa: B018 (validates alignment too)
        except VirtqueueError as exc:
            raise QueueStateError(str(exc)) from exc

    @property
    def config(self) -> VirtqueueConfig:
        return VirtqueueConfig(self.size, self.desc_addr, self.avail_addr, self.used_addr,
                               event_idx=self.event_idx, indirect=self.indirect)

    # -- plain data -----------------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "desc_addr": self.desc_addr,
            "avail_addr": self.avail_addr,
            "used_addr": self.used_addr,
            "event_idx": self.event_idx,
            "indirect": self.indirect,
            "last_avail_idx": self.last_avail_idx,
            "used_idx": self.used_idx,
            "in_flight": list(self.in_flight),
        }

    @staticmethod
    def _crc(body: Mapping[str, Any]) -> int:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return zlib.crc32(canonical.encode("ascii"))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready data: ``format``, ``version``, ``crc32`` and the fields."""
        body = self._body()
        return {"format": QUEUE_STATE_FORMAT, "version": QUEUE_STATE_VERSION,
                "crc32": self._crc(body), **body}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QueueState:
        """Check and rebuild a record made by :meth:`to_dict`."""
        if not isinstance(data, Mapping):
            raise QueueStateError("queue state is not a mapping")
        if data.get("format") != QUEUE_STATE_FORMAT:
            raise QueueStateError(f"not a queue state record: format {data.get('format')!r}")
        version = data.get("version")
        if type(version) is not int or version != QUEUE_STATE_VERSION:
            raise QueueStateError(f"unsupported queue state version {version!r}")
        expected = {"format", "version", "crc32", "size", "desc_addr", "avail_addr",
                    "used_addr", "event_idx", "indirect", "last_avail_idx", "used_idx",
                    "in_flight"}
        if set(data) != expected:
            raise QueueStateError(f"queue state fields differ: missing "
                                  f"{sorted(expected - set(data))}, unknown "
                                  f"{sorted(set(data) - expected)}")
        ints = {}
        for name in ("size", "desc_addr", "avail_addr", "used_addr", "last_avail_idx",
                     "used_idx", "crc32"):
            value = data[name]
            if type(value) is not int:
                raise QueueStateError(f"{name} is not an integer: {value!r}")
            ints[name] = value
        flags = {}
        for name in ("event_idx", "indirect"):
            value = data[name]
            if type(value) is not bool:
                raise QueueStateError(f"{name} is not a boolean: {value!r}")
            flags[name] = value
        heads = data["in_flight"]
        if not isinstance(heads, list | tuple) or any(type(h) is not int for h in heads):
            raise QueueStateError("in_flight is not a list of integers")
        if len(heads) > ints["size"]:
            raise QueueStateError("more heads in flight than the queue size")
        body = {name: data[name] for name in expected - {"format", "version", "crc32"}}
        body["in_flight"] = list(heads)
        if cls._crc(body) != ints["crc32"]:
            raise QueueStateError("queue state checksum mismatch")
        return cls(size=ints["size"], desc_addr=ints["desc_addr"],
                   avail_addr=ints["avail_addr"], used_addr=ints["used_addr"],
                   last_avail_idx=ints["last_avail_idx"], used_idx=ints["used_idx"],
                   in_flight=tuple(heads), event_idx=flags["event_idx"],
                   indirect=flags["indirect"])
