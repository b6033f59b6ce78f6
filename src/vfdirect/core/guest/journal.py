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
* durability (the power-cut suite): the state word's upper bits flag an entry as a
  write sent with FUA (:data:`FLAG_FUA`) or as a SYNCHRONIZE CACHE of one disk
  (:data:`FLAG_FLUSH`; its LBA field is the flush's index among that disk's flushes).
  When a write is acknowledged, the upper half of its seq word first receives its
  *flush mark*: 1 + the number of flushes of its disk submitted before the
  acknowledgement; a flush covers exactly the writes completed before it was
  submitted, so a write with mark ``m`` is durable once a flush of index >= ``m - 1``
  completed. :func:`durability_expectations` decides, from the entries alone (after
  a power cut), which generation each LBA must at least hold;
* a block written by the verifier describes itself (:func:`make_block`): magic, VM id,
  LBA, generation, sequence number and a CRC-32C (Castagnoli) of the whole block, so
  :func:`check_block` tells a stale, misplaced or torn block from the right one.

Journal layout (``journal_addr``, little-endian)::

    +0x00 u32 magic 0x4A444656 ("VFDJ")  +0x04 u16 version (1)  +0x06 u16 entry size (32)
    +0x08 u32 capacity (entries)         +0x0C u32 CRC-32 of bytes 0x00-0x0B and 0x10-0x1F
    +0x10 u64 run id                     +0x18 u64 reserved
    +0x40 entries[capacity], each:
          +0x00 u32 state  +0x04 u16 LUN  +0x06 u16 target  +0x08 u64 LBA
          +0x10 u32 generation  +0x14 u32 CRC-32 of the block  +0x18 u32 seq
          +0x1C u32 flush mark (0: none recorded)
      state: bits 0-7 the EntryState, bit 8 FLAG_FUA, bit 9 FLAG_FLUSH

Block layout (big-endian, the first 48 bytes of the block; the rest is a pattern)::

    +0 8s magic b"VFDBLOCK"  +8 u64 VM id  +16 u64 LBA  +24 u64 generation  +32 u64 seq
    +40 u32 CRC-32C of the block with this field zero   +44 u32 block size
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum

from vfdirect.core.crc32c import crc32c
from vfdirect.core.virtio.memory import GuestMemory

