"""VdiskBlockDevice end to end: layouts over real LUN backends, through the fabric guard,
thin allocation on first write, and zero-on-reuse of freed space."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storage_helpers import LoopDevices

from vfdirect.core.alloc import (
    Datastore,
    Extent,
    OutOfSpaceError,
    SpaceAllocationFailed,
    VdiskLayout,
    VirtualRangeError,
)
from vfdirect.core.array import LunKey, PhysicalLun
from vfdirect.core.block import BlockDevice
from vfdirect.core.fabric import Fabric, NotLoggedIn, NotMasked
from vfdirect.core.ids import LunNumber, PhysicalLba, VdiskId
from vfdirect.core.wwn import Wwn
from vfdirect.storage import (
    LunPool,
    MemoryBackend,
    StorageArray,
    VdiskBlockDevice,
    open_vdisk,
    scrub,
    vdisk_delete,
)

ARRAY = Wwn.naa5(0x1000)
HBA = Wwn.naa5(0x100)
VPORT = Wwn.naa5(0x200)
OTHER_VPORT = Wwn.naa5(0x300)
BS = 512
CHUNK = 8  # blocks


def pattern(seed: int, nbytes: int) -> bytes:
    block = bytes((seed * 37 + i * 11 + 1) % 253 + 1 for i in range(512))
    return (block * (nbytes // 512 + 1))[:nbytes]


def read(dev: BlockDevice, lba: int, count: int) -> bytes:
    buf = bytearray(count * dev.block_size)
    dev.read_blocks(lba, [memoryview(buf)])
    return bytes(buf)


def file_bytes(path: Path, block: int, count: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, count * BS, block * BS)
    finally:
        os.close(fd)


class CountingDevice:
    """A BlockDevice wrapper counting the calls that reach the backend."""

    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self.reads = self.writes = self.flushes = 0
        self.fua_writes = 0

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    @property
    def num_blocks(self) -> int:
        return self.inner.num_blocks

    def read_blocks(self, lba: int, bufs: Sequence[memoryview]) -> None:
        self.reads += 1
        self.inner.read_blocks(lba, bufs)

    def write_blocks(self, lba: int, bufs: Sequence[memoryview], *, fua: bool = False) -> None:
        self.writes += 1
        self.fua_writes += fua
        self.inner.write_blocks(lba, bufs, fua=fua)

    def flush(self) -> None:
        self.flushes += 1
        self.inner.flush()


class Setup:
    """A file-backed array with two LUNs, a datastore on them, and a fabric in which
    VPORT is logged in, zoned and masked to both LUNs."""

    def __init__(self, tmp: Path, lun_blocks: tuple[int, ...] = (64, 64)) -> None:
        self.array = StorageArray.create(tmp / "array", ARRAY)
        self.luns = [self.array.lun_create(n, BS) for n in lun_blocks]
        self.keys = [lun.key for lun in self.luns]
        self.fabric = Fabric()
        for port in self.array.target_ports:
            self.fabric.target_port_add(port, ARRAY)
        self.fabric.flogi(HBA, Wwn.naa5(0x101))
        self.fabric.fdisc(HBA, VPORT, Wwn.naa5(0x201))
        self.fabric.fdisc(HBA, OTHER_VPORT, Wwn.naa5(0x301))
        self.fabric.zone_create("z", [VPORT, OTHER_VPORT, *self.array.target_ports])
        for k in self.keys:
            self.fabric.mask_grant(VPORT, k)
            self.fabric.mask_grant(OTHER_VPORT, k)
        self.ds = Datastore("ds", BS, chunk_blocks=CHUNK)
        for lun in self.luns:
            self.ds.lun_add(lun, fresh=True)
        self.pool = LunPool([self.array])

    def open(self, vid: str, initiator: Wwn = VPORT) -> VdiskBlockDevice:
        return open_vdisk(self.ds, VdiskId(vid), luns=self.pool, fabric=self.fabric,
                          initiator=initiator)

    def path(self, key: LunKey) -> Path:
        return self.array.lun_path(key.lun)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.pool.close()


def make_spanning_vdisk(setup: Setup) -> VdiskLayout:
    """Vdisk "v", 48 blocks: 24 at the end of LUN0, 24 at the end of LUN1 (two fillers
    leave no single run large enough)."""
    setup.ds.vdisk_create(VdiskId("filler0"), 40)  # LUN0 blocks 0..39
    setup.ds.vdisk_create(VdiskId("filler1"), 40)  # LUN1 blocks 0..39
    return setup.ds.vdisk_create(VdiskId("v"), 48)


def test_freed_space_reads_zeros_for_its_next_owner(setup: Setup) -> None:
    a_layout = setup.ds.vdisk_create(VdiskId("a"), 40)
    a = setup.open("a")
    secret = pattern(1, 40 * BS)
    a.write_blocks(0, [memoryview(secret)], fua=True)
    (region,) = a_layout.extents()
    assert file_bytes(setup.path(region.lun), region.start, 40) == secret
    assert vdisk_delete(setup.ds, setup.pool, VdiskId("a")) == 40
    b_layout = setup.ds.vdisk_create(VdiskId("b"), 40)
    assert b_layout.extents() == a_layout.extents()  # the very same physical region
    b = setup.open("b", initiator=OTHER_VPORT)
    assert read(b, 0, 40) == bytes(40 * BS)
    assert file_bytes(setup.path(region.lun), region.start, 40) == bytes(40 * BS)


def test_freed_but_unzeroed_space_is_never_handed_out(setup: Setup) -> None:
    setup.ds.vdisk_create(VdiskId("a"), 128)  # the whole datastore
    setup.open("a").write_blocks(0, [memoryview(pattern(2, 128 * BS))])
    setup.ds.vdisk_delete(VdiskId("a"))  # the shell "crashed" before zeroing
    with pytest.raises(OutOfSpaceError, match="wait for zeroing"):
        setup.ds.vdisk_create(VdiskId("b"), 8)
    assert scrub(setup.ds, setup.pool) == 128  # a restarted shell finishes the job
    assert setup.ds.pending_zero() == ()
    setup.ds.vdisk_create(VdiskId("b"), 128)
    assert read(setup.open("b"), 0, 128) == bytes(128 * BS)


def test_request_spanning_two_extents_on_two_luns(setup: Setup) -> None:
    layout = make_spanning_vdisk(setup)
    assert [(e.lun, e.start, e.count) for e in layout.extents()] == [
        (setup.keys[0], 40, 24), (setup.keys[1], 40, 24),
    ]
    dev = setup.open("v")
    data = pattern(3, 10 * BS)
    mv = memoryview(data)
    # 10 blocks from vlba 19: 5 on LUN0 (59..63), 5 on LUN1 (40..44), in buffers whose
    # edges do not fall on the extent boundary
    dev.write_blocks(19, [mv[: 3 * BS + 100], mv[3 * BS + 100 : 7 * BS], mv[7 * BS :]])
    assert file_bytes(setup.path(setup.keys[0]), 59, 5) == data[: 5 * BS]
    assert file_bytes(setup.path(setup.keys[1]), 40, 5) == data[5 * BS :]
    out = bytearray(10 * BS)
    omv = memoryview(out)
    dev.read_blocks(19, [omv[:BS], omv[BS : 6 * BS - 1], omv[6 * BS - 1 :]])
    assert bytes(out) == data
    # nothing else was touched
    assert file_bytes(setup.path(setup.keys[1]), 45, 1) == bytes(BS)
    assert file_bytes(setup.path(setup.keys[0]), 58, 1) == bytes(BS)


def test_thin_holes_read_zeros_without_touching_storage(tmp_path: Path) -> None:
    backend = CountingDevice(MemoryBackend(BS, 64))
    key = LunKey(ARRAY, LunNumber(0))
    fabric = Fabric()
    fabric.target_port_add(Wwn.naa5(0x1001), ARRAY)
    fabric.flogi(VPORT, VPORT)
    fabric.zone_create("z", [VPORT, Wwn.naa5(0x1001)])
    fabric.mask_grant(VPORT, key)
    ds = Datastore("m", BS, chunk_blocks=CHUNK)
    ds.lun_add(PhysicalLun(key, BS, 64), fresh=True)
    ds.vdisk_create(VdiskId("t"), 100, thin=True)
    dev = open_vdisk(ds, VdiskId("t"), luns=lambda k: backend, fabric=fabric, initiator=VPORT)
    out = bytearray(b"\xff" * 100 * BS)
    dev.read_blocks(0, [memoryview(out)])
    assert bytes(out) == bytes(100 * BS)
    assert backend.reads == 0
    dev.flush()  # nothing allocated: nothing to flush
    assert backend.flushes == 0
    # first write to chunk 2 allocates it (only it)
    dev.write_blocks(17, [memoryview(pattern(4, 2 * BS))], fua=True)
    assert ds.vdisk_layout(VdiskId("t")).allocated_chunks == 1
    assert backend.writes == 1 and backend.fua_writes == 1
    got = read(dev, 16, 8)
    assert got == bytes(BS) + pattern(4, 2 * BS) + bytes(5 * BS)
    # a read spanning hole + mapped + hole touches storage once
    backend.reads = 0
    got = read(dev, 0, 40)
    assert backend.reads == 1
    assert got[17 * BS : 19 * BS] == pattern(4, 2 * BS)
    dev.flush()
    assert backend.flushes == 1


def test_thin_out_of_space_writes_nothing(setup: Setup) -> None:
    setup.ds.vdisk_create(VdiskId("big"), 120)  # 15 of 16 chunks
    setup.ds.vdisk_create(VdiskId("t"), 64, thin=True)
    dev = setup.open("t")
    before = setup.ds.dump()
    with pytest.raises(SpaceAllocationFailed):
        dev.write_blocks(0, [memoryview(pattern(5, 16 * BS))])  # needs 2 chunks
    assert setup.ds.dump() == before
    assert read(dev, 0, 16) == bytes(16 * BS)
    dev.write_blocks(0, [memoryview(pattern(5, 8 * BS))])  # 1 chunk fits
    assert read(dev, 0, 8) == pattern(5, 8 * BS)


def test_thin_without_allocator_refuses_writes_to_holes(setup: Setup) -> None:
    layout = setup.ds.vdisk_create(VdiskId("t"), 64, thin=True)
    dev = VdiskBlockDevice(layout, luns=setup.pool, fabric=setup.fabric, initiator=VPORT)
    with pytest.raises(SpaceAllocationFailed, match="no allocator"):
        dev.write_blocks(0, [memoryview(bytes(BS))])


def test_every_lun_is_reached_through_the_fabric_guard(setup: Setup) -> None:
    make_spanning_vdisk(setup)
    dev = setup.open("v")
    buf = memoryview(bytearray(BS))
    dev.read_blocks(30, [buf])  # LUN1
    setup.fabric.mask_revoke(VPORT, setup.keys[1])
    with pytest.raises(NotMasked):
        dev.read_blocks(30, [buf])  # the very next IO
    with pytest.raises(NotMasked):
        dev.flush()
    dev.read_blocks(0, [buf])  # LUN0 still masked
    with pytest.raises(NotMasked):
        dev.write_blocks(20, [memoryview(bytes(8 * BS))])  # spans into LUN1
    setup.fabric.mask_grant(VPORT, setup.keys[1])
    dev.read_blocks(30, [buf])
    setup.fabric.logo(VPORT)
    with pytest.raises(NotLoggedIn):
        dev.read_blocks(0, [buf])
    # an initiator that was never masked
    stranger = Wwn.naa5(0x777)
    setup.fabric.flogi(stranger, stranger)
    setup.fabric.zone_member_add("z", [stranger])
    with pytest.raises(NotMasked):
        read(setup.open("v", initiator=stranger), 0, 1)


def test_range_and_buffer_checks(setup: Setup) -> None:
    setup.ds.vdisk_create(VdiskId("v"), 20)  # 3 chunks allocated, 20 blocks addressable
    dev = setup.open("v")
    assert (dev.block_size, dev.num_blocks) == (BS, 20)
    for lba, count in [(20, 1), (19, 2), (-1, 1)]:
        with pytest.raises(VirtualRangeError):
            dev.read_blocks(lba, [memoryview(bytearray(count * BS))])
        with pytest.raises(VirtualRangeError):
            dev.write_blocks(lba, [memoryview(bytearray(count * BS))])
    with pytest.raises(ValueError, match="whole"):
        dev.read_blocks(0, [memoryview(bytearray(100))])
    dev.read_blocks(20, [])
    dev.write_blocks(20, [])


def test_flush_reaches_every_lun_of_the_layout(setup: Setup) -> None:
    counters: dict[LunKey, CountingDevice] = {}

    def luns(key: LunKey) -> BlockDevice:
        return counters.setdefault(key, CountingDevice(setup.pool(key)))

    layout = make_spanning_vdisk(setup)
    dev = VdiskBlockDevice(layout, luns=luns, fabric=setup.fabric, initiator=VPORT)
    dev.flush()
    assert sorted(k.lun for k in counters) == [0, 1]
    assert all(c.flushes == 1 for c in counters.values())


def test_update_layout_checks_identity(setup: Setup) -> None:
    setup.ds.vdisk_create(VdiskId("v"), 16)
    other = setup.ds.vdisk_create(VdiskId("w"), 16)
    dev = setup.open("v")
    with pytest.raises(ValueError, match="does not fit"):
        dev.update_layout(other)


def test_block_device_lun_is_scrubbed_before_use(tmp_path: Path,
                                                   loop_devices: LoopDevices) -> None:
    device = loop_devices.attach(64 * BS, BS)
    with open(device, "r+b") as f:  # old content on the device
        f.write(b"\xee" * 64 * BS)
    array = StorageArray.create(tmp_path / "array", ARRAY)
    lun = array.lun_register_blockdev(device)
    ds = Datastore("bd", BS, chunk_blocks=CHUNK)
    ds.lun_add(lun, fresh=False)
    with LunPool([array]) as pool:
        assert ds.pending_zero() == (Extent(lun.key, PhysicalLba(0), 64),)
        assert scrub(ds, pool) == 64
        ds.vdisk_create(VdiskId("v"), 64)
        fabric = Fabric()
        fabric.target_port_add(array.target_ports[0], ARRAY)
        fabric.flogi(VPORT, VPORT)
        fabric.zone_create("z", [VPORT, array.target_ports[0]])
        fabric.mask_grant(VPORT, lun.key)
        dev = open_vdisk(ds, VdiskId("v"), luns=pool, fabric=fabric, initiator=VPORT)
        assert read(dev, 0, 64) == bytes(64 * BS)


# -- against a flat model ------------------------------------------------------------


@st.composite
def thin_layouts(draw: st.DrawFn) -> tuple[Datastore, VdiskLayout]:
    ds = Datastore("h", BS, chunk_blocks=4)
    for n in range(3):
        ds.lun_add(PhysicalLun(LunKey(ARRAY, LunNumber(n)), BS, 48), fresh=True)
    # some other vdisk takes space first, so extents are scattered over LUNs
    ds.vdisk_create(VdiskId("other"), draw(st.integers(1, 40)), thin=True)
    ds.vdisk_create(VdiskId("t"), draw(st.integers(1, 80)), thin=True)
    for _ in range(draw(st.integers(0, 12))):
        vid = VdiskId(draw(st.sampled_from(["t", "other"])))
        cap = ds.vdisk_layout(vid).capacity_blocks
        ds.vdisk_allocate(vid, draw(st.integers(0, cap - 1)), 1)
    return ds, ds.vdisk_layout(VdiskId("t"))


def split(data: memoryview, cuts: list[int]) -> list[memoryview]:
    points = sorted({0, data.nbytes, *(c % (data.nbytes + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(thin_layouts(), st.data())
def test_vdisk_device_matches_a_flat_disk(
    setup_: tuple[Datastore, VdiskLayout], data: st.DataObject
) -> None:
    ds, layout = setup_
    backends = {lun.key: MemoryBackend(BS, lun.num_blocks) for lun in ds.luns()}
    fabric = Fabric()
    fabric.target_port_add(Wwn.naa5(0x1001), ARRAY)
    fabric.flogi(VPORT, VPORT)
    fabric.zone_create("z", [VPORT, Wwn.naa5(0x1001)])
    for k in backends:
        fabric.mask_grant(VPORT, k)
    dev = open_vdisk(ds, VdiskId("t"), luns=backends.__getitem__, fabric=fabric,
                     initiator=VPORT)
    cap = layout.capacity_blocks
    model = bytearray(cap * BS)
    for step in range(data.draw(st.integers(1, 8))):
        lba = data.draw(st.integers(0, cap - 1))
        count = data.draw(st.integers(1, min(cap - lba, 24)))
        cuts = data.draw(st.lists(st.integers(0, count * BS), max_size=4))
        if data.draw(st.booleans()):
            payload = pattern(step, count * BS)
            dev.write_blocks(lba, split(memoryview(payload), cuts),
                             fua=data.draw(st.booleans()))
            model[lba * BS : (lba + count) * BS] = payload
        out = bytearray(b"\x55" * count * BS)
        dev.read_blocks(lba, split(memoryview(out), cuts))
        assert bytes(out) == bytes(model[lba * BS : (lba + count) * BS])
    # the other vdisk's extents were never written
    other = ds.vdisk_layout(VdiskId("other"))
    for e in other.extents():
        assert read(backends[e.lun], e.start, e.count) == bytes(e.count * BS)
