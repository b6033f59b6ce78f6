"""Durability under power cuts (issue 8): the adapter and the VM are killed -9 at random
points while the verify workload writes with FUA and flushes at QD 8; the LUNs have a
volatile write cache (fault injection) that the kill loses, as a power cut loses a
disk's cache. After each restart, every write acknowledged with FUA or before a
completed flush must read back intact (no lost write, no torn block, no generation
never written), judged from the journal of the cut alone.

Figures: printed with ``-s`` and written to ``artifacts/proof/powercut.json``.
Knobs: ``VFDIRECT_POWERCUTS`` (default 200) cuts, ``VFDIRECT_POWERCUT_SEED`` (default:
random, printed) the seed of the cut points and of the caches' write-back order.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from powercut_helpers import CutRig, Figures, Workload, alive, fork_server, run_cuts

from vfdirect.core.guest.journal import (
    DurabilityExpectation,
    EntryState,
    Journal,
    durability_expectations,
    make_block,
    recovered_verdict,
)
from vfdirect.core.virtio import RegionMemory
from vfdirect.storage import StorageArray

CUTS = int(os.environ.get("VFDIRECT_POWERCUTS", "200"))
SEED = int(os.environ.get("VFDIRECT_POWERCUT_SEED", str(random.randrange(1 << 30))))
ARRAY_WWN_VALUE = 0x6000
LUN_BLOCKS = 8192


def make_array(root: Path) -> StorageArray:
    from daemon_helpers import ARRAY_WWN  # noqa: PLC0415 (on sys.path via powercut_helpers)

    array = StorageArray.create(root / "array0", ARRAY_WWN)
    for _ in range(2):
        array.lun_create(LUN_BLOCKS, 512)
    return array


# -- the checker, in-process (pure) ----------------------------------------------------


def _journal() -> Journal:
    memory = RegionMemory.from_buffers([(0, bytearray(64 * 1024))])
    return Journal.format(memory, 0, 64 * 1024, run_id=1)


def test_claim_powercut_checker_rules_from_the_journal_alone() -> None:
    """FUA acks are durable; a plain ack is durable only when a flush of ITS disk,
    submitted after the ack, completed; pending and failed writes are allowed, never
    required; flags and flush marks survive the journal's encoding."""
    j = _journal()

    def write(seq: int, lba: int, gen: int, *, fua: bool = False, disk: int = 0) -> None:
        j.record_pending(seq, target=0, lun=disk, lba=lba, generation=gen, crc=0, fua=fua)

    def flush(seq: int, index: int, disk: int = 0) -> None:
        j.record_pending(seq, target=0, lun=disk, lba=index, generation=0, crc=0,
                         flush=True)

    write(0, 1, 1)                              # acked before flush 0: durable
    j.settle(0, EntryState.ACKED, mark=1)
    write(1, 2, 1, fua=True)                    # FUA: durable
    j.settle(1, EntryState.ACKED, mark=1)
    flush(2, 0)                                 # flush 0 of disk 0, completes
    write(3, 3, 1)                              # acked after flush 0 was submitted
    j.settle(3, EntryState.ACKED, mark=2)
    j.settle(2, EntryState.ACKED)
    write(4, 4, 1, disk=1)                      # other disk: flush 0 of disk 0 no help
    j.settle(4, EntryState.ACKED, mark=1)
    write(5, 1, 2)                              # newer, pending at the cut
    write(6, 2, 2)                              # newer, failed
    j.settle(6, EntryState.FAILED, mark=2)
    flush(7, 1)                                 # flush 1: pending at the cut (no help)
    entries = list(j.entries())
    assert [(e.fua, e.flush, e.mark) for e in entries][:4] == [
        (False, False, 1), (True, False, 1), (False, True, 0), (False, False, 2)]
    expect, stats = durability_expectations(entries)
    assert expect[(0, 0, 1)] == DurabilityExpectation(1, frozenset({1, 2}), 1)
    assert expect[(0, 0, 2)].floor == 1 and expect[(0, 0, 3)].floor == 0
    assert expect[(0, 1, 4)].floor == 0
    assert stats.dump() == {"writes": 6, "acked": 4, "acked_fua": 1, "pending": 1,
                            "failed": 1, "flushes": 2, "flushes_completed": 1,
                            "required": 2, "floors": 2}
    # verdicts of blocks read back
    vm, bs = 7, 512

    def judge(data: bytes, key: tuple[int, int, int]) -> tuple[str, int]:
        return recovered_verdict(data, expect.get(key), vm=vm, lba=key[2], block_size=bs)

    assert judge(make_block(vm, 1, 2, 5, bs), (0, 0, 1)) == ("ok", 2)   # pending landed
    assert judge(make_block(vm, 1, 1, 0, bs), (0, 0, 1)) == ("ok", 1)
    assert judge(bytes(bs), (0, 0, 1)) == ("lost", 0)
    assert judge(bytes(bs), (0, 0, 3)) == ("ok", 0)                      # not durable
    assert judge(make_block(vm, 1, 9, 0, bs), (0, 0, 1)) == ("invented", 9)
    torn = bytearray(make_block(vm, 1, 1, 0, bs))
    torn[300:] = make_block(vm, 1, 2, 5, bs)[300:]
    assert judge(bytes(torn), (0, 0, 1))[0] == "torn"
    assert judge(make_block(vm, 5, 1, 0, bs), (0, 0, 5)) == ("invented", 1)


