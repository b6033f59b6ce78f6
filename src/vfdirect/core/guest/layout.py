"""Guest memory layout of a vfdirect VM (pure): where everything that must survive the VM
process lives.

Rules of this module:

* guest-physical address == offset in the memory file (one region, starting at 0);
* the layout is a pure function of :class:`LayoutParams`; the parameters are recorded in
  the **guest header** (page 1) at first boot, so a restarted VM process (``vm-run
  --restart``) finds the same layout without being told. The header carries a magic, a
  version and a CRC-32 and is checked before it is trusted (:class:`GuestLayoutError`);
* ALL driver state that must survive the process lives in the areas below; the process
  keeps only caches it can rebuild from them.

The map (addresses for the defaults; every area starts page-aligned)::

    0x000000  page 0   firmware table (claim A8), written by the hypervisor
    0x001000  page 1   guest header: magic "VFDG", version, LayoutParams, CRC, boot count
    0x002000           request table: ``tags`` entries of 512 bytes (see
                       :mod:`vfdirect.core.guest.requests`): tag -> state, vring, head,
                       target, LUN, CDB, buffer slot, and the request/response headers
    ...                virtqueues, each a :class:`~vfdirect.core.virtio.DriverLayout`
                       (descriptor table, avail ring, used ring, driver state block,
                       indirect tables): vring 0 control, 1 event, 2.. request queues
    ...                event buffers: ``event_queue_size`` x 64 bytes
    ...                data buffer pool: ``tags`` fixed slots of ``slot_size`` bytes; the
                       slot of tag ``t`` is slot ``t``
    ...                workload journal: ``journal_size`` bytes
                       (:mod:`vfdirect.core.guest.journal`)
    ...                the rest of guest memory (free)

Guest header (page 1, little-endian)::

    +0x00 u32 magic 0x47444656 ("VFDG")   +0x04 u16 version (1)   +0x06 u16 size (0x38)
    +0x08 u64 memory size
    +0x10 u16 request queues  +0x12 u16 queue size  +0x14 u16 control queue size
    +0x16 u16 event queue size
    +0x18 u32 tags            +0x1C u32 slot size
    +0x20 u64 journal size
    +0x28 u16 max indirect    +0x2A u16 reserved  +0x2C u32 CRC-32 of bytes 0x00-0x2B
    +0x30 u32 boot count      +0x34 u32 reserved
    ---- outside the checksummed header (added compatibly: version stays 1) ----
    +0x40 u64 stall clock: wall-clock time (ns since the epoch) of the last IO
              completion the guest saw, 0 if none; the workloads keep it, so a VM
              process started on this memory (``--restart``, a migration's
              destination) measures the IO stall across the restart. Zeroed at cold
              boot; a memory laid out by an older version reads 0 here (page 1 was
              zero beyond the header) and just reports no stall across its restart.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from vfdirect.core.virtio.driver import DriverLayout
from vfdirect.core.virtio.layout import align_up, is_valid_queue_size

__all__ = [
    "EVENT_BUFFER_STRIDE",
    "FWTABLE_ADDR",
    "GUEST_MAGIC",
    "GUEST_VERSION",
    "HEADER_ADDR",
    "PAGE",
    "REQUEST_ENTRY_BYTES",
    "STALL_CLOCK_OFFSET",
    "GuestLayout",
    "GuestLayoutError",
    "LayoutParams",
]

PAGE = 4096
FWTABLE_ADDR = 0x0
HEADER_ADDR = 0x1000
REQUEST_TABLE_ADDR = 0x2000
REQUEST_ENTRY_BYTES = 512
EVENT_BUFFER_STRIDE = 64
GUEST_MAGIC = 0x47444656  # b"VFDG" in little-endian order
GUEST_VERSION = 1
_PARAMS = struct.Struct("<IHHQHHHHIIQHH")  # magic .. reserved (0x00-0x2B)
_HEADER_BYTES = 0x38
_CRC_OFFSET = 0x2C
BOOT_COUNT_OFFSET = 0x30
#: Offset in the guest header page of the stall clock (u64, see the module's map).
STALL_CLOCK_OFFSET = 0x40
MAX_TAGS = 1024
MAX_REQUEST_QUEUES = 16
#: A request chain has at most four buffers (request header, data-out, response header,
#: data-in); a TMF two. Each takes ONE ring descriptor through an indirect table.
MAX_INDIRECT = 4


class GuestLayoutError(ValueError):
    """The layout parameters are impossible, or the guest header in memory is missing or
    malformed (a restart needs a memory file that booted before)."""


@dataclass(frozen=True, slots=True)
class LayoutParams:
    """The knobs of the layout (fixed at first boot)."""

    memory_size: int = 16 << 20
    request_queues: int = 2
    queue_size: int = 64
    control_queue_size: int = 64
    event_queue_size: int = 8
    tags: int = 64
    slot_size: int = 64 << 10
    journal_size: int = 1 << 20
    max_indirect: int = MAX_INDIRECT

    def __post_init__(self) -> None:
        if not 1 <= self.request_queues <= MAX_REQUEST_QUEUES:
            raise GuestLayoutError(f"request_queues {self.request_queues} not in "
                                   f"1..{MAX_REQUEST_QUEUES}")
        for name in ("queue_size", "control_queue_size", "event_queue_size"):
            value = getattr(self, name)
            if not is_valid_queue_size(value) or value > 4096:
                raise GuestLayoutError(f"{name} {value} is not a power of 2 up to 4096")
        if not 1 <= self.tags <= MAX_TAGS:
            raise GuestLayoutError(f"tags {self.tags} not in 1..{MAX_TAGS}")
        if self.slot_size <= 0 or self.slot_size % PAGE or self.slot_size > 1 << 24:
            raise GuestLayoutError(f"slot_size {self.slot_size} is not a multiple of "
                                   f"{PAGE} up to 16 MiB")
        if self.journal_size < PAGE or self.journal_size % PAGE:
            raise GuestLayoutError(f"journal_size {self.journal_size} is not a positive "
                                   f"multiple of {PAGE}")
        if not 2 <= self.max_indirect <= min(self.queue_size, 64) or \
                self.max_indirect > self.control_queue_size:
            raise GuestLayoutError(f"max_indirect {self.max_indirect} out of range")
        if self.memory_size % PAGE or self.memory_size <= 0:
            raise GuestLayoutError(f"memory_size {self.memory_size} is not a positive "
                                   f"multiple of {PAGE}")


@dataclass(frozen=True, slots=True)
class GuestLayout:
    """Where each area lives, from :class:`LayoutParams` (see the module's map)."""

    params: LayoutParams
    request_table_addr: int
    queues: tuple[DriverLayout, ...]
    event_buffers_addr: int
    data_addr: int
    journal_addr: int
    end: int

    @classmethod
    def plan(cls, params: LayoutParams) -> GuestLayout:
        cursor = REQUEST_TABLE_ADDR + params.tags * REQUEST_ENTRY_BYTES
        queues: list[DriverLayout] = []
        sizes = [params.control_queue_size, params.event_queue_size,
                 *[params.queue_size] * params.request_queues]
        for vring, size in enumerate(sizes):
            base = align_up(cursor, PAGE)
            # The event queue carries single-buffer chains: no indirect tables.
            indirect = 0 if vring == 1 else params.max_indirect
            queue = DriverLayout.plan(base, size, event_idx=True, max_indirect=indirect)
            queues.append(queue)
            cursor = queue.end
        events = align_up(cursor, 64)
        cursor = events + params.event_queue_size * EVENT_BUFFER_STRIDE
        data = align_up(cursor, PAGE)
        journal = data + params.tags * params.slot_size
        end = journal + params.journal_size
        if end > params.memory_size:
            raise GuestLayoutError(f"the layout needs {end} bytes of guest memory, "
                                   f"memory_size is {params.memory_size}")
        return cls(params, REQUEST_TABLE_ADDR, tuple(queues), events, data, journal, end)

    # -- derived addresses ------------------------------------------------------------------

    @property
    def num_vrings(self) -> int:
        return len(self.queues)

    def request_entry(self, tag: int) -> int:
        if not 0 <= tag < self.params.tags:
            raise IndexError(f"tag {tag} out of range")
        return self.request_table_addr + tag * REQUEST_ENTRY_BYTES

    def slot(self, index: int) -> int:
        if not 0 <= index < self.params.tags:
            raise IndexError(f"slot {index} out of range")
        return self.data_addr + index * self.params.slot_size

    def event_buffer(self, index: int) -> int:
        if not 0 <= index < self.params.event_queue_size:
            raise IndexError(f"event buffer {index} out of range")
        return self.event_buffers_addr + index * EVENT_BUFFER_STRIDE

    def describe(self) -> dict[str, object]:
        """Plain data for logs and ``vm-run`` output."""
        p = self.params
        return {
            "memory_size": p.memory_size, "fwtable": FWTABLE_ADDR, "header": HEADER_ADDR,
            "request_table": self.request_table_addr, "tags": p.tags,
            "vrings": [{"index": i, "size": q.size, "desc": q.desc_addr,
                        "avail": q.avail_addr, "used": q.used_addr, "state": q.ctl_addr}
                       for i, q in enumerate(self.queues)],
            "event_buffers": self.event_buffers_addr, "data": self.data_addr,
            "slot_size": p.slot_size, "journal": self.journal_addr,
            "journal_size": p.journal_size, "end": self.end,
        }

    # -- the guest header -------------------------------------------------------------------

    def encode_header(self, boot_count: int = 0) -> bytes:
        """The header bytes (magic included: write them with the magic word LAST)."""
        p = self.params
        body = _PARAMS.pack(GUEST_MAGIC, GUEST_VERSION, _HEADER_BYTES, p.memory_size,
                            p.request_queues, p.queue_size, p.control_queue_size,
                            p.event_queue_size, p.tags, p.slot_size, p.journal_size,
                            p.max_indirect, 0)
        return body + struct.pack("<III", zlib.crc32(body), boot_count, 0)

    @classmethod
    def decode_header(cls, data: bytes, memory_size: int) -> GuestLayout:
        """The layout recorded in a guest header; :class:`GuestLayoutError` if there is
        none or it is malformed, or it disagrees with the memory file's size."""
        if len(data) < _HEADER_BYTES:
            raise GuestLayoutError("guest header truncated")
        fields = _PARAMS.unpack_from(data)
        magic, version, size = fields[0], fields[1], fields[2]
        if magic != GUEST_MAGIC:
            raise GuestLayoutError(f"no guest header (magic {magic:#010x}): this memory "
                                   "never booted")
        if version != GUEST_VERSION or size != _HEADER_BYTES:
            raise GuestLayoutError(f"guest header version {version} size {size:#x} not "
                                   f"supported")
        (crc,) = struct.unpack_from("<I", data, _CRC_OFFSET)
        if zlib.crc32(data[:_CRC_OFFSET]) != crc:
            raise GuestLayoutError("guest header checksum mismatch")
        (mem, rq, qs, cqs, eqs, tags, slot, journal, max_ind, reserved) = fields[3:]
        if reserved:
            raise GuestLayoutError("guest header reserved field is not zero")
        if mem != memory_size:
            raise GuestLayoutError(f"guest header says {mem} bytes of memory, the file "
                                   f"has {memory_size}")
        return cls.plan(LayoutParams(mem, rq, qs, cqs, eqs, tags, slot, journal, max_ind))
