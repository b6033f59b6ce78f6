"""The continuous workloads of the VM (shell): ``verify`` (data integrity across kills)
and ``load`` (a random read/write mix with IOPS and latency).

``verify``
    Random reads and writes of single blocks over every disk (the first ``window``
    blocks of each), ``depth`` at once, until SIGTERM or ``count`` IOs. Every write is a
    self-describing block (:func:`~vfdirect.core.guest.journal.make_block`: VM id, LBA,
    generation, seq, CRC-32C) journaled in guest memory as PENDING before it is
    submitted and settled ACKED or FAILED from its completion (as ``sequence``). Every
    read is checked against the journal: the latest ACKED generation of that LBA, or
    zeros if none. Two IOs never overlap on one LBA (a write waits for the reads and the
    write in flight there, a read for the write), so the expected content is exact, with
    one allowance SCSI makes: a write that failed, or whose outcome is unknown, may have
    left either the old or the new content, and both are accepted until a later write
    is acknowledged.

    After a kill and ``--restart`` the journal is re-read (an LBA's content is its
    highest ACKED generation): PENDING entries the device has come back as
    ``recovered`` completions (their LBAs stay busy until then), the others are
    submitted again (the device never saw them). When the journal is nearly full and
    nothing is in flight it is compacted to one entry per LBA (:meth:`Verify._checkpoint`,
    crash-safe); if even that does not fit, writing stops when it is full and reads go
    on checking. At the end every LBA journaled is read back
    once more. Events ``verify_progress`` (writes, reads, verified, errors, and the
    interval's ``iops``, ``p50_us``, ``p99_us``) every ``progress`` seconds; the result
    says ``ok`` only with no mismatch and no IO error.

    Durability (the power-cut suite; off by default): ``fua_pct`` % of the writes carry
    FUA, and every ``flush_every`` writes a SYNCHRONIZE CACHE goes to every disk; the
    journal flags FUA writes, records each flush as an entry and each write's flush
    mark at its acknowledgement (see :mod:`vfdirect.core.guest.journal`), so that after a
    power cut the writes that had to be durable are known from the journal alone.
    ``recover`` (the entries of the journal of the VM that was running at the cut, read
    from its memory file by :func:`read_journal_file`) makes the workload, booted on
    fresh memory, first read back every LBA of its window and judge each block
    (:func:`~vfdirect.core.guest.journal.recovered_verdict`: no acknowledged durable
    write lost, no torn block, no generation never written), log ``verify_recovered``
    with the counts, journal what it found as this epoch's durable starting content,
    then go on as usual. Any bad block counts as a mismatch.

``load``
    Random ``bs``-block reads and writes (``read_pct`` % reads) over whole disks,
    ``depth`` at once, until SIGTERM or ``count`` IOs; ``load_progress`` events with the
    interval's IOPS and latencies, a result with totals and percentiles.

Both report ``max_stall_ms``, the worst IO stall the guest saw (the longest gap with IO
outstanding and nothing completed, across a restart of the VM process too: see
:mod:`vfdirect.core.guest.stall`), in their progress events and result; the result also
has ``restart_stall_ms`` (the gap across the restart this process resumed from, or
null).
"""

from __future__ import annotations

import logging
import os
import random
import time
import zlib
from collections.abc import Callable
from typing import Any

from vfdirect.core.guest.journal import (
    COOKIE_BASE,
    EntryState,
    Journal,
    JournalEntry,
    check_block,
    durability_expectations,
    make_block,
    recovered_verdict,
)
from vfdirect.core.guest.layout import HEADER_ADDR, GuestLayout, GuestLayoutError
from vfdirect.core.virtio import RegionMemory
from vfdirect.transport.shm import SharedMemory
from vfdirect.vm.block import BlockLayer, Disk, IoError, IoRequest
from vfdirect.vm.log import log_event

__all__ = ["Load", "Verify", "percentile", "read_journal_file"]

_COOKIE_MASK = 0xFFFF_FFFF_FFFF
_log = logging.getLogger("vfdirect.vm")
#: IOs a run may try to place on busy LBAs in a row before it waits for a completion.
_PICK_TRIES = 8
#: Bound of the drain and of the final read-back pass.
_DRAIN_S = 30.0

