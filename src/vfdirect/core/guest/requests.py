"""The virtio-scsi driver's outstanding-request table, in guest memory (pure).

Rules of this module:

* one 512-byte entry per tag (``GuestLayout.request_entry(tag)``); the tag's data buffer
  is slot ``tag`` of the pool. The entry holds the bookkeeping AND the bytes the device
  reads and writes (request header, response header, TMF request and response), so that
  a request is entirely described by guest memory;
* an entry's ``state`` word is its commit point, one aligned 32-bit store, always the
  LAST store of a transition (fields first, then the state):
  ``FREE -> PREPARED`` (fields, header and data written; not yet visible to the device)
  ``-> SUBMITTED`` (published in its vring) ``-> DONE`` (the device's used element was
  recorded here, BEFORE the ring's used entry is consumed) ``-> FREE`` (the owner took
  the completion). A process killed between any two stores leaves a state that
  :meth:`RequestTable.reconcile` resolves against the rings;
* the table is reached through one zero-copy view taken when the table object is made
  (it lies in one region, checked then); each commit is one aligned store through a
  cast view, as the rings do (see :mod:`vfdirect.core.virtio.memory`).

Entry layout (little-endian)::

    +0x00 u32 state          +0x04 u16 vring       +0x06 u16 head
    +0x08 u64 virtio-scsi tag (generation << 16 | tag index)
    +0x10 u64 cookie (the submitter's, e.g. a journal sequence number)
    +0x18 u8  target         +0x19 u8 reserved     +0x1A u16 LUN
    +0x1C u32 data length (data-out bytes, or data-in capacity)
    +0x20 u32 slot           +0x24 u32 used length (from the used element)
    +0x28 u32 generation     +0x2C u16 flags (ReqFlag)
    +0x2E u8  TMF response   +0x2F u8 CDB length
    +0x40 TMF request (virtio_scsi_ctrl_tmf, 24 bytes)   +0x58 TMF response (1 byte)
    +0x60 command request header (19 + cdb_size bytes, cdb_size <= 141)
    +0x100 command response header (12 + sense_size bytes, sense_size <= 244)
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from vfdirect.core.guest.layout import REQUEST_ENTRY_BYTES, GuestLayout
from vfdirect.core.virtio.errors import DriverStateError
from vfdirect.core.virtio.memory import GuestMemory

__all__ = [
    "MAX_CDB_SIZE",
    "MAX_SENSE_SIZE",
    "REQ_HEADER_OFFSET",
    "RESP_HEADER_OFFSET",
    "TMF_REQ_OFFSET",
    "TMF_RESP_OFFSET",
    "ReqFlag",
    "ReqState",
    "RequestEntry",
    "RequestTable",
]

TMF_REQ_OFFSET = 0x40
TMF_RESP_OFFSET = 0x58
REQ_HEADER_OFFSET = 0x60
RESP_HEADER_OFFSET = 0x100
MAX_CDB_SIZE = RESP_HEADER_OFFSET - REQ_HEADER_OFFSET - 19
MAX_SENSE_SIZE = REQUEST_ENTRY_BYTES - RESP_HEADER_OFFSET - 12
_FIELDS = struct.Struct("<IHHQQBBHIIIIHBB")  # 0x00-0x2F
_LITTLE = sys.byteorder == "little"


class ReqState(IntEnum):
    FREE = 0
    PREPARED = 1
    SUBMITTED = 2
    DONE = 3


class ReqFlag(IntFlag):
    DATA_OUT = 1
    DATA_IN = 2
    #: the command timed out; an ABORT TASK was (or is to be) posted
    TIMED_OUT = 4
    #: the ABORT TASK TMF is in the control queue
    ABORT_POSTED = 8
    #: the ABORT TASK TMF completed (its response is at +0x2E)
    ABORT_DONE = 16
    #: the owner released the tag while its ABORT TASK was still in flight
    RELEASED = 32


@dataclass(frozen=True, slots=True)
class RequestEntry:
    """A decoded entry (a copy; guest memory stays the truth)."""

    tag: int
    state: ReqState
    vring: int
    head: int
    scsi_tag: int
    cookie: int
    target: int
    lun: int
    data_len: int
    slot: int
    used_len: int
    generation: int
    flags: int
    tmf_response: int
    cdb_len: int


class RequestTable:
    """Typed access to the request table of one guest memory (through ONE zero-copy view
    of the table, taken once; the table lies in one region)."""

    def __init__(self, memory: GuestMemory, layout: GuestLayout) -> None:
        self._memory = memory
        self._layout = layout
        self._tags = layout.params.tags
        self._base = layout.request_table_addr
        self._view = memory.view(self._base, self._tags * REQUEST_ENTRY_BYTES)
        self._u32 = self._view.cast("I")
        self._u16 = self._view.cast("H")

    @property
    def tags(self) -> int:
        return self._tags

    @property
    def view(self) -> memoryview:
        """The whole table (zero-copy)."""
        return self._view

    def addr(self, tag: int) -> int:
        if not 0 <= tag < self._tags:
            raise IndexError(f"tag {tag} out of range")
        return self._base + tag * REQUEST_ENTRY_BYTES

    def _off(self, tag: int) -> int:
        if not 0 <= tag < self._tags:
            raise IndexError(f"tag {tag} out of range")
        return tag * REQUEST_ENTRY_BYTES

    def read(self, tag: int) -> RequestEntry:
        (state, vring, head, scsi_tag, cookie, target, _r, lun, data_len, slot, used_len,
         generation, flags, tmf_response, cdb_len) = _FIELDS.unpack_from(self._view,
                                                                          self._off(tag))
        if state >= len(_STATES):
            raise DriverStateError(f"request {tag}: state word {state} is not a state")
        return RequestEntry(tag, _STATES[state], vring, head, scsi_tag, cookie, target, lun,
                            data_len, slot, used_len, generation, flags, tmf_response,
                            cdb_len)

    def state(self, tag: int) -> int:
        return _le(self._u32[self._off(tag) // 4], 4)

    def flags(self, tag: int) -> int:
        return _le(self._u16[(self._off(tag) + 0x2C) // 2], 2)

    def generation(self, tag: int) -> int:
        return _le(self._u32[(self._off(tag) + 0x28) // 4], 4)

    # -- transitions (each ends with its commit store) ------------------------------------

    def prepare(self, tag: int, *, vring: int, scsi_tag: int, cookie: int, target: int,
                lun: int, data_len: int, flags: int, generation: int, cdb_len: int,
                request_header: bytes) -> None:
        """Fill a FREE entry (fields, request header) and commit PREPARED."""
        off = self._off(tag)
        fields = _FIELDS.pack(0, vring, 0, scsi_tag, cookie, target, 0, lun, data_len, tag,
                              0, generation, int(flags), 0, cdb_len)
        view = self._view
        view[off + 4:off + _FIELDS.size] = fields[4:]
        view[off + REQ_HEADER_OFFSET:off + REQ_HEADER_OFFSET + len(request_header)] = \
            request_header
        self._u32[off // 4] = _le(ReqState.PREPARED, 4)  # commit

    def set_head(self, tag: int, head: int) -> None:
        self._u16[(self._off(tag) + 0x06) // 2] = _le(head, 2)

    def set_flags(self, tag: int, flags: int) -> None:
        self._u16[(self._off(tag) + 0x2C) // 2] = _le(int(flags), 2)

    def set_tmf_response(self, tag: int, response: int) -> None:
        self._view[self._off(tag) + 0x2E] = response & 0xFF

    def commit(self, tag: int, state: ReqState) -> None:
        self._u32[self._off(tag) // 4] = _le(int(state), 4)

    def complete(self, tag: int, used_len: int) -> None:
        """Record the device's used length, then commit DONE."""
        off = self._off(tag)
        self._u32[(off + 0x24) // 4] = _le(used_len, 4)
        self._u32[off // 4] = _le(ReqState.DONE, 4)

    def clear(self) -> None:
        """Zero the whole table (first boot)."""
        self._view[:] = bytes(len(self._view))


_STATES = tuple(ReqState)


def _le(value: int, size: int) -> int:
    if _LITTLE:
        return value
    return int.from_bytes(value.to_bytes(size, "little"), "big")  # pragma: no cover
