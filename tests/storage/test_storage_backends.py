"""Conformance suite: every physical LUN backend honours the same contract.

Parametrized over the three backends (memory, sparse file, loop device) and both block
sizes. The loop backend is skipped, with the reason shown, only where no loop device can
be attached.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storage_helpers import BACKEND_KINDS, BackendFactory, BackendUnderTest, SyscallSpy

from vfdirect.core.alloc import SpaceAllocationFailed
from vfdirect.core.block import BlockDevice, BlockRangeError, MediumError
from vfdirect.storage import FileBackend, LunBackend, MemoryBackend, _posixio

NUM_BLOCKS = 64


def pattern(seed: int, nbytes: int) -> bytes:
    """Deterministic non-zero bytes, distinct per seed."""
    block = bytes((seed * 31 + i * 7 + 1) % 251 + 1 for i in range(256))
    return (block * (nbytes // 256 + 1))[:nbytes]


def read(dev: BlockDevice, lba: int, count: int) -> bytes:
    buf = bytearray(count * dev.block_size)
    dev.read_blocks(lba, [memoryview(buf)])
    return bytes(buf)


def independent_read(path: Path, offset: int, length: int) -> bytes:
    """Read through a separate descriptor, as another process would."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


@pytest.fixture(params=[(k, bs) for k in BACKEND_KINDS for bs in (512, 4096)],
                ids=lambda p: f"{p[0]}-{p[1]}")
def lun(request: pytest.FixtureRequest, make_backend: BackendFactory) -> BackendUnderTest:
    kind, block_size = request.param
    return make_backend(kind, block_size, NUM_BLOCKS)


def test_is_a_block_device_and_lun_backend(lun: BackendUnderTest) -> None:
    assert isinstance(lun.backend, BlockDevice)
    assert isinstance(lun.backend, LunBackend)


def test_geometry(lun: BackendUnderTest) -> None:
    assert lun.backend.num_blocks == NUM_BLOCKS
    assert lun.backend.block_size in (512, 4096)
    if lun.path is not None and lun.kind == "file":
        assert os.stat(lun.path).st_size == NUM_BLOCKS * lun.backend.block_size


def test_fresh_lun_reads_zeros(lun: BackendUnderTest) -> None:
    assert read(lun.backend, 0, NUM_BLOCKS) == bytes(NUM_BLOCKS * lun.backend.block_size)


def test_read_after_write(lun: BackendUnderTest) -> None:
    dev = lun.backend
    data = pattern(1, 3 * dev.block_size)
    dev.write_blocks(5, [memoryview(data)])
    assert read(dev, 5, 3) == data
    # neighbours untouched
    assert read(dev, 4, 1) == bytes(dev.block_size)
    assert read(dev, 8, 1) == bytes(dev.block_size)