def _shm_leftovers() -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"vfd-test-{os.getpid()}-cut-*"))


@pytest.mark.timeout(600)
def test_claim_powercut_acknowledged_durable_writes_survive(tmp_path: Path) -> None:
    print(f"\npowercut: seed {SEED} (rerun: VFDIRECT_POWERCUT_SEED={SEED} "
          f"VFDIRECT_POWERCUTS={CUTS})")
    array = make_array(tmp_path / "san")
    figures = Figures("powercut", SEED)
    with fork_server() as ctx:
        rig = CutRig(ctx, tmp_path, array, seed=SEED,
                     cache={"writeback": 0.3})
        try:
            run_cuts(rig, CUTS, figures)
        finally:
            rig.close()
    figures.report()
    # no leaked process (the fork server is stopped too), memory file or socket
    assert len(rig.pids) == 2 * (CUTS + 1)
    assert [pid for pid in rig.pids if alive(pid)] == []
    assert not any(p.suffix == ".sock" for p in (tmp_path / "host1").iterdir())
    assert figures.cuts == CUTS
    # the faults fired: IO was in flight at the cuts, and there was something to lose
    assert sum(figures.in_flight) > 0 and max(figures.in_flight) > 1, figures.in_flight
    assert sum(1 for n in figures.in_flight if n) >= CUTS // 2, figures.in_flight
    assert figures.required > 0 and figures.flushes_completed > 0 and figures.acked_fua > 0
    assert figures.checks >= CUTS
    # the volatile cache did take back acknowledged writes that were not yet durable
    # (about one cut in two does: a statistical check, for runs long enough)
    if CUTS >= 50:
        assert figures.rolled_back > 0, figures.dump()
    # the invariant
    assert (figures.lost, figures.torn, figures.invented) == (0, 0, 0), figures.details
    assert _shm_leftovers() == []


BROKEN_CUTS = 4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("broken", ["ignore_fua", "flush_noop"])
def test_claim_powercut_checker_catches_a_broken_durability_path(
        tmp_path: Path, broken: str) -> None:
    """Teeth: with a cache that ignores FUA (or a flush that does nothing) the same cuts
    DO lose acknowledged durable writes, and the checker reports them."""
    seed = SEED + 1
    array = make_array(tmp_path / "san")
    figures = Figures(f"powercut-broken-{broken}", seed)
    # without write-back the broken path loses everything it should have kept
    workload = (Workload(fua_pct=50.0, flush_every=0) if broken == "ignore_fua"
                else Workload(fua_pct=0.0, flush_every=6))
    with fork_server() as ctx:
        rig = CutRig(ctx, tmp_path, array, seed=seed,
                     cache={"writeback": 0.0, broken: True}, workload=workload)
        try:
            run_cuts(rig, BROKEN_CUTS, figures, intact=False)
        finally:
            rig.close()
    figures.report()
    assert figures.required > 0
    assert figures.lost > 0, figures.dump()
    assert any("lost" in d for d in figures.details), figures.details
    assert _shm_leftovers() == []


HOST_CUTS = int(os.environ.get("VFDIRECT_HOST_POWERCUTS", "5"))


@pytest.mark.timeout(600)
def test_claim_powercut_whole_host_kill9_keeps_durable_writes(tmp_path: Path) -> None:
    """The second tier: ``vfdirect host`` killed -9 with its adapter and VM, restarted
    with ``vfdirect host start`` (it reconciles from the inventory) and ``vm start``."""
    from powercut_helpers import HostRig, run_host_cuts  # noqa: PLC0415

    seed = SEED + 2
    print(f"\npowercut-host: seed {seed} (VFDIRECT_HOST_POWERCUTS={HOST_CUTS})")
    figures = Figures("powercut-host", seed)
    rig = HostRig(tmp_path, seed=seed, cache={"writeback": 0.3})
    try:
        run_host_cuts(rig, HOST_CUTS, figures)
    finally:
        rig.close()
    figures.report()
    assert rig.host.pids and [pid for pid in rig.host.pids if alive(pid)] == []
    assert figures.cuts == HOST_CUTS
    assert sum(figures.in_flight) > 0, figures.in_flight
    assert figures.required > 0 and figures.checks >= HOST_CUTS
    assert (figures.lost, figures.torn, figures.invented) == (0, 0, 0), figures.details