__all__ = [
    "COOKIE_BASE",
    "FLAG_FLUSH",
    "FLAG_FUA",
    "DurabilityExpectation",
    "DurabilityStats",
    "durability_expectations",
    "recovered_verdict",
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


#: State-word flags: a write sent with FUA; a SYNCHRONIZE CACHE entry.
FLAG_FUA = 0x100
FLAG_FLUSH = 0x200
_STATE_MASK = 0xFF
_FLAGS = FLAG_FUA | FLAG_FLUSH


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
    #: sent with FUA (a write), or a SYNCHRONIZE CACHE (then ``lba`` is its index)
    fua: bool = False
    flush: bool = False
    #: 1 + flushes of its disk submitted before its acknowledgement (0: not recorded)
    mark: int = 0


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
        word, lun, target, lba, generation, crc, seq_word = _ENTRY.unpack(raw)
        state, flags = word & _STATE_MASK, word & ~_STATE_MASK
        stored_seq, mark = seq_word & 0xFFFF_FFFF, seq_word >> 32
        try:
            st = EntryState(state)
        except ValueError:
            raise JournalError(f"journal entry {seq}: state {state}") from None
        if flags & ~_FLAGS:
            raise JournalError(f"journal entry {seq}: flags {flags:#x}")
        if st is not EntryState.EMPTY and stored_seq != seq:
            raise JournalError(f"journal entry {seq} carries seq {stored_seq}")
        return JournalEntry(seq, st, target, lun, lba, generation, crc,
                            bool(flags & FLAG_FUA), bool(flags & FLAG_FLUSH), mark)

    def record_pending(self, seq: int, *, target: int, lun: int, lba: int, generation: int,
                       crc: int, fua: bool = False, flush: bool = False) -> None:
        """Fields first, then the state word (PENDING, with the FUA / flush flag)."""
        addr = self._entry_addr(seq)
        if self._memory.load_u32(addr) != EntryState.EMPTY:
            raise JournalError(f"journal entry {seq} is already used")
        raw = _ENTRY.pack(0, lun, target, lba, generation, crc, seq)
        self._memory.write(addr + 4, raw[4:])
        flags = (FLAG_FUA if fua else 0) | (FLAG_FLUSH if flush else 0)
        self._memory.store_u32(addr, EntryState.PENDING | flags)

    def settle(self, seq: int, state: EntryState, *, mark: int | None = None) -> None:
        """PENDING -> ACKED or FAILED (idempotent for the same state). ``mark`` (the
        write's flush mark) is stored before the state word."""
        addr = self._entry_addr(seq)
        word = self._memory.load_u32(addr)
        current, flags = word & _STATE_MASK, word & _FLAGS
        if current == state:
            return
        if current != EntryState.PENDING or state not in (EntryState.ACKED, EntryState.FAILED):
            raise JournalError(f"journal entry {seq}: {EntryState(current).name} -> "
                               f"{state.name}")
        if mark is not None:
            if not 0 <= mark <= 0xFFFF_FFFF:
                raise JournalError(f"journal entry {seq}: flush mark {mark}")
            self._memory.write(addr + 0x18, struct.pack("<Q", seq | (mark << 32)))
        self._memory.store_u32(addr, state | flags)

    def rewrite(self, seq: int, state: EntryState, *, target: int, lun: int, lba: int,
                generation: int, crc: int, fua: bool = False) -> None:
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
        self._memory.store_u32(addr, state | (FLAG_FUA if fua else 0))

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


# -- durability after a power cut ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class DurabilityExpectation:
    """What an LBA may hold after a power cut: a generation >= ``floor`` (0: zeros are
    allowed) among ``generations`` (every one ever submitted there)."""

    floor: int
    generations: frozenset[int]
    #: the newest acknowledged generation (durable or not; 0: none)
    newest_acked: int = 0


@dataclass(slots=True)
class DurabilityStats:
    writes: int = 0
    acked: int = 0
    acked_fua: int = 0
    pending: int = 0
    failed: int = 0
    flushes: int = 0
    flushes_completed: int = 0
    #: acknowledged writes that had to survive (FUA, or before a completed flush)
    required: int = 0
    #: LBAs with a floor (their newest required write)
    floors: int = 0
    per_disk_flushes: dict[tuple[int, int], int] = field(default_factory=dict)

    def dump(self) -> dict[str, int]:
        return {"writes": self.writes, "acked": self.acked, "acked_fua": self.acked_fua,
                "pending": self.pending, "failed": self.failed, "flushes": self.flushes,
                "flushes_completed": self.flushes_completed, "required": self.required,
                "floors": self.floors}


def durability_expectations(
    entries: Iterable[JournalEntry],
) -> tuple[dict[tuple[int, int, int], DurabilityExpectation], DurabilityStats]:
    """From a journal read after a power cut: per (target, LUN, LBA) the generation it
    must at least hold, and every generation it may hold. A write must be durable if it
    was acknowledged with FUA, or acknowledged before a completed flush of its disk was
    submitted (its flush mark ``m`` >= 1 and a flush of index >= ``m - 1`` completed)."""
    stats = DurabilityStats()
    writes: list[JournalEntry] = []
    done_flush: dict[tuple[int, int], int] = {}  # disk -> highest completed flush index
    for entry in entries:
        if entry.flush:
            stats.flushes += 1
            if entry.state is EntryState.ACKED:
                stats.flushes_completed += 1
                disk = (entry.target, entry.lun)
                done_flush[disk] = max(done_flush.get(disk, -1), entry.lba)
            continue
        writes.append(entry)
    stats.per_disk_flushes = {d: i + 1 for d, i in done_flush.items()}
    gens: dict[tuple[int, int, int], set[int]] = {}
    floors: dict[tuple[int, int, int], int] = {}
    newest: dict[tuple[int, int, int], int] = {}
    for entry in writes:
        key = (entry.target, entry.lun, entry.lba)
        gens.setdefault(key, set()).add(entry.generation)
        stats.writes += 1
        if entry.state is EntryState.PENDING:
            stats.pending += 1
            continue
        if entry.state is EntryState.FAILED:
            stats.failed += 1
            continue
        stats.acked += 1
        stats.acked_fua += entry.fua
        newest[key] = max(newest.get(key, 0), entry.generation)
        covered = entry.mark >= 1 and done_flush.get((entry.target, entry.lun), -1) >= \
            entry.mark - 1
        if entry.fua or covered:
            stats.required += 1
            floors[key] = max(floors.get(key, 0), entry.generation)
    stats.floors = len(floors)
    return ({key: DurabilityExpectation(floors.get(key, 0), frozenset(g),
                                        newest.get(key, 0))
             for key, g in gens.items()}, stats)


def recovered_verdict(data: bytes, expect: DurabilityExpectation | None, *, vm: int,
                      lba: int, block_size: int) -> tuple[str, int]:
    """Judge a block read back after a power cut: ``("ok", generation)`` (0 for zeros),
    or ``("lost" | "torn" | "invented", generation)``: older than its floor (an
    acknowledged durable write is gone), not an intact block, or a generation never
    written there."""
    floor = 0 if expect is None else expect.floor
    if not any(data):
        return ("ok", 0) if floor == 0 else ("lost", 0)
    check = check_block(data, vm=vm, lba=lba, block_size=block_size)
    if not check.ok:
        return "torn", check.generation
    if expect is None or check.generation not in expect.generations:
        return "invented", check.generation
    if check.generation < floor:
        return "lost", check.generation
    return "ok", check.generation


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