def test_scatter_gather(lun: BackendUnderTest) -> None:
    dev = lun.backend
    bs = dev.block_size
    data = pattern(2, 6 * bs)
    # write from three unevenly sized buffers (not block-aligned individually)
    cuts = [0, bs // 2, 4 * bs + 100, 6 * bs]
    src = [memoryview(data[a:b]) for a, b in itertools.pairwise(cuts)]
    dev.write_blocks(10, src)
    # read into a different split, some of it odd-sized views of one bytearray
    out = bytearray(6 * bs)
    mv = memoryview(out)
    dev.read_blocks(10, [mv[: bs + 1], mv[bs + 1 : 3 * bs], mv[3 * bs :]])
    assert bytes(out) == data


def test_non_byte_memoryview_formats(lun: BackendUnderTest) -> None:
    dev = lun.backend
    data = bytearray(pattern(3, 2 * dev.block_size))
    dev.write_blocks(0, [memoryview(data).cast("I")])
    out = bytearray(2 * dev.block_size)
    dev.read_blocks(0, [memoryview(out).cast("Q")])
    assert out == data


def test_many_buffers_beyond_iov_max(lun: BackendUnderTest) -> None:
    dev = lun.backend
    total = dev.block_size * 8
    data = pattern(4, total)
    piece = total // (2 * _posixio.IOV_MAX) or 1
    src = [memoryview(data[i : i + piece]) for i in range(0, total, piece)]
    assert len(src) > _posixio.IOV_MAX
    dev.write_blocks(20, src)
    out = bytearray(total)
    mv = memoryview(out)
    dev.read_blocks(20, [mv[i : i + piece] for i in range(0, total, piece)])
    assert bytes(out) == data


def test_last_block(lun: BackendUnderTest) -> None:
    dev = lun.backend
    data = pattern(5, dev.block_size)
    dev.write_blocks(NUM_BLOCKS - 1, [memoryview(data)])
    assert read(dev, NUM_BLOCKS - 1, 1) == data
    # zero-length IO at the very end is in range
    dev.read_blocks(NUM_BLOCKS, [])
    dev.write_blocks(NUM_BLOCKS, [memoryview(b"")])


@pytest.mark.parametrize(("lba", "count"), [(NUM_BLOCKS, 1), (NUM_BLOCKS - 1, 2), (-1, 1),
                                            (0, NUM_BLOCKS + 1), (NUM_BLOCKS + 5, 0)])
def test_out_of_range(lun: BackendUnderTest, lba: int, count: int) -> None:
    dev = lun.backend
    buf = memoryview(bytearray(count * dev.block_size))
    with pytest.raises(BlockRangeError):
        dev.read_blocks(lba, [buf])
    with pytest.raises(BlockRangeError):
        dev.write_blocks(lba, [buf])
    with pytest.raises(BlockRangeError):
        dev.zero_blocks(lba, count)
    # nothing was written at the valid end
    assert read(dev, NUM_BLOCKS - 1, 1) == bytes(dev.block_size)


def test_partial_block_buffer_is_a_caller_bug(lun: BackendUnderTest) -> None:
    dev = lun.backend
    with pytest.raises(ValueError, match="whole"):
        dev.write_blocks(0, [memoryview(bytearray(dev.block_size + 1))])
    with pytest.raises(ValueError, match="whole"):
        dev.read_blocks(0, [memoryview(bytearray(dev.block_size - 1))])


def test_fua_write_is_durable(lun: BackendUnderTest, syscall_spy: SyscallSpy) -> None:
    dev = lun.backend
    data = pattern(6, 2 * dev.block_size)
    dev.write_blocks(3, [memoryview(data)], fua=True)
    if lun.path is not None:
        # The FUA path: pwritev with RWF_DSYNC, or a plain write followed by fdatasync.
        assert syscall_spy.durable_writes >= 1 or syscall_spy.fdatasyncs
        bs = dev.block_size
        assert independent_read(lun.path, 3 * bs, 2 * bs) == data
    assert read(dev, 3, 2) == data


def test_non_fua_write_does_not_sync(lun: BackendUnderTest, syscall_spy: SyscallSpy) -> None:
    dev = lun.backend
    dev.write_blocks(3, [memoryview(pattern(7, dev.block_size))])
    assert syscall_spy.durable_writes == 0
    assert not syscall_spy.fdatasyncs


def test_flush(lun: BackendUnderTest, syscall_spy: SyscallSpy) -> None:
    dev = lun.backend
    data = pattern(8, dev.block_size)
    dev.write_blocks(7, [memoryview(data)])
    dev.flush()
    if lun.path is not None:
        assert len(syscall_spy.fdatasyncs) == 1
        bs = dev.block_size
        assert independent_read(lun.path, 7 * bs, bs) == data


def test_zero_region(lun: BackendUnderTest) -> None:
    dev = lun.backend
    bs = dev.block_size
    data = pattern(9, 20 * bs)
    dev.write_blocks(10, [memoryview(data)])
    dev.zero_blocks(14, 8)
    got = read(dev, 10, 20)
    assert got[: 4 * bs] == data[: 4 * bs]
    assert got[4 * bs : 12 * bs] == bytes(8 * bs)
    assert got[12 * bs :] == data[12 * bs :]
    if lun.path is not None:
        assert independent_read(lun.path, 14 * bs, 8 * bs) == bytes(8 * bs)
    dev.zero_blocks(0, 0)  # empty range is fine


def test_closed_backend_refuses_io(lun: BackendUnderTest) -> None:
    dev = lun.backend
    dev.close()
    dev.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        read(dev, 0, 1)
    with pytest.raises(ValueError, match="closed"):
        dev.flush()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.integers(0, NUM_BLOCKS - 1), st.integers(1, 6),
                              st.integers(0, 255), st.booleans()), max_size=12))
