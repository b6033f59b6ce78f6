"""The volatile write cache of fault injection (vfdirect.storage.faults, ``volatile_cache``):
what a power cut may lose. Plain writes live in the adapter's memory until a flush, a FUA
write covering them, or an early write-back; a "power cut" (the cache dropped, as SIGKILL
of the adapter drops it) loses exactly those, and never what was flushed or written FUA."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.scsi.cdb import Read10, SynchronizeCache10, Write10
from vfdirect.core.scsi.identity import LuIdentity
from vfdirect.core.scsi.lu import LogicalUnit
from vfdirect.core.wwn import Wwn
from vfdirect.storage import FileBackend
from vfdirect.storage.faults import (
    FAULTS_ENV,
    CacheSpec,
    FaultControlError,
    FaultInjector,
    FaultSpec,
    set_lun_faults,
)

BS = 512
NUM_BLOCKS = 16


@pytest.fixture(autouse=True)
def faults_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "1")


@pytest.fixture
def lun_path(tmp_path: Path) -> Path:
    path = tmp_path / "lun-00000.img"
    FileBackend.create(path, BS, NUM_BLOCKS).close()
    return path


def blk(byte: int, n: int = 1) -> bytes:
    return bytes([byte]) * (BS * n)


def read(dev: FileBackend, lba: int, count: int = 1) -> bytes:
    buf = bytearray(count * BS)
    dev.read_blocks(lba, [memoryview(buf)])
    return bytes(buf)


def on_file(path: Path, lba: int, count: int = 1) -> bytes:
    """What survives a power cut: the file's content."""
    with open(path, "rb") as f:
        f.seek(lba * BS)
        return f.read(count * BS)


def power_cut(dev: FileBackend) -> None:
    """Drop the cache as SIGKILL of the adapter would, then close the descriptor."""
    injector = dev._faults
    assert isinstance(injector, FaultInjector)
    injector.drop_cache()
    dev.close()


def test_spec_round_trip_and_errors() -> None:
    spec = FaultSpec.load({"volatile_cache": {"writeback": 0.3, "seed": 7}})
    assert spec.volatile_cache == CacheSpec(0.3, 7)
    assert FaultSpec.load(spec.dump()) == spec
    for bad, word in (({"writeback": 2}, "writeback"), ({"seed": "x"}, "seed"),
                      ({"ignore_fua": 1}, "ignore_fua"), ({"bogus": 1}, "unknown"),
                      ([], "object")):
        with pytest.raises(FaultControlError, match=word):
            FaultSpec.load({"volatile_cache": bad}, "f.fault")


def test_unflushed_writes_are_lost_flushed_and_fua_survive(lun_path: Path) -> None:
    dev = FileBackend(lun_path, BS)
    set_lun_faults(lun_path, volatile_cache={"writeback": 0, "seed": 1})
    dev.write_blocks(0, [memoryview(blk(1, 2))])
    dev.flush()
    dev.write_blocks(2, [memoryview(blk(2))], fua=True)
    dev.write_blocks(3, [memoryview(blk(3))])           # never flushed
    dev.write_blocks(0, [memoryview(blk(4))])           # replaces a flushed block, unflushed
    # reads see the cache
    assert read(dev, 0, 4) == blk(4) + blk(1) + blk(2) + blk(3)
    power_cut(dev)
    assert on_file(lun_path, 0, 4) == blk(1) + blk(1) + blk(2) + bytes(BS)


def test_fua_write_covers_cached_blocks_and_clean_close_writes_back(lun_path: Path) -> None:
    with FileBackend(lun_path, BS) as dev:
        set_lun_faults(lun_path, volatile_cache={"writeback": 0})
        dev.write_blocks(5, [memoryview(blk(7, 3))])
        dev.write_blocks(6, [memoryview(blk(8))], fua=True)
        assert on_file(lun_path, 5, 3) == bytes(BS) + blk(8) + bytes(BS)
        assert read(dev, 5, 3) == blk(7) + blk(8) + blk(7)
    # a clean shutdown writes the cache back, as a disk does before powering off
    assert on_file(lun_path, 5, 3) == blk(7) + blk(8) + blk(7)


