"""The record a VF hands to the PF at ``vf_state_save`` (claims B3, B4) and takes back at
``vf_state_restore`` (claims X1, B7): its virtqueues' state and where they live.

Rules of this module (after Firecracker's device state):

* the record is plain data with a format name, a version and a CRC-32 of its canonical
  JSON body; :meth:`VfQueueRecord.from_dict` checks all three, every type and range,
  and that the file descriptor list it came with matches, before anything is trusted;
* it names guest addresses and indices, never pointers: per virtqueue a
  :class:`~vfdirect.core.virtio.QueueState` (size, guest addresses of its three areas,
  ``last_avail_idx``, ``used_idx``, heads in flight; itself versioned and checksummed);
  per memory region its guest address, size, front-end user address and the offset of the
  region in its file;
* what cannot be serialised travels beside it as file descriptors, referred to by their
  position in the list (``fd`` fields): each region's memory file, each queue's kick and
  call eventfds. Every position is used exactly once;
* claim X2: requests a VF was still executing when it saved (its drain deadline had
  passed) are heads in flight like any other, and are ALSO listed in ``executing`` with
  the saving VF's ``saver`` token. The VF will never complete them (their results are
  dropped) but their stale execution may still move data (a READ into its guest buffer,
  a WRITE to the LUN). Whoever serves the queues next must not re-execute a listed head
  before the saving VF reports its stale execution finished (``vf_drain`` of the SAVED
  VF: drained, no head left); it then drops the list. Both fields are absent (not
  empty) when nothing was executing, so records without them are unchanged.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from vfdirect.core.virtio.state import QueueState, QueueStateError

__all__ = ["VF_STATE_FORMAT", "VF_STATE_VERSION", "QueueRecord", "RegionRecord",
           "VfQueueRecord", "VfStateError"]

VF_STATE_FORMAT = "vfdirect.vf-queue-state"
VF_STATE_VERSION = 1
_U64 = 1 << 64
_SAVER = re.compile(r"[0-9a-f]{8,64}")


class VfStateError(ValueError):
    """A VF queue-state record (or the descriptors sent with it) is malformed."""


@dataclass(frozen=True, slots=True)
class RegionRecord:
    """One region of the VM's memory: ``size`` bytes at guest-physical ``gpa``, found at
    ``mmap_offset`` in the file passed as descriptor number ``fd`` of the list."""

    gpa: int
    size: int
    user_addr: int | None
    mmap_offset: int
    fd: int

    def dump(self) -> dict[str, Any]:
        return {"gpa": self.gpa, "size": self.size, "user_addr": self.user_addr,
                "mmap_offset": self.mmap_offset, "fd": self.fd}


@dataclass(frozen=True, slots=True)
class QueueRecord:
    """One virtqueue: its vring index, whether it was enabled, its state, and the
    positions of its kick and call eventfds in the descriptor list (None: polled)."""

    index: int
    enabled: bool
    state: QueueState
    kick_fd: int | None
    call_fd: int | None

    def dump(self) -> dict[str, Any]:
        return {"index": self.index, "enabled": self.enabled, "state": self.state.to_dict(),
                "kick_fd": self.kick_fd, "call_fd": self.call_fd}


@dataclass(frozen=True, slots=True)
class VfQueueRecord:
    """Everything a VF (or the hypervisor's mediated path) needs to serve the VM's
    virtqueues from where the VF stopped."""

    vf: int
    #: the virtio features the front end acknowledged (EVENT_IDX, INDIRECT_DESC, ...)
    features: int
    sense_size: int
    cdb_size: int
    regions: tuple[RegionRecord, ...]
    queues: tuple[QueueRecord, ...]
    #: events were dropped for lack of an event buffer (5.6.6.3): report EVENTS_MISSED
    events_missed: bool = False
    #: claim X2: (vring index, head) of the heads the saving VF was still executing
    #: (see the module rules); each is also in its queue's ``in_flight``
    executing: tuple[tuple[int, int], ...] = ()
    #: the token of the VF save that left ``executing`` (None iff ``executing`` is empty)
    saver: str | None = None

    def __post_init__(self) -> None:
        if bool(self.executing) != (self.saver is not None):
            raise VfStateError("executing heads and their saver token go together")

    def without_executing(self) -> VfQueueRecord:
        """This record once the saving VF reported its stale executions finished."""
        return VfQueueRecord(self.vf, self.features, self.sense_size, self.cdb_size,
                             self.regions, self.queues, self.events_missed)

    @property
    def fd_count(self) -> int:
        return len(self.regions) + sum((q.kick_fd is not None) + (q.call_fd is not None)
                                       for q in self.queues)

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "vf": self.vf, "features": self.features, "sense_size": self.sense_size,
            "cdb_size": self.cdb_size, "events_missed": self.events_missed,
            "regions": [r.dump() for r in self.regions],
            "queues": [q.dump() for q in self.queues],
        }
        if self.executing:
            body["executing"] = [list(k) for k in self.executing]
            body["saver"] = self.saver
        return body

    @staticmethod
    def _crc(body: Mapping[str, Any]) -> int:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return zlib.crc32(canonical.encode("ascii"))

    def to_dict(self) -> dict[str, Any]:
        body = self._body()
        return {"format": VF_STATE_FORMAT, "version": VF_STATE_VERSION,
                "crc32": self._crc(body), **body}

    @classmethod
    def from_dict(cls, data: Any, *, fds: int) -> VfQueueRecord:
        """Check and rebuild a record sent with ``fds`` descriptors."""
        if not isinstance(data, Mapping):
            raise VfStateError("the queue state is not an object")
        if data.get("format") != VF_STATE_FORMAT:
            raise VfStateError(f"not a {VF_STATE_FORMAT} record (format "
                               f"{data.get('format')!r})")
        version = data.get("version")
        if type(version) is not int or version != VF_STATE_VERSION:
            raise VfStateError(f"unsupported {VF_STATE_FORMAT} version {version!r}")
        expected = {"format", "version", "crc32", "vf", "features", "sense_size", "cdb_size",
                    "events_missed", "regions", "queues"}
        if "executing" in data or "saver" in data:
            expected |= {"executing", "saver"}
        if set(data) != expected:
            raise VfStateError(f"fields differ: missing {sorted(expected - set(data))}, "
                               f"unknown {sorted(set(data) - expected)}")
        body = {k: data[k] for k in expected - {"format", "version", "crc32"}}
        crc = data["crc32"]
        if type(crc) is not int:
            raise VfStateError("crc32 is not an integer")
        try:
            actual = cls._crc(body)
        except (TypeError, ValueError) as exc:
            raise VfStateError(f"the record is not plain data: {exc}") from None
        if actual != crc:
            raise VfStateError("queue state checksum mismatch")
        vf = _int(data, "vf", 0, 255)
        features = _int(data, "features", 0, _U64 - 1)
        sense_size = _int(data, "sense_size", 0, 0xFFFFFFFF)
        cdb_size = _int(data, "cdb_size", 1, 0xFFFF)
        missed = data["events_missed"]
        if type(missed) is not bool:
            raise VfStateError("events_missed is not a boolean")
        regions = tuple(_region(r, i) for i, r in enumerate(_list(data, "regions", 8)))
        queues = tuple(_queue(q, i) for i, q in enumerate(_list(data, "queues", 256)))
        if len({q.index for q in queues}) != len(queues):
            raise VfStateError("a vring index appears twice")
        used = [r.fd for r in regions] + [f for q in queues for f in (q.kick_fd, q.call_fd)
                                          if f is not None]
        if sorted(used) != list(range(fds)):
            raise VfStateError(f"the record names descriptors {sorted(used)}, but "
                               f"{fds} came with it (each position 0..{fds - 1} exactly once)")
        spans = sorted((r.gpa, r.gpa + r.size) for r in regions)
        for (_, end), (start, _) in pairwise(spans):
            if start < end:
                raise VfStateError("memory regions overlap")
        executing: tuple[tuple[int, int], ...] = ()
        saver: str | None = None
        if "executing" in data:
            executing = _executing(data["executing"], queues)
            saver = data["saver"]
            if type(saver) is not str or not _SAVER.fullmatch(saver):
                raise VfStateError(f"saver must be 8..64 lowercase hex digits, not {saver!r}")
        return cls(vf, features, sense_size, cdb_size, regions, queues, missed, executing,
                   saver)


def _executing(value: Any, queues: tuple[QueueRecord, ...]) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= 256 * 1024:
        raise VfStateError("executing must be a non-empty list of [vring index, head]")
    in_flight = {q.index: set(q.state.in_flight) for q in queues}
    out: list[tuple[int, int]] = []
    for i, item in enumerate(value):
        if not isinstance(item, list) or len(item) != 2 or \
                any(type(x) is not int for x in item):
            raise VfStateError(f"executing[{i}] must be [vring index, head]")
        index, head = item
        if head not in in_flight.get(index, ()):
            raise VfStateError(f"executing[{i}]: head {head} is not in flight on vring "
                               f"{index}")
        out.append((index, head))
    if len(set(out)) != len(out):
        raise VfStateError("a head is listed twice in executing")
    return tuple(out)


def _int(data: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = data.get(name)
    if type(value) is not int or not low <= value <= high:
        raise VfStateError(f"{name} must be an integer in {low}..{high}, not {value!r}")
    return value


def _list(data: Mapping[str, Any], name: str, limit: int) -> list[Any]:
    value = data.get(name)
    if not isinstance(value, list) or len(value) > limit:
        raise VfStateError(f"{name} must be a list of at most {limit} items")
    return value


def _fd(data: Mapping[str, Any], name: str, where: str, optional: bool) -> int | None:
    value = data.get(name)
    if value is None and optional:
        return None
    if type(value) is not int or not 0 <= value < 64:
        raise VfStateError(f"{where}: {name} must be a descriptor position, not {value!r}")
    return value


def _region(data: Any, i: int) -> RegionRecord:
    where = f"regions[{i}]"
    if not isinstance(data, Mapping) or set(data) != {"gpa", "size", "user_addr",
                                                       "mmap_offset", "fd"}:
        raise VfStateError(f"{where} must be an object with gpa, size, user_addr, "
                           "mmap_offset, fd")
    gpa = _int(data, "gpa", 0, _U64 - 1)
    size = _int(data, "size", 1, _U64 - 1)
    offset = _int(data, "mmap_offset", 0, _U64 - 1)
    user = data["user_addr"]
    if user is not None and (type(user) is not int or not 0 <= user < _U64):
        raise VfStateError(f"{where}: user_addr must be a 64-bit address or null")
    if gpa + size > _U64 or offset + size > _U64 or (user is not None and user + size > _U64):
        raise VfStateError(f"{where} wraps the 64-bit space")
    fd = _fd(data, "fd", where, optional=False)
    assert fd is not None
    return RegionRecord(gpa, size, user, offset, fd)


def _queue(data: Any, i: int) -> QueueRecord:
    where = f"queues[{i}]"
    if not isinstance(data, Mapping) or set(data) != {"index", "enabled", "state",
                                                       "kick_fd", "call_fd"}:
        raise VfStateError(f"{where} must be an object with index, enabled, state, kick_fd, "
                           "call_fd")
    index = _int(data, "index", 0, 255)
    enabled = data["enabled"]
    if type(enabled) is not bool:
        raise VfStateError(f"{where}: enabled must be a boolean")
    try:
        state = QueueState.from_dict(data["state"])
    except QueueStateError as exc:
        raise VfStateError(f"{where}: {exc}") from None
    return QueueRecord(index, enabled, state, _fd(data, "kick_fd", where, optional=True),
                       _fd(data, "call_fd", where, optional=True))