def test_matches_a_flat_model(lun: BackendUnderTest, ops: list[tuple[int, int, int, bool]]) -> None:
    dev = lun.backend
    bs = dev.block_size
    dev.zero_blocks(0, NUM_BLOCKS)
    model = bytearray(NUM_BLOCKS * bs)
    for lba, want, seed, zero in ops:
        count = min(want, NUM_BLOCKS - lba)
        if zero:
            dev.zero_blocks(lba, count)
            model[lba * bs : (lba + count) * bs] = bytes(count * bs)
        else:
            data = pattern(seed, count * bs)
            dev.write_blocks(lba, [memoryview(data)])
            model[lba * bs : (lba + count) * bs] = data
    assert read(dev, 0, NUM_BLOCKS) == bytes(model)


# -- descriptor backends only: error mapping, short transfers, punching ------------------

FD_KINDS = ("file", "loop")


@pytest.fixture(params=FD_KINDS)
def fd_lun(request: pytest.FixtureRequest, make_backend: BackendFactory) -> BackendUnderTest:
    return make_backend(request.param, 512, NUM_BLOCKS)


def _raise(err: int) -> object:
    def fail(*args: object, **kwargs: object) -> int:
        raise OSError(err, os.strerror(err))
    return fail


def test_eio_is_a_medium_error(fd_lun: BackendUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = fd_lun.backend
    monkeypatch.setattr(os, "preadv", _raise(errno.EIO))
    monkeypatch.setattr(os, "pwritev", _raise(errno.EIO))
    buf = memoryview(bytearray(512))
    with pytest.raises(MediumError) as rd:
        dev.read_blocks(0, [buf])
    assert rd.value.write is False
    with pytest.raises(MediumError) as wr:
        dev.write_blocks(0, [buf])
    assert wr.value.write is True
    monkeypatch.setattr(os, "fdatasync", _raise(errno.EIO))
    with pytest.raises(MediumError) as fl:
        dev.flush()
    assert fl.value.write is True


def test_enospc_is_space_allocation_failed(
    fd_lun: BackendUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "pwritev", _raise(errno.ENOSPC))
    with pytest.raises(SpaceAllocationFailed):
        fd_lun.backend.write_blocks(0, [memoryview(bytearray(512))])


def test_other_oserrors_are_bugs_and_propagate(
    fd_lun: BackendUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "preadv", _raise(errno.EFAULT))
    with pytest.raises(OSError, match="Bad address"):
        fd_lun.backend.read_blocks(0, [memoryview(bytearray(512))])


def test_short_transfers_are_resumed(
    fd_lun: BackendUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel may move fewer bytes than asked; the backend carries on."""
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = {"r": 0, "w": 0}

    def first_only(bufs: list[memoryview], limit: int) -> list[memoryview]:
        mv = memoryview(bufs[0]).cast("B")
        return [mv[: min(limit, mv.nbytes)]]

    def preadv(fd: int, bufs: list[memoryview], offset: int, flags: int = 0) -> int:
        calls["r"] += 1
        return real_preadv(fd, first_only(bufs, 700), offset, flags)

    def pwritev(fd: int, bufs: list[memoryview], offset: int, flags: int = 0) -> int:
        calls["w"] += 1
        return real_pwritev(fd, first_only(bufs, 300), offset, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pwritev", pwritev)
    dev = fd_lun.backend
    data = pattern(10, 4 * 512)
    mv = memoryview(data)
    dev.write_blocks(2, [mv[:1000], mv[1000:]], fua=True)
    out = bytearray(4 * 512)
    omv = memoryview(out)
    dev.read_blocks(2, [omv[:100], omv[100:]])
    assert bytes(out) == data
    assert calls["w"] > 2 and calls["r"] > 2
    assert fd_lun.path is not None
    assert independent_read(fd_lun.path, 1024, 2048) == data


def test_end_of_file_is_a_medium_error(make_backend: BackendFactory) -> None:
    lun = make_backend("file", 512, NUM_BLOCKS)
    assert lun.path is not None
    os.truncate(lun.path, 512 * 10)  # someone shrank the backing file under us
    with pytest.raises(MediumError, match="end of the backing store"):
        read(lun.backend, 8, 4)


def test_rwf_dsync_refused_falls_back_to_fdatasync(
    make_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch, syscall_spy: SyscallSpy
) -> None:
    lun = make_backend("file", 512, NUM_BLOCKS)
    spied = os.pwritev

    def no_flags(fd: int, bufs: Sequence[memoryview], offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "no RWF_DSYNC here")
        return spied(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", no_flags)
    data = pattern(11, 512)
    lun.backend.write_blocks(1, [memoryview(data)], fua=True)
    assert len(syscall_spy.fdatasyncs) == 1
    lun.backend.write_blocks(2, [memoryview(data)], fua=True)  # remembered: no retry
    assert len(syscall_spy.fdatasyncs) == 2
    assert read(lun.backend, 1, 2) == data * 2


def test_file_zeroing_punches_holes(make_backend: BackendFactory) -> None:
    lun = make_backend("file", 4096, 256)  # 1 MiB
    assert lun.path is not None
    dev = lun.backend
    dev.write_blocks(0, [memoryview(pattern(12, 256 * 4096))])
    dev.flush()
    before = os.stat(lun.path).st_blocks
    dev.zero_blocks(0, 256)
    after = os.stat(lun.path).st_blocks
    assert after < before  # the space went back to the file system
    assert os.stat(lun.path).st_size == 256 * 4096  # KEEP_SIZE
    assert read(dev, 0, 256) == bytes(256 * 4096)


def test_zeroing_falls_back_to_writing_zeros(
    make_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    lun = make_backend("file", 512, NUM_BLOCKS)
    monkeypatch.setattr(FileBackend, "_zero_fast", lambda self, off, n: False)
    dev = lun.backend
    dev.write_blocks(0, [memoryview(pattern(13, 8 * 512))])
    dev.zero_blocks(2, 4)
    assert read(dev, 2, 4) == bytes(4 * 512)
    assert read(dev, 0, 2) == pattern(13, 8 * 512)[:1024]


def test_file_backend_open_existing_and_bad_sizes(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    FileBackend.create(path, 512, 9).close()
    with pytest.raises(FileExistsError):
        FileBackend.create(path, 512, 9)
    with FileBackend(path, 512) as dev:
        assert dev.num_blocks == 9
        assert "lun.img" in repr(dev)
    with pytest.raises(ValueError, match="multiple"):
        FileBackend(path, 4096)  # 4608 bytes is not whole 4096-byte blocks
    path.write_bytes(b"x" * 700)
    with pytest.raises(ValueError, match="multiple"):
        FileBackend(path, 512)
    # the descriptor is not inherited by child processes
    with FileBackend.create(tmp_path / "b.img", 512, 1) as dev:
        assert not os.get_inheritable(dev.fileno())


def test_memory_backend_validation() -> None:
    with pytest.raises(ValueError, match="block size"):
        MemoryBackend(1024, 8)
    with pytest.raises(ValueError, match="at least one"):
        MemoryBackend(512, 0)
