"""The VM's built-in workloads (shell): ``selftest`` and the journaled ``sequence`` of
numbered writes.

* ``selftest``: the disks found must be exactly those of the firmware table (address,
  capacity, block size, serial); on each disk a few self-describing blocks are written
  (one with FUA), flushed, read back and compared byte for byte; a read beyond the last
  block must fail with CHECK CONDITION, ILLEGAL REQUEST;
* ``sequence``: writes numbered 0..count-1, round-robin over the disks, ``depth`` at
  once. Each is recorded in the journal (guest memory) as PENDING before it is submitted
  (its request cookie names the journal entry) and settled ACKED or FAILED from its
  completion. After a kill and ``--restart`` the journal and the driver's request table
  say, for each PENDING entry, whether the device has it (its completion comes back,
  ``recovered``) or never saw it (submitted again: the device never saw it, so this is
  not a repeat). Nothing acknowledged is lost, nothing is written twice. At the end every
  ACKED block is read back and checked.
"""

from __future__ import annotations

import logging
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
    make_block,
)
from vfdirect.core.guest.virtscsi import Completion
from vfdirect.core.scsi.cdb import Read16, encode_cdb
from vfdirect.core.scsi.sense import SenseKey
from vfdirect.core.virtio.scsi import VirtioScsiResponse
from vfdirect.vm.block import BlockLayer, Disk, IoError, IoRequest
from vfdirect.vm.log import log_event

__all__ = ["Sequence", "check_disks", "selftest", "settle_orphan", "verify_journal"]

_COOKIE_MASK = 0xFFFF_FFFF_FFFF
_log = logging.getLogger("vfdirect.vm")


def check_disks(layer: BlockLayer) -> dict[str, Any]:
    """The disks found against the firmware table's (claim A8)."""
    found = {d.address: d for d in layer.present_disks()}
    table = layer.fwtable
    expected = {d.address: d for d in table.disks} if table is not None else {}
    mismatched = []
    for address, want in expected.items():
        got = found.get(address)
        if got is not None and (got.num_blocks, got.block_size, got.serial) != (
                want.capacity_blocks, want.block_size, want.serial):
            mismatched.append({"target": address[0], "lun": address[1],
                               "expected": [want.capacity_blocks, want.block_size,
                                            want.serial],
                               "found": [got.num_blocks, got.block_size, got.serial]})
    return {
        "disks": [d.describe() for d in layer.present_disks()],
        "missing": [list(a) for a in sorted(set(expected) - set(found))],
        "unexpected": [list(a) for a in sorted(set(found) - set(expected))] if table else [],
        "mismatched": mismatched,
    }


