"""The workload journal in guest memory, and the self-describing blocks the verifier
writes (pure).

Rules of this module:

* the journal records every numbered write of a verify workload: entry ``seq`` says
  which disk and LBA it went to, the block's generation and CRC-32, and whether the
  device acknowledged it. It lives in guest memory, so a VM process killed and restarted
  on the same memory knows exactly which writes were acknowledged (SYSTEM.md 6);
* an entry's ``state`` word is its commit point (one aligned 32-bit store, written last):
  ``EMPTY -> PENDING`` (about to be submitted) ``-> ACKED`` or ``FAILED``. A PENDING
  entry after a restart is resolved by the driver's request table: still in flight or
  done (its cookie is the journal's), or never sent (resubmit: the device never saw it);
* a block written by the verifier describes itself (:func:`make_block`): magic, VM id,
  LBA, generation, sequence number and a CRC-32C (Castagnoli) of the whole block, so
  :func:`check_block` tells a stale, misplaced or torn block from the right one.

Journal layout (``journal_addr``, little-endian)::

    +0x00 u32 magic 0x4A444656 ("VFDJ")  +0x04 u16 version (1)  +0x06 u16 entry size (32)
    +0x08 u32 capacity (entries)         +0x0C u32 CRC-32 of bytes 0x00-0x0B and 0x10-0x1F
    +0x10 u64 run id                     +0x18 u64 reserved
    +0x40 entries[capacity], each:
          +0x00 u32 state  +0x04 u16 LUN  +0x06 u16 target  +0x08 u64 LBA
          +0x10 u32 generation  +0x14 u32 CRC-32 of the block  +0x18 u64 seq

Block layout (big-endian, the first 48 bytes of the block; the rest is a pattern)::

    +0 8s magic b"VFDBLOCK"  +8 u64 VM id  +16 u64 LBA  +24 u64 generation  +32 u64 seq
    +40 u32 CRC-32C of the block with this field zero   +44 u32 block size
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from vfdirect.core.crc32c import crc32c
from vfdirect.core.virtio.memory import GuestMemory

__all__ = [
    "COOKIE_BASE",
    "JOURNAL_ENTRY_BYTES",
    "JOURNAL_HEADER_BYTES",
    "BlockCheck",
    "EntryState",
    "Journal",
    "JournalEntry",
    "JournalError",
    "check_block",
    "make_block",
    "vm_id_number",
]

JOURNAL_MAGIC = 0x4A444656  # b"VFDJ"
JOURNAL_VERSION = 1
JOURNAL_HEADER_BYTES = 0x40
JOURNAL_ENTRY_BYTES = 32
#: Request cookies of journaled writes are ``COOKIE_BASE | seq``.
COOKIE_BASE = 0x4A00_0000_0000_0000
_HEADER = struct.Struct("<IHHII QQ")
_ENTRY = struct.Struct("<IHHQIIQ")
_BLOCK = struct.Struct(">8sQQQQII")
BLOCK_MAGIC = b"VFDBLOCK"


class JournalError(ValueError):
    """No journal in guest memory, or a malformed one."""


class EntryState(IntEnum):
    EMPTY = 0
    PENDING = 1
    ACKED = 2
    FAILED = 3


@dataclass(frozen=True, slots=True)
class JournalEntry:
    seq: int
    state: EntryState
    target: int
    lun: int
    lba: int
    generation: int
    crc: int


class Journal:
    """The journal at ``addr`` (``size`` bytes) of one guest memory."""

    def __init__(self, memory: GuestMemory, addr: int, size: int, run_id: int,
                 capacity: int) -> None:
        self._memory = memory
        self._addr = addr
        self._size = size
        self.run_id = run_id
        self.capacity = capacity

    @staticmethod
    def capacity_of(size: int) -> int:
        return max(0, (size - JOURNAL_HEADER_BYTES) // JOURNAL_ENTRY_BYTES)

    @classmethod
    def format(cls, memory: GuestMemory, addr: int, size: int, run_id: int) -> Journal:
        """An empty journal (the magic is stored last)."""
        capacity = cls.capacity_of(size)
        if capacity == 0:
            raise JournalError(f"a {size}-byte area holds no journal")
        memory.store_u32(addr, 0)
        memory.write(addr + JOURNAL_HEADER_BYTES, bytes(capacity * JOURNAL_ENTRY_BYTES))
        header = bytearray(_HEADER.pack(0, JOURNAL_VERSION, JOURNAL_ENTRY_BYTES, capacity, 0,
                                        run_id, 0))
        struct.pack_into("<I", header, 0x0C, _header_crc(JOURNAL_MAGIC, bytes(header)))
        memory.write(addr + 4, bytes(header[4:]))
        memory.store_u32(addr, JOURNAL_MAGIC)
        return cls(memory, addr, size, run_id, capacity)

    @classmethod
    def open(cls, memory: GuestMemory, addr: int, size: int) -> Journal:
        raw = memory.read(addr, _HEADER.size)
        magic, version, entry_size, capacity, crc, run_id, _ = _HEADER.unpack(raw)
        if magic != JOURNAL_MAGIC:
            raise JournalError(f"no journal at {addr:#x} (magic {magic:#010x})")
        if version != JOURNAL_VERSION or entry_size != JOURNAL_ENTRY_BYTES:
            raise JournalError(f"journal version {version} entry size {entry_size}")
        if crc != _header_crc(magic, raw):
            raise JournalError("journal header checksum mismatch")
        if capacity != cls.capacity_of(size):
            raise JournalError(f"journal capacity {capacity} does not fit {size} bytes")
        return cls(memory, addr, size, run_id, capacity)

    def _entry_addr(self, seq: int) -> int:
        if not 0 <= seq < self.capacity:
            raise JournalError(f"seq {seq} is beyond the journal ({self.capacity})")
        return self._addr + JOURNAL_HEADER_BYTES + seq * JOURNAL_ENTRY_BYTES

    def entry(self, seq: int) -> JournalEntry:
        raw = self._memory.read(self._entry_addr(seq), _ENTRY.size)
        state, lun, target, lba, generation, crc, stored_seq = _ENTRY.unpack(raw)
        try:
            st = EntryState(state)
        except ValueError:
            raise JournalError(f"journal entry {seq}: state {state}") from None
        if st is not EntryState.EMPTY and stored_seq != seq:
            raise JournalError(f"journal entry {seq} carries seq {stored_seq}")
        return JournalEntry(seq, st, target, lun, lba, generation, crc)

    def record_pending(self, seq: int, *, target: int, lun: int, lba: int, generation: int,
                       crc: int) -> None:
        """Fields first, then the state word (PENDING)."""
        addr = self._entry_addr(seq)
        if self._memory.load_u32(addr) != EntryState.EMPTY:
            raise JournalError(f"journal entry {seq} is already used")
        raw = _ENTRY.pack(0, lun, target, lba, generation, crc, seq)
        self._memory.write(addr + 4, raw[4:])
        self._memory.store_u32(addr, EntryState.PENDING)

    def settle(self, seq: int, state: EntryState) -> None:
        """PENDING -> ACKED or FAILED (idempotent for the same state)."""
        addr = self._entry_addr(seq)
        current = self._memory.load_u32(addr)
        if current == state:
            return
        if current != EntryState.PENDING or state not in (EntryState.ACKED, EntryState.FAILED):
            raise JournalError(f"journal entry {seq}: {EntryState(current).name} -> "
                               f"{state.name}")
        self._memory.store_u32(addr, state)

    def rewrite(self, seq: int, state: EntryState, *, target: int, lun: int, lba: int,
                generation: int, crc: int) -> None:
        """Overwrite a settled entry (a checkpoint of the verify workload): the state
        word goes to FAILED first (a reader that finds the entry torn takes it as a
        write of unknown outcome), then the fields, then ``state``."""
        if state not in (EntryState.ACKED, EntryState.FAILED):
            raise JournalError(f"journal entry {seq}: rewrite as {state.name}")
        addr = self._entry_addr(seq)
        if self._memory.load_u32(addr) != EntryState.EMPTY:
            self._memory.store_u32(addr, EntryState.FAILED)
        raw = _ENTRY.pack(0, lun, target, lba, generation, crc, seq)
        self._memory.write(addr + 4, raw[4:])
        self._memory.store_u32(addr, state)

    def clear_from(self, start: int) -> None:
        """Entries ``start..`` back to EMPTY, the last first (one aligned store each), so
        that the used entries stay a prefix whenever the process is killed."""
        for seq in range(self.capacity - 1, start - 1, -1):
            addr = self._entry_addr(seq)
            if self._memory.load_u32(addr) != EntryState.EMPTY:
                self._memory.store_u32(addr, EntryState.EMPTY)

    def entries(self) -> Iterator[JournalEntry]:
        """Every used entry, in sequence order (stops at the first EMPTY one)."""
        for seq in range(self.capacity):
            entry = self.entry(seq)
            if entry.state is EntryState.EMPTY:
                return
            yield entry

    def next_seq(self) -> int:
        """The first EMPTY entry: the next numbered write to make."""
        lo, hi = 0, self.capacity
        # Entries are filled in order, so the used ones are a prefix: bisect.
        while lo < hi:
            mid = (lo + hi) // 2
            if self._memory.load_u32(self._entry_addr(mid)) != EntryState.EMPTY:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def summary(self) -> dict[str, int]:
        counts = {s.name.lower(): 0 for s in EntryState if s is not EntryState.EMPTY}
        for entry in self.entries():
            counts[entry.state.name.lower()] += 1
        return counts


def _header_crc(magic: int, raw: bytes) -> int:
    return zlib.crc32(struct.pack("<I", magic) + raw[4:0x0C] + raw[0x10:0x20])


# -- self-describing blocks --------------------------------------------------------------


def vm_id_number(vm_id: str) -> int:
    """A 64-bit number for a VM id (the block header carries it)."""
    return int.from_bytes(hashlib.blake2b(vm_id.encode("utf-8"), digest_size=8).digest(),
                          "big")


def make_block(vm: int, lba: int, generation: int, seq: int, block_size: int) -> bytes:
    """A block that names its VM, LBA, generation and sequence number, with a CRC-32C."""
    if block_size < _BLOCK.size:
        raise ValueError(f"block size {block_size} < {_BLOCK.size}")
    seed = struct.pack(">QQQQ", vm, lba, generation, seq)
    pattern = hashlib.shake_128(seed).digest(block_size - _BLOCK.size)
    body = bytearray(_BLOCK.pack(BLOCK_MAGIC, vm, lba, generation, seq, 0, block_size))
    body += pattern
    struct.pack_into(">I", body, 40, crc32c(body))
    return bytes(body)


@dataclass(frozen=True, slots=True)
class BlockCheck:
    ok: bool
    reason: str
    vm: int = 0
    lba: int = 0
    generation: int = 0
    seq: int = 0


def check_block(data: bytes, *, vm: int, lba: int, block_size: int) -> BlockCheck:
    """Whether ``data`` is an intact verifier block of VM ``vm`` for ``lba``."""
    if len(data) != block_size or block_size < _BLOCK.size:
        return BlockCheck(False, f"{len(data)} bytes, expected {block_size}")
    magic, b_vm, b_lba, gen, seq, crc, size = _BLOCK.unpack_from(data)
    if magic != BLOCK_MAGIC:
        return BlockCheck(False, "not a verifier block" + (" (zeros)" if not any(data)
                                                           else ""))
    zeroed = bytearray(data)
    struct.pack_into(">I", zeroed, 40, 0)
    if crc32c(zeroed) != crc or size != block_size:
        return BlockCheck(False, "checksum mismatch (torn or corrupt block)", b_vm, b_lba,
                          gen, seq)
    if b_vm != vm:
        return BlockCheck(False, f"block of another VM ({b_vm:#x})", b_vm, b_lba, gen, seq)
    if b_lba != lba:
        return BlockCheck(False, f"block of LBA {b_lba} found at {lba}", b_vm, b_lba, gen,
                          seq)
    return BlockCheck(True, "ok", b_vm, b_lba, gen, seq)