Key = tuple[int, int, int]  # target, LUN, LBA


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def read_journal_file(path: str | os.PathLike[str]) -> list[JournalEntry]:
    """The used entries of the journal in the guest memory file ``path`` (another VM's,
    e.g. the one running at a power cut); ValueError if there is none."""
    shm = SharedMemory.open(path)
    try:
        memory = RegionMemory.from_buffers([(0, shm.buffer)])
        try:
            layout = GuestLayout.decode_header(memory.read(HEADER_ADDR, 0x40), shm.size)
        except GuestLayoutError as exc:
            raise ValueError(f"{path}: {exc}") from None
        journal = Journal.open(memory, layout.journal_addr, layout.params.journal_size)
        entries = list(journal.entries())
        del journal, memory
    finally:
        shm.close()
    return entries


class Verify:
    """The ``verify`` workload over the journal in guest memory."""

    def __init__(self, layer: BlockLayer, journal: Journal, *, vm: int, depth: int,
                 in_device: set[int], should_stop: Callable[[], bool],
                 count: int | None = None, read_pct: float = 50.0, window: int = 256,
                 progress: float = 1.0, seed: int | None = None,
                 clock: Callable[[], float] = time.monotonic, fua_pct: float = 0.0,
                 flush_every: int = 0,
                 recover: list[JournalEntry] | None = None) -> None:
        self.layer = layer
        self.journal = journal
        self.vm = vm
        self.depth = max(1, depth)
        self.in_device = in_device
        self.should_stop = should_stop
        self.count = count
        self.read_pct = read_pct
        self.window = max(1, window)
        self.progress = progress
        self.clock = clock
        self.rng = random.Random(seed if seed is not None else os.urandom(8))  # noqa: S311
        self.disks = sorted(layer.present_disks(), key=lambda d: d.address)
        self.by_address = {d.address: d for d in self.disks}
        # what the journal says
        self.acked: dict[Key, int] = {}
        self.maybe: dict[Key, set[int]] = {}
        self.next_gen: dict[Key, int] = {}
        self.seq = 0
        # in flight
        self.writing: dict[Key, int] = {}   # key -> seq
        self.reading: dict[Key, int] = {}   # key -> reads in flight
        self.awaiting: dict[int, tuple[Key, int]] = {}  # seq -> key, generation
        self.outstanding = 0
        # counters
        self.issued = 0
        self.writes = 0
        self.reads = 0
        self.verified = 0
        self.mismatches = 0
        self.io_errors = 0
        self.resubmitted = 0
        self.journal_full = False
        self.details: list[str] = []
        #: entries a checkpoint may need: every LBA the IOs go to, twice, and a margin
        self.reserve = 2 * sum(min(self.window, d.num_blocks) for d in self.disks) + 16
        self.checkpoint_due = False
        self.checkpoints = 0
        #: latencies of the IOs completed since the last progress event, and its time
        self._window: list[float] = []
        self._window_start = self.clock()
        # durability: FUA share, flush period, flushes submitted per disk
        self.fua_pct = fua_pct
        self.flush_every = max(0, flush_every)
        self.durability = fua_pct > 0 or self.flush_every > 0 or recover is not None
        self.flush_index: dict[tuple[int, int], int] = {}
        self.writes_since_flush = 0
        self.fua_writes = 0
        self.flushes = 0
        self.flush_errors = 0
        self.recover = recover
        self.recovery: dict[str, Any] | None = None

    # -- the journal ----------------------------------------------------------------

    def _load_journal(self) -> None:
        # Generations of an LBA only grow, so the highest ACKED one is the content
        # (whatever the order of the entries: a checkpoint rewrites them in place).
        for entry in self.journal.entries():
            if entry.flush:  # a SYNCHRONIZE CACHE: the next one of that disk comes after
                disk = (entry.target, entry.lun)
                self.flush_index[disk] = max(self.flush_index.get(disk, 0), entry.lba + 1)
                continue
            key = (entry.target, entry.lun, entry.lba)
            self.next_gen[key] = max(self.next_gen.get(key, 1), entry.generation + 1)
            if entry.state is EntryState.ACKED:
                self.acked[key] = max(self.acked.get(key, 0), entry.generation)
            elif entry.state is EntryState.FAILED:
                self.maybe.setdefault(key, set()).add(entry.generation)
            elif entry.state is EntryState.PENDING:
                if (COOKIE_BASE | entry.seq) in self.in_device:
                    # its completion comes back (recovered); until then either content
                    self.awaiting[entry.seq] = (key, entry.generation)
                    self.writing[key] = entry.seq
                elif (entry.target, entry.lun) in self.by_address:
                    self._write(key, entry.generation, entry.seq, journaled=True,
                                fua=entry.fua)
                    self.resubmitted += 1
                else:
                    self.maybe.setdefault(key, set()).add(entry.generation)
        for key, gens in list(self.maybe.items()):  # superseded by a later ACKED write
            gens.difference_update(range(self.acked.get(key, 0) + 1))
            if not gens:
                del self.maybe[key]
        self.seq = self.journal.next_seq()

    def _settle_awaited(self) -> None:
        """Recovered completions are settled in the journal by the SCSI host's orphan
        handler; take them into the expected contents."""
        for seq, (key, generation) in list(self.awaiting.items()):
            state = self.journal.entry(seq).state
            if state is EntryState.PENDING:
                continue
            del self.awaiting[seq]
            self.writing.pop(key, None)
            self._settled(key, generation, state is EntryState.ACKED, f"seq {seq}")

    def _settled(self, key: Key, generation: int, good: bool, what: str) -> None:
        if good:
            self.acked[key] = generation
            self.maybe.pop(key, None)
        else:
            self.maybe.setdefault(key, set()).add(generation)

    # -- IO ---------------------------------------------------------------------------

    def _error(self, text: str) -> None:
        if len(self.details) < 20:
            self.details.append(text)
        log_event(_log, "verify_error", level=logging.WARNING, error=text)

    def _write(self, key: Key, generation: int, seq: int, *, journaled: bool = False,
               fua: bool = False) -> None:
        disk = self.by_address[key[:2]]
        data = make_block(self.vm, key[2], generation, seq, disk.block_size)
        if not journaled:
            # the journal first: a write is never in the device without its entry
            self.journal.record_pending(seq, target=key[0], lun=key[1], lba=key[2],
                                        generation=generation, crc=zlib.crc32(data),
                                        fua=fua)
        self.writing[key] = seq
        self.outstanding += 1
        self.fua_writes += fua

        def done(request: IoRequest) -> None:
            self.outstanding -= 1
            self.writing.pop(key, None)
            good = request.error is None
            # the flush mark: which flushes of this disk were submitted before the ack
            mark = self.flush_index.get(key[:2], 0) + 1 if self.durability else None
            self.journal.settle(seq, EntryState.ACKED if good else EntryState.FAILED,
                                mark=mark)
            self._settled(key, generation, good, f"seq {seq}")
            self.writes += 1
            self._window.append(request.latency)
            if not good:
                self.io_errors += 1
                self._error(f"write {disk.name} lba {key[2]} seq {seq}: {request.error}")

        disk.submit_write(key[2], data, fua=fua, callback=done, cookie=COOKIE_BASE | seq)

    def _flush_all(self) -> None:
        """A SYNCHRONIZE CACHE to every disk, each journaled (its index among the
        disk's flushes in the LBA field) before it is submitted."""
        for disk in self.disks:
            if self.seq >= self.journal.capacity:
                return
            seq, addr = self.seq, disk.address
            index = self.flush_index.get(addr, 0)
            self.journal.record_pending(seq, target=addr[0], lun=addr[1], lba=index,
                                        generation=0, crc=0, flush=True)
            self.flush_index[addr] = index + 1
            self.seq += 1
            self.outstanding += 1

            def done(request: IoRequest, seq: int = seq, name: str = disk.name) -> None:
                self.outstanding -= 1
                good = request.error is None
                self.journal.settle(seq, EntryState.ACKED if good else EntryState.FAILED)
                self.flushes += 1
                if not good:
                    self.flush_errors += 1
                    self._error(f"flush {name} seq {seq}: {request.error}")

            disk.submit_flush(callback=done, cookie=COOKIE_BASE | seq)

    def _read(self, key: Key, *, final: bool = False) -> None:
        disk = self.by_address[key[:2]]
        self.reading[key] = self.reading.get(key, 0) + 1
        self.outstanding += 1

        def done(request: IoRequest) -> None:
            self.outstanding -= 1
            left = self.reading[key] - 1
            if left:
                self.reading[key] = left
            else:
                del self.reading[key]
            self.reads += 1
            self._window.append(request.latency)
            if request.error is not None:
                self.io_errors += 1
                self._error(f"read {disk.name} lba {key[2]}: {request.error}")
                return
            self._check(disk, key, request.data or b"", final)

        disk.submit_read(key[2], 1, callback=done)

    def _check(self, disk: Disk, key: Key, data: bytes, final: bool) -> None:
        accept = set(self.maybe.get(key, ()))
        expected = self.acked.get(key)
        if expected is not None:
            accept.add(expected)
        if not any(data):
            if expected is None:  # never acknowledged: zeros are the old content
                self.verified += 1
                return
            self.mismatches += 1
            self._error(f"{disk.name} lba {key[2]}: zeros, expected generation {expected}")
            return
        check = check_block(data, vm=self.vm, lba=key[2], block_size=disk.block_size)
        if check.ok and check.generation in accept:
            self.verified += 1
            return
        self.mismatches += 1
        self._error(f"{disk.name} lba {key[2]}{' (final pass)' if final else ''}: "
                    f"{check.reason}, generation {check.generation} seq {check.seq}; "
                    f"expected generation {sorted(accept) or 'none (zeros)'}")

    def _pick(self) -> bool:
        """Submit one random IO if an LBA is free for it; False if none was."""
        for _ in range(_PICK_TRIES):
            disk = self.rng.choice(self.disks)
            key = (disk.target, disk.lun, self.rng.randrange(min(self.window,
                                                                 disk.num_blocks)))
            read = self.journal_full or self.rng.random() * 100 < self.read_pct
            if key in self.writing or (not read and key in self.reading):
                continue
            if read:
                self._read(key)
            else:
                if self.seq + self.reserve >= self.journal.capacity and \
                        2 * self.reserve < self.journal.capacity:
                    self.checkpoint_due = True
                    return False
                if self.seq >= self.journal.capacity:
                    self.journal_full = True
                    log_event(_log, "verify_journal_full", level=logging.WARNING,
                              capacity=self.journal.capacity,
                              note="writes stop; reads go on checking")
                    continue
                generation = self.next_gen.get(key, 1)
                self.next_gen[key] = generation + 1
                fua = self.fua_pct > 0 and self.rng.random() * 100 < self.fua_pct
                self._write(key, generation, self.seq, fua=fua)
                self.seq += 1
                self.writes_since_flush += 1
                if self.flush_every and self.writes_since_flush >= self.flush_every:
                    self.writes_since_flush = 0
                    self._flush_all()
            self.issued += 1
            return True
        return False

    def _checkpoint(self) -> None:
        """The journal is nearly full and nothing is in flight: keep one entry per LBA
        (its latest ACKED generation, and the generations of unknown outcome above it),
        crash-safely. The checkpoint is appended first; then copied over entries 0..k-1;
        then everything above is cleared, the last entry first. Killed at any point, the
        journal read as a prefix still holds each LBA's highest ACKED generation."""
        journal = self.journal
        # durability: a flush first, so every ACKED row below is durable (flagged FUA)
        durable = False
        if self.durability:
            try:
                for disk in self.disks:
                    disk.flush(timeout=_DRAIN_S)
                durable = True
            except IoError as exc:
                self._error(f"flush before a checkpoint: {exc}")
        rows = [(key, EntryState.ACKED, gen) for key, gen in sorted(self.acked.items())]
        rows += [(key, EntryState.FAILED, gen) for key, gens in sorted(self.maybe.items())
                 for gen in sorted(gens)]
        start = self.seq
        if start + len(rows) > journal.capacity or 2 * len(rows) > journal.capacity:
            self.checkpoint_due = False
            self.reserve = journal.capacity  # no room: writes stop when it is full
            return

        def put(seq: int, key: Key, state: EntryState, gen: int) -> None:
            disk = self.by_address.get(key[:2])
            size = disk.block_size if disk is not None else 512
            crc = zlib.crc32(make_block(self.vm, key[2], gen, seq, size))
            journal.rewrite(seq, state, target=key[0], lun=key[1], lba=key[2],
                            generation=gen, crc=crc,
                            fua=durable and state is EntryState.ACKED)

        for i, (key, state, gen) in enumerate(rows):
            put(start + i, key, state, gen)
        for i, (key, state, gen) in enumerate(rows):
            put(i, key, state, gen)
        journal.clear_from(len(rows))
        self.seq = len(rows)
        self.writes_since_flush = 0
        self.checkpoints += 1
        self.checkpoint_due = False
        log_event(_log, "verify_checkpoint", entries=len(rows), was=start,
                  checkpoints=self.checkpoints)

    def counters(self) -> dict[str, Any]:
        counters = {"writes": self.writes, "reads": self.reads, "verified": self.verified,
                    "errors": self.mismatches + self.io_errors + self.flush_errors,
                    "mismatches": self.mismatches,
                    "io_errors": self.io_errors, "outstanding": self.outstanding,
                    "max_stall_ms": self.layer.host.max_stall_ms()}
        if self.durability:
            counters.update(fua_writes=self.fua_writes, flushes=self.flushes,
                            flush_errors=self.flush_errors)
        return counters

    # -- recovery after a power cut ----------------------------------------------------

    def _recover(self, entries: list[JournalEntry]) -> None:
        """Read back every LBA of the window and judge it against the journal of the
        cut; journal what was found as this epoch's (durable) starting content."""
        expect, stats = durability_expectations(entries)
        verdicts = {"ok": 0, "lost": 0, "torn": 0, "invented": 0}
        # acknowledged but not yet durable writes the cut took back (allowed)
        rolled_back = 0
        found: dict[Key, tuple[int, int]] = {}  # key -> generation, CRC-32
        details: list[str] = []
        keys = [(d.target, d.lun, lba) for d in self.disks
                for lba in range(min(self.window, d.num_blocks))]
        keys += sorted(k for k in expect if k[:2] in self.by_address
                       and k[2] >= min(self.window, self.by_address[k[:2]].num_blocks))
        pending = list(reversed(keys))
        in_flight = 0
        deadline = self.clock() + _DRAIN_S

        def done(request: IoRequest, key: Key) -> None:
            nonlocal in_flight, rolled_back
            in_flight -= 1
            self.reads += 1
            if request.error is not None:
                self.io_errors += 1
                self._error(f"recovery read {request.disk.name} lba {key[2]}: "
                            f"{request.error}")
                return
            data = request.data or b""
            verdict, gen = recovered_verdict(data, expect.get(key), vm=self.vm, lba=key[2],
                                             block_size=request.disk.block_size)
            verdicts[verdict] += 1
            if verdict == "ok":
                self.verified += 1
                e = expect.get(key)
                rolled_back += e is not None and gen < e.newest_acked
                if gen:
                    found[key] = (gen, zlib.crc32(data))
                return
            self.mismatches += 1
            e = expect.get(key)
            text = (f"after the cut: {request.disk.name} lba {key[2]}: {verdict} "
                    f"(generation {gen}; must be >= {0 if e is None else e.floor} among "
                    f"{sorted(e.generations) if e else []})")
            if len(details) < 10:
                details.append(text)
            self._error(text)

        def callback(key: Key) -> Callable[[IoRequest], None]:
            return lambda request: done(request, key)

        while (pending or in_flight) and self.clock() < deadline:
            while pending and in_flight < self.depth:
                key = pending.pop()
                in_flight += 1
                self.by_address[key[:2]].submit_read(key[2], 1, callback=callback(key))
            self.layer.poll(0.05)
        for seq, (key, (gen, crc)) in enumerate(sorted(found.items())):
            if seq >= self.journal.capacity:
                break
            self.journal.rewrite(seq, EntryState.ACKED, target=key[0], lun=key[1],
                                 lba=key[2], generation=gen, crc=crc, fua=True)
        self.recovery = {**stats.dump(), "checked": len(keys) - len(pending) - in_flight,
                         **verdicts, "rolled_back": rolled_back,
                         "in_flight_at_cut": stats.pending,
                         "details": details}
        log_event(_log, "verify_recovered", **self.recovery)

    def _interval(self) -> dict[str, Any]:
        """IOPS and latency percentiles of the IOs completed since the last call."""
        now = self.clock()
        ordered = sorted(self._window)
        elapsed = max(1e-9, now - self._window_start)
        self._window = []
        self._window_start = now
        us = 1e6
        return {"iops": round(len(ordered) / elapsed, 1),
                "p50_us": round(percentile(ordered, 50) * us, 1),
                "p99_us": round(percentile(ordered, 99) * us, 1)}

    def run(self) -> dict[str, Any]:
        if not self.disks:
            return {"workload": "verify", "ok": False, "errors": 1,
                    "error_details": ["no disk found"]}
        layer = self.layer
        if self.recover is not None:
            if self.journal.next_seq() == 0:
                self._recover(self.recover)
            else:
                log_event(_log, "verify_recover_skipped", level=logging.WARNING,
                          reason="this memory's journal is not empty: recovered before")
        self._load_journal()
        log_event(_log, "verify_started", seq=self.seq, journaled_lbas=len(self.next_gen),
                  awaiting=len(self.awaiting), resubmitted_unsent=self.resubmitted,
                  depth=self.depth, window=self.window)
        next_progress = self.clock() + self.progress
        while not self.should_stop():
            if self.awaiting:
                self._settle_awaited()
            if self.count is not None and self.issued >= self.count:
                break
            if self.checkpoint_due:
                if self.outstanding == 0 and not self.awaiting and not layer.busy:
                    self._checkpoint()
                    continue
            elif self.outstanding < self.depth and self._pick():
                continue
            layer.poll(0.05)
            if self.clock() >= next_progress:
                log_event(_log, "verify_progress", **self.counters(), **self._interval())
                next_progress = self.clock() + self.progress
        self._drain()
        # the final pass: every LBA journaled, read back once more
        keys = sorted(k for k in self.next_gen if k[:2] in self.by_address)
        final_before = self.verified
        deadline = self.clock() + _DRAIN_S
        for key in keys:
            while self.outstanding >= self.depth and self.clock() < deadline:
                layer.poll(0.05)
            if key in self.writing or self.clock() >= deadline:
                continue
            self._read(key, final=True)
        self._drain()
        final = self.verified - final_before
        counters = self.counters()
        log_event(_log, "verify_progress", **counters)
        return {"workload": "verify",
                "ok": counters["errors"] == 0 and not self.awaiting and self.outstanding == 0,
                **counters, "final_checked": final, "final_lbas": len(keys),
                "resubmitted_unsent": self.resubmitted, "unresolved": len(self.awaiting),
                "journal": self.journal.summary(), "journal_full": self.journal_full,
                "checkpoints": self.checkpoints, "recovery": self.recovery,
                "stopped": self.should_stop(), "error_details": self.details,
                **self.layer.host.stall_report()}

    def _drain(self) -> None:
        deadline = self.clock() + _DRAIN_S
        while (self.outstanding > 0 or self.layer.busy or self.awaiting) and \
                self.clock() < deadline:
            self.layer.poll(0.05)
            if self.awaiting:
                self._settle_awaited()