def test_scatter_reads_see_cached_blocks_across_buffers(lun_path: Path) -> None:
    with FileBackend(lun_path, BS) as dev:
        set_lun_faults(lun_path, volatile_cache={})
        dev.write_blocks(1, [memoryview(blk(9, 2))])
        a, b = bytearray(BS + 100), bytearray(2 * BS - 100)
        dev.read_blocks(0, [memoryview(a), memoryview(b)])
        assert bytes(a + b) == bytes(BS) + blk(9, 2)


def test_broken_knobs_lose_fua_and_flushed_writes(lun_path: Path) -> None:
    dev = FileBackend(lun_path, BS)
    set_lun_faults(lun_path, volatile_cache={"ignore_fua": True, "flush_noop": True})
    dev.write_blocks(0, [memoryview(blk(1))], fua=True)
    dev.write_blocks(1, [memoryview(blk(2))])
    dev.flush()
    power_cut(dev)
    assert on_file(lun_path, 0, 2) == bytes(2 * BS)


def test_scsi_synchronize_cache_and_fua_reach_the_cache(lun_path: Path) -> None:
    dev = FileBackend(lun_path, BS)
    set_lun_faults(lun_path, volatile_cache={"writeback": 0})
    lu = LogicalUnit(dev, LuIdentity(vendor="VFDIRECT", product="VDISK", revision="0001",
                                     serial="S1", wwn=Wwn(bytes.fromhex("5001405123456780"))))
    assert lu.execute(Write10(lba=0, transfer_length=1).encode(), [memoryview(blk(1))]).good
    assert lu.execute(Write10(lba=1, transfer_length=1, fua=True).encode(),
                      [memoryview(blk(2))]).good
    assert on_file(lun_path, 0, 2) == bytes(BS) + blk(2)
    assert lu.execute(SynchronizeCache10().encode()).good
    assert on_file(lun_path, 0, 2) == blk(1) + blk(2)
    assert lu.execute(Write10(lba=2, transfer_length=1).encode(), [memoryview(blk(3))]).good
    buf = bytearray(3 * BS)
    assert lu.execute(Read10(lba=0, transfer_length=3).encode(), (),
                      [memoryview(buf)]).good
    assert bytes(buf) == blk(1) + blk(2) + blk(3)
    power_cut(dev)
    assert on_file(lun_path, 2) == bytes(BS)


def test_concurrent_writers_and_flushes(lun_path: Path) -> None:
    """IO threads share the cache: after they all flushed, every last write is on file."""
    with FileBackend(lun_path, BS) as dev:
        set_lun_faults(lun_path, volatile_cache={"writeback": 0.2, "seed": 3})

        def worker(lba: int) -> None:
            for i in range(50):
                dev.write_blocks(lba, [memoryview(blk(i + 1))], fua=i % 7 == 0)
                assert read(dev, lba) == blk(i + 1)
            dev.flush()

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert on_file(lun_path, 0, 4) == blk(50) * 4


ops = st.lists(st.tuples(st.sampled_from(["write", "fua", "flush"]),
                         st.integers(0, 3), st.integers(1, 250)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops=ops, writeback=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 9))
def test_power_cut_keeps_durable_and_never_invents(tmp_path_factory: pytest.TempPathFactory,
                                                   ops: list[tuple[str, int, int]],
                                                   writeback: float, seed: int) -> None:
    """Model check: after a cut each block holds its last durable value or a later written
    one (never older, never something not written); reads always see the last write."""
    path = tmp_path_factory.mktemp("vc") / "lun.img"
    FileBackend.create(path, BS, NUM_BLOCKS).close()
    dev = FileBackend(path, BS)
    set_lun_faults(path, volatile_cache={"writeback": writeback, "seed": seed})
    durable = dict.fromkeys(range(4), 0)       # last value known durable
    since: dict[int, list[int]] = {lba: [] for lba in range(4)}  # written after it
    last = dict(durable)
    for op, lba, value in ops:
        if op == "flush":
            dev.flush()
            for b in range(4):
                durable[b] = last[b]
                since[b] = []
            continue
        dev.write_blocks(lba, [memoryview(blk(value))], fua=op == "fua")
        last[lba] = value
        if op == "fua":
            durable[lba] = value
            since[lba] = []
        else:
            since[lba].append(value)
        assert read(dev, lba) == blk(value)
    power_cut(dev)
    for b in range(4):
        allowed = {durable[b], *since[b]}
        assert on_file(path, b) in {blk(v) if v else bytes(BS) for v in allowed}
