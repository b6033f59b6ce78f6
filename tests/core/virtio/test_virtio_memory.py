from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.virtio import GuestMemory, GuestMemoryError, MemoryRegion, RegionMemory


def two_regions() -> tuple[RegionMemory, bytearray, bytearray]:
    """[0x1000, 0x2000) and [0x2000, 0x3000) contiguous, then a hole, then
    [0x10000, 0x11000); user addresses for the first two only."""
    a, b, c = bytearray(0x1000), bytearray(0x1000), bytearray(0x1000)
    mem = RegionMemory([MemoryRegion(0x1000, memoryview(a), 0x7F00_0000_0000),
                        MemoryRegion(0x2000, memoryview(b), 0x7F00_0000_1000),
                        MemoryRegion(0x10000, memoryview(c))])
    return mem, a, b


def test_is_a_guest_memory() -> None:
    mem, _, _ = two_regions()
    assert isinstance(mem, GuestMemory)
    assert [r.gpa for r in mem.regions] == [0x1000, 0x2000, 0x10000]


def test_view_is_zero_copy() -> None:
    mem, a, _ = two_regions()
    view = mem.view(0x1010, 4)
    view[:] = b"abcd"
    assert a[0x10:0x14] == b"abcd"
    a[0x10] = ord("z")
    assert bytes(view) == b"zbcd"


def test_view_refuses_region_boundary_but_views_split() -> None:
    mem, a, b = two_regions()
    with pytest.raises(GuestMemoryError):
        mem.view(0x1FFE, 4)
    parts = mem.views(0x1FFE, 4)
    assert [len(p) for p in parts] == [2, 2]
    mem.write(0x1FFE, b"1234")
    assert a[-2:] == b"12" and b[:2] == b"34"
    assert mem.read(0x1FFE, 4) == b"1234"
    assert mem.contains(0x1000, 0x2000)


@pytest.mark.parametrize(("gpa", "length"), [
    (0x0, 1), (0xFFF, 2), (0x2FFF, 2), (0x3000, 1), (0x10FFF, 2), (0x11000, 1),
    (0x2F00, 0x200), (-1, 1), (0x1000, -1), (1 << 64, 1)])
def test_out_of_bounds(gpa: int, length: int) -> None:
    mem, _, _ = two_regions()
    assert not mem.contains(gpa, length)
    for call in (lambda: mem.read(gpa, length), lambda: mem.view(gpa, length),
                 lambda: mem.views(gpa, length)):
        with pytest.raises(GuestMemoryError):
            call()
    if length > 0:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, bytes(length))


def test_empty_ranges() -> None:
    mem, _, _ = two_regions()
    assert mem.contains(0x1000, 0) and mem.contains(0x3000, 0)  # end of a region
    assert not mem.contains(0x5000, 0)
    assert mem.read(0x3000, 0) == b""


def test_typed_accessors_little_endian_and_aligned() -> None:
    mem, a, _ = two_regions()
    mem.store_u16(0x1002, 0xBEEF)
    mem.store_u32(0x1004, 0x01020304)
    mem.store_u64(0x1008, 0x1122334455667788)
    assert a[2:4] == b"\xef\xbe"
    assert a[4:8] == b"\x04\x03\x02\x01"
    assert a[8:16] == bytes.fromhex("8877665544332211")
    assert mem.load_u16(0x1002) == 0xBEEF
    assert mem.load_u32(0x1004) == 0x01020304
    assert mem.load_u64(0x1008) == 0x1122334455667788
    for bad in (lambda: mem.store_u16(0x1001, 1), lambda: mem.load_u32(0x1002),
                lambda: mem.store_u64(0x1004, 1), lambda: mem.store_u16(0x1000, 1 << 16),
                lambda: mem.store_u32(0x1000, -1), lambda: mem.load_u16(0x3000)):
        with pytest.raises(GuestMemoryError):
            bad()


def test_index_store_touches_only_its_bytes() -> None:
    # The published index must be one 2-byte store: the neighbours stay untouched.
    mem, a, _ = two_regions()
    a[0:8] = b"\xaa" * 8
    mem.store_u16(0x1002, 0x0102)
    assert a[0:8] == b"\xaa\xaa\x02\x01\xaa\xaa\xaa\xaa"


def test_user_address_translation() -> None:
    mem, _, _ = two_regions()
    assert mem.user_to_gpa(0x7F00_0000_0010) == 0x1010
    assert mem.user_to_gpa(0x7F00_0000_1FF0, 0x10) == 0x2FF0
    assert mem.gpa_to_user(0x2FF0) == 0x7F00_0000_1FF0
    with pytest.raises(GuestMemoryError):
        mem.user_to_gpa(0x7F00_0000_0FF0, 0x20)  # crosses into the next region
    with pytest.raises(GuestMemoryError):
        mem.user_to_gpa(0x7F00_0000_2000)
    with pytest.raises(GuestMemoryError):
        mem.gpa_to_user(0x10000)  # that region has no user address


@pytest.mark.parametrize("regions", [
    [(0x1000, 0x1000, None), (0x1800, 0x1000, None)],
    [(0x1000, 0x1000, 0x5000), (0x3000, 0x1000, 0x5800)],
    [(0x1000, 0, None)],
    [((1 << 64) - 0x800, 0x1000, None)],
])
def test_bad_region_tables(regions: list[tuple[int, int, int | None]]) -> None:
    with pytest.raises(GuestMemoryError):
        RegionMemory([MemoryRegion(g, memoryview(bytearray(n)), u) for g, n, u in regions])


def test_read_only_buffer_refused() -> None:
    with pytest.raises(GuestMemoryError):
        RegionMemory.from_buffers([(0, b"\0" * 16)])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x3100), st.integers(0, 0x300),
                          st.binary(min_size=0, max_size=8)), max_size=30))
def test_matches_a_flat_model(ops: list[tuple[int, int, bytes]]) -> None:
    # Regions [0x1000, 0x3000) (two contiguous buffers); the model is one bytearray.
    a, b = bytearray(0x1000), bytearray(0x1000)
    mem = RegionMemory.from_buffers([(0x1000, a), (0x2000, b)])
    model = bytearray(0x2000)
    for gpa, length, data in ops:
        inside = gpa >= 0x1000 and gpa + length <= 0x3000
        assert mem.contains(gpa, length) == inside
        if inside:
            assert mem.read(gpa, length) == bytes(model[gpa - 0x1000:gpa - 0x1000 + length])
        else:
            with pytest.raises(GuestMemoryError):
                mem.read(gpa, length)
        fits = gpa >= 0x1000 and gpa + len(data) <= 0x3000
        if fits:
            mem.write(gpa, data)
            model[gpa - 0x1000:gpa - 0x1000 + len(data)] = data
        else:
            with pytest.raises(GuestMemoryError):
                mem.write(gpa, data)
    assert a + b == model