class Load:
    """The ``load`` workload: random reads and writes, IOPS and latency."""

    def __init__(self, layer: BlockLayer, *, depth: int, read_pct: float, bs: int,
                 should_stop: Callable[[], bool], count: int | None = None,
                 progress: float = 1.0, seed: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.layer = layer
        self.depth = max(1, depth)
        self.read_pct = read_pct
        self.bs = max(1, bs)
        self.should_stop = should_stop
        self.count = count
        self.progress = progress
        self.clock = clock
        self.rng = random.Random(seed if seed is not None else os.urandom(8))  # noqa: S311
        self.disks = [d for d in sorted(layer.present_disks(), key=lambda d: d.address)
                      if d.num_blocks >= self.bs]
        self.outstanding = 0
        self.issued = 0
        self.reads = 0
        self.writes = 0
        self.errors = 0
        self.details: list[str] = []
        self.latencies: dict[str, list[float]] = {"read": [], "write": []}
        self._window: list[float] = []
        self._payload = {d.block_size: os.urandom(d.block_size * min(self.bs, d.max_blocks))
                         for d in self.disks}

    def _done(self, request: IoRequest) -> None:
        self.outstanding -= 1
        if request.op == "read":
            self.reads += 1
        else:
            self.writes += 1
        if request.error is not None:
            self.errors += 1
            if len(self.details) < 20:
                self.details.append(f"{request.op} {request.disk.name} lba {request.lba}: "
                                    f"{request.error}")
            return
        self.latencies[request.op].append(request.latency)
        self._window.append(request.latency)

    def _submit(self) -> None:
        disk = self.rng.choice(self.disks)
        blocks = min(self.bs, disk.max_blocks)
        lba = self.rng.randrange(disk.num_blocks // blocks) * blocks
        try:
            if self.rng.random() * 100 < self.read_pct:
                disk.submit_read(lba, blocks, callback=self._done)
            else:
                disk.submit_write(lba, self._payload[disk.block_size], callback=self._done)
        except IoError as exc:
            self.errors += 1
            self.details.append(str(exc))
            return
        self.outstanding += 1
        self.issued += 1

    @staticmethod
    def _lat(values: list[float]) -> dict[str, Any]:
        ordered = sorted(values)
        us = 1e6
        return {"avg_us": round(sum(ordered) / len(ordered) * us, 1) if ordered else 0.0,
                "p50_us": round(percentile(ordered, 50) * us, 1),
                "p99_us": round(percentile(ordered, 99) * us, 1),
                "max_us": round((ordered[-1] if ordered else 0.0) * us, 1)}

    def run(self) -> dict[str, Any]:
        if not self.disks:
            return {"workload": "load", "ok": False, "errors": 1,
                    "error_details": [f"no disk of at least {self.bs} blocks"]}
        start = window_start = self.clock()
        while not self.should_stop():
            if self.count is not None and self.issued >= self.count:
                break
            if self.outstanding < self.depth:
                self._submit()
                continue
            self.layer.poll(0.05)
            now = self.clock()
            if now - window_start >= self.progress:
                log_event(_log, "load_progress", iops=round(len(self._window) /
                                                            (now - window_start), 1),
                          reads=self.reads, writes=self.writes, errors=self.errors,
                          max_stall_ms=self.layer.host.max_stall_ms(),
                          **self._lat(self._window))
                self._window = []
                window_start = now
        deadline = self.clock() + _DRAIN_S
        while (self.outstanding > 0 or self.layer.busy) and self.clock() < deadline:
            self.layer.poll(0.05)
        elapsed = max(1e-9, self.clock() - start)
        ops = self.reads + self.writes
        return {"workload": "load", "ok": self.errors == 0 and self.outstanding == 0,
                "ios": ops, "reads": self.reads, "writes": self.writes,
                "errors": self.errors, "seconds": round(elapsed, 3),
                "iops": round(ops / elapsed, 1), "bs_blocks": self.bs,
                "read_pct": self.read_pct, "depth": self.depth,
                "read_latency": self._lat(self.latencies["read"]),
                "write_latency": self._lat(self.latencies["write"]),
                "latency": self._lat(self.latencies["read"] + self.latencies["write"]),
                "stopped": self.should_stop(), "error_details": self.details,
                **self.layer.host.stall_report()}