def selftest(layer: BlockLayer, *, vm: int, generation: int) -> dict[str, Any]:
    report = check_disks(layer)
    ok = bool(report["disks"]) and not (report["missing"] or report["unexpected"]
                                        or report["mismatched"])
    errors: list[str] = []
    verified = 0
    for disk in layer.present_disks():
        lbas = sorted({0, disk.num_blocks // 2, disk.num_blocks - 1})
        blocks = {lba: make_block(vm, lba, generation, lba, disk.block_size) for lba in lbas}
        try:
            writes = [disk.submit_write(lba, data, fua=(i == 0))
                      for i, (lba, data) in enumerate(blocks.items())]
            layer.wait(writes, 60.0)
            for request in writes:
                request.result()
            disk.flush()
            reads = {lba: disk.submit_read(lba, 1) for lba in lbas}
            layer.wait(list(reads.values()), 60.0)
            for lba, request in reads.items():
                if request.result() != blocks[lba]:
                    errors.append(f"{disk.name} lba {lba}: read back differs")
                else:
                    verified += 1
            # SBC-3: a transfer beyond the capacity is LOGICAL BLOCK ADDRESS OUT OF RANGE.
            c = layer.command(disk.target, disk.lun,
                              encode_cdb(Read16(lba=disk.num_blocks, transfer_length=1)),
                              data_in=disk.block_size)
            sense = c.sense_data()
            if c.response != VirtioScsiResponse.OK or sense is None or \
                    sense.sense.key != SenseKey.ILLEGAL_REQUEST:
                errors.append(f"{disk.name}: a read beyond the end did not fail with "
                              "ILLEGAL REQUEST")
        except IoError as exc:
            errors.append(str(exc))
    return {"workload": "selftest", "ok": ok and not errors, "verified_blocks": verified,
            "errors": errors, **report}


# -- the journaled sequence of numbered writes --------------------------------------------


def settle_orphan(journal: Journal, completion: Completion) -> None:
    """The completion of a journaled write submitted by a killed process: settle its
    journal entry (idempotent: a completion may be delivered twice, see virtscsi)."""
    if completion.cookie & ~_COOKIE_MASK != COOKIE_BASE:
        return
    seq = completion.cookie & _COOKIE_MASK
    if seq < journal.capacity and journal.entry(seq).state is EntryState.PENDING:
        journal.settle(seq, EntryState.ACKED if completion.good else EntryState.FAILED)


class Sequence:
    """Numbered writes through the block layer, journaled in guest memory.

    ``in_device``: the cookies the driver found in flight or done when it attached (taken
    before the first poll); a PENDING journal entry whose cookie is not there was never
    seen by the device and is submitted again."""

    def __init__(self, layer: BlockLayer, journal: Journal, *, vm: int, count: int,
                 depth: int, interval: float, in_device: set[int],
                 should_stop: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.layer = layer
        self.journal = journal
        self.vm = vm
        self.count = min(count, journal.capacity)
        self.depth = max(1, depth)
        self.interval = interval
        self.in_device = in_device
        self.should_stop = should_stop
        self.clock = clock
        self.disks = sorted(layer.present_disks(), key=lambda d: d.address)
        self.by_address = {d.address: d for d in self.disks}
        self.outstanding = 0
        self.resubmitted = 0
        self.submitted = 0
        self.awaiting: set[int] = set()

    def plan(self, seq: int) -> tuple[Disk, int, int]:
        disk = self.disks[seq % len(self.disks)]
        index = seq // len(self.disks)
        return disk, index % disk.num_blocks, index // disk.num_blocks

    def _done(self, request: IoRequest) -> None:
        self.outstanding -= 1
        seq = request.cookie & _COOKIE_MASK
        self.journal.settle(seq, EntryState.ACKED if request.error is None
                            else EntryState.FAILED)
        if request.error is not None:
            log_event(_log, "sequence_write_failed", level=logging.WARNING, seq=seq,
                      error=str(request.error))

    def _submit(self, seq: int, entry: JournalEntry | None = None) -> None:
        if entry is None:
            disk, lba, generation = self.plan(seq)
            data = make_block(self.vm, lba, generation, seq, disk.block_size)
            # The journal first: a write is never in the device without its entry.
            self.journal.record_pending(seq, target=disk.target, lun=disk.lun, lba=lba,
                                        generation=generation, crc=zlib.crc32(data))
        else:  # a PENDING entry whose write the device never saw
            disk = self.by_address[(entry.target, entry.lun)]
            lba, generation = entry.lba, entry.generation
            data = make_block(self.vm, lba, generation, seq, disk.block_size)
        disk.submit_write(lba, data, callback=self._done, cookie=COOKIE_BASE | seq)
        self.outstanding += 1
        self.submitted += 1

    def _settled(self) -> bool:
        self.awaiting = {s for s in self.awaiting
                         if self.journal.entry(s).state is EntryState.PENDING}
        return not self.awaiting

    def run(self) -> dict[str, Any]:
        if not self.disks:
            return {"workload": "sequence", "ok": False, "errors": ["no disk found"]}
        layer = self.layer
        for entry in self.journal.entries():
            if entry.state is not EntryState.PENDING:
                continue
            if (COOKIE_BASE | entry.seq) in self.in_device:
                self.awaiting.add(entry.seq)  # its completion comes back (recovered)
            elif (entry.target, entry.lun) in self.by_address:
                self._submit(entry.seq, entry)
                self.resubmitted += 1
        seq = self.journal.next_seq()
        next_at = self.clock()
        while not self.should_stop():
            now = self.clock()
            if seq < self.count and self.outstanding < self.depth and now >= next_at:
                self._submit(seq)
                seq += 1
                next_at = now + self.interval
                continue
            if seq >= self.count and self.outstanding <= 0 and self._settled():
                break
            wait = 0.05
            if seq < self.count and self.outstanding < self.depth:
                wait = min(wait, max(0.0, next_at - now))
            layer.poll(wait)
        # Drain what is in flight (also on SIGTERM: a clean shutdown leaves no orphan).
        deadline = self.clock() + 30.0
        while (self.outstanding > 0 or layer.busy or not self._settled()) and \
                self.clock() < deadline:
            layer.poll(0.05)
        result = verify_journal(layer, self.journal, vm=self.vm)
        result.update({"workload": "sequence", "count": self.count,
                       "submitted": self.submitted, "resubmitted_unsent": self.resubmitted,
                       "stopped": self.should_stop()})
        # Stopped by SIGTERM, the run is still ok if all it acknowledged reads back.
        result["complete"] = result["acked"] == self.count
        result["ok"] = result["ok"] and (result["complete"] or result["stopped"])
        return result


def verify_journal(layer: BlockLayer, journal: Journal, *, vm: int) -> dict[str, Any]:
    """Read back the block of every ACKED journal entry (the latest generation of each
    LBA) and check it; journal counts alongside."""
    latest: dict[tuple[int, int, int], JournalEntry] = {}
    counts = {"acked": 0, "failed": 0, "pending": 0}
    for entry in journal.entries():
        counts[entry.state.name.lower()] += 1
        if entry.state is EntryState.ACKED:
            key = (entry.target, entry.lun, entry.lba)
            if key not in latest or latest[key].seq < entry.seq:
                latest[key] = entry
    errors: list[str] = []
    checked = 0
    for (target, lun, lba), entry in sorted(latest.items()):
        disk = layer.disk_at(target, lun)
        if disk is None:
            errors.append(f"seq {entry.seq}: no disk at {target}:{lun}")
            continue
        try:
            data = disk.read(lba, 1)
        except IoError as exc:
            errors.append(f"seq {entry.seq}: {exc}")
            continue
        check = check_block(data, vm=vm, lba=lba, block_size=disk.block_size)
        expected = make_block(vm, lba, entry.generation, entry.seq, disk.block_size)
        if not check.ok or data != expected or zlib.crc32(data) != entry.crc:
            errors.append(f"seq {entry.seq} {disk.name} lba {lba}: {check.reason} "
                          f"(found seq {check.seq} generation {check.generation})")
        else:
            checked += 1
    return {"ok": not errors and counts["pending"] == 0 and counts["failed"] == 0,
            "verified_blocks": checked, "errors": errors[:20], **counts}
