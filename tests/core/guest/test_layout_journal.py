"""The guest memory layout and its header, the workload journal, the verifier's blocks,
and the initiator-side parameter data parsers."""

from __future__ import annotations

import contextlib
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.guest.journal import (
    EntryState,
    Journal,
    JournalError,
    check_block,
    make_block,
    vm_id_number,
)
from vfdirect.core.guest.layout import (
    HEADER_ADDR,
    PAGE,
    REQUEST_ENTRY_BYTES,
    GuestLayout,
    GuestLayoutError,
    LayoutParams,
)
from vfdirect.core.guest.scsidata import (
    ScsiDataError,
    parse_inquiry,
    parse_read_capacity16,
    parse_vpd_devid_naa,
    parse_vpd_serial,
)
from vfdirect.core.scsi import LuIdentity
from vfdirect.core.scsi.inquiry import LU_PERIPHERAL, lu_vpd_page, standard_inquiry_data
from vfdirect.core.virtio import RegionMemory
from vfdirect.core.wwn import Wwn

# -- layout -----------------------------------------------------------------------------


def test_default_layout_areas_are_ordered_and_disjoint() -> None:
    layout = GuestLayout.plan(LayoutParams())
    areas = [(0, PAGE), (HEADER_ADDR, PAGE),
             (layout.request_table_addr, layout.params.tags * REQUEST_ENTRY_BYTES)]
    for q in layout.queues:
        areas += [(a, n) for _, a, n in q.areas()]
    areas += [(layout.event_buffers_addr, 64 * layout.params.event_queue_size),
              (layout.data_addr, layout.params.tags * layout.params.slot_size),
              (layout.journal_addr, layout.params.journal_size)]
    areas.sort()
    for (a, n), (b, _) in itertools.pairwise(areas):
        assert a + n <= b
    assert areas[-1][0] + areas[-1][1] == layout.end <= layout.params.memory_size
    assert layout.num_vrings == 2 + layout.params.request_queues
    assert layout.queues[1].max_indirect == 0 and layout.queues[0].max_indirect == 4
    assert layout.data_addr % PAGE == 0 and layout.slot(1) - layout.slot(0) == 64 << 10


def test_header_round_trip_and_checks() -> None:
    params = LayoutParams(memory_size=32 << 20, request_queues=4, tags=128)
    layout = GuestLayout.plan(params)
    header = layout.encode_header(boot_count=9)
    assert len(header) == 0x38 and struct.unpack_from("<I", header, 0x30)[0] == 9
    assert GuestLayout.decode_header(header, 32 << 20) == layout
    with pytest.raises(GuestLayoutError, match="never booted"):
        GuestLayout.decode_header(bytes(0x38), 32 << 20)
    with pytest.raises(GuestLayoutError, match="the file has"):
        GuestLayout.decode_header(header, 16 << 20)
    bad = bytearray(header)
    bad[0x10] ^= 1
    with pytest.raises(GuestLayoutError, match="checksum"):
        GuestLayout.decode_header(bytes(bad), 32 << 20)
    with pytest.raises(GuestLayoutError, match="truncated"):
        GuestLayout.decode_header(header[:20], 32 << 20)


@pytest.mark.parametrize("kw", [
    {"request_queues": 0}, {"queue_size": 48}, {"tags": 0}, {"slot_size": 1000},
    {"journal_size": 10}, {"memory_size": 1 << 20}, {"max_indirect": 1},
    {"memory_size": 4097},
])
def test_impossible_params(kw: dict[str, int]) -> None:
    with pytest.raises(GuestLayoutError):
        GuestLayout.plan(LayoutParams(**kw))


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=0x38, max_size=0x38))
def test_fuzz_header_decode(data: bytes) -> None:
    with contextlib.suppress(GuestLayoutError):
        GuestLayout.decode_header(data, 16 << 20)


# -- journal ----------------------------------------------------------------------------


def journal_memory() -> tuple[RegionMemory, int, int]:
    buf = bytearray(64 << 10)
    return RegionMemory.from_buffers([(0x10000, buf)]), 0x10000, 64 << 10


def test_journal_records_and_reopens() -> None:
    memory, addr, size = journal_memory()
    journal = Journal.format(memory, addr, size, run_id=77)
    assert journal.capacity == (size - 64) // 32 and journal.next_seq() == 0
    for seq in range(5):
        journal.record_pending(seq, target=1, lun=seq % 2, lba=seq * 8, generation=1,
                               crc=seq)
    journal.settle(0, EntryState.ACKED)
    journal.settle(0, EntryState.ACKED)  # idempotent
    journal.settle(3, EntryState.FAILED)
    again = Journal.open(memory, addr, size)
    assert again.run_id == 77 and again.next_seq() == 5
    entries = list(again.entries())
    assert [e.state for e in entries] == [EntryState.ACKED, EntryState.PENDING,
                                          EntryState.PENDING, EntryState.FAILED,
                                          EntryState.PENDING]
    assert (entries[4].target, entries[4].lun, entries[4].lba, entries[4].crc) == (
        1, 0, 32, 4)
    assert again.summary() == {"pending": 3, "acked": 1, "failed": 1}
    with pytest.raises(JournalError):
        again.record_pending(2, target=0, lun=0, lba=0, generation=0, crc=0)
    with pytest.raises(JournalError):
        again.settle(0, EntryState.FAILED)
    with pytest.raises(JournalError):
        again.entry(again.capacity)


def test_journal_rewrite_and_clear_keep_a_prefix() -> None:
    """The verify workload's checkpoint: entries rewritten in place, the rest cleared
    from the last one down (the used entries stay a prefix at every step)."""
    memory, addr, size = journal_memory()
    journal = Journal.format(memory, addr, size, run_id=5)
    for seq in range(10):
        journal.record_pending(seq, target=0, lun=0, lba=seq, generation=1, crc=0)
        journal.settle(seq, EntryState.ACKED)
    journal.rewrite(0, EntryState.ACKED, target=0, lun=1, lba=7, generation=4, crc=9)
    journal.rewrite(1, EntryState.FAILED, target=0, lun=1, lba=7, generation=5, crc=9)
    with pytest.raises(JournalError):
        journal.rewrite(2, EntryState.PENDING, target=0, lun=0, lba=0, generation=0, crc=0)
    journal.clear_from(2)
    entries = list(journal.entries())
    assert [(e.state, e.lun, e.lba, e.generation) for e in entries] == [
        (EntryState.ACKED, 1, 7, 4), (EntryState.FAILED, 1, 7, 5)]
    assert journal.next_seq() == 2
    journal.record_pending(2, target=0, lun=0, lba=3, generation=2, crc=0)


def test_journal_open_refuses_garbage() -> None:
    memory, addr, size = journal_memory()
    with pytest.raises(JournalError, match="no journal"):
        Journal.open(memory, addr, size)
    Journal.format(memory, addr, size, run_id=1)
    memory.write(addr + 0x10, b"\x02")
    with pytest.raises(JournalError, match="checksum"):
        Journal.open(memory, addr, size)


def test_blocks_describe_themselves() -> None:
    vm = vm_id_number("vm0")
    block = make_block(vm, 12, 3, 99, 512)
    ok = check_block(block, vm=vm, lba=12, block_size=512)
    assert ok.ok and (ok.generation, ok.seq) == (3, 99)
    assert not check_block(block, vm=vm, lba=13, block_size=512).ok
    assert not check_block(block, vm=vm + 1, lba=12, block_size=512).ok
    torn = block[:256] + bytes(256)
    assert "checksum" in check_block(torn, vm=vm, lba=12, block_size=512).reason
    assert "zeros" in check_block(bytes(512), vm=vm, lba=12, block_size=512).reason
    assert make_block(vm, 12, 3, 99, 4096) != make_block(vm, 12, 3, 100, 4096)


# -- parameter data ---------------------------------------------------------------------


def test_parse_inquiry_and_vpd_from_the_target_core() -> None:
    ident = LuIdentity("VFDIRECT", "VDISK", "0001", "SER123", Wwn.naa5(0x1234))
    info = parse_inquiry(standard_inquiry_data(LU_PERIPHERAL, "VFDIRECT", "VDISK", "0001"))
    assert (info.qualifier, info.device_type, info.vendor, info.product, info.revision) == (
        0, 0, "VFDIRECT", "VDISK", "0001")
    assert parse_vpd_serial(lu_vpd_page(ident, 0x80) or b"") == "SER123"
    assert parse_vpd_devid_naa(lu_vpd_page(ident, 0x83) or b"") == \
        Wwn.naa5(0x1234).canonical()
    with pytest.raises(ScsiDataError):
        parse_vpd_serial(lu_vpd_page(ident, 0x83) or b"")


def test_parse_read_capacity16() -> None:
    data = (2047).to_bytes(8, "big") + (512).to_bytes(4, "big") + bytes(20)
    cap = parse_read_capacity16(data)
    assert (cap.num_blocks, cap.block_size) == (2048, 512)
    with pytest.raises(ScsiDataError):
        parse_read_capacity16(data[:8])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_parsers(data: bytes) -> None:
    for parser in (parse_inquiry, parse_read_capacity16, parse_vpd_serial,
                   parse_vpd_devid_naa):
        with contextlib.suppress(ScsiDataError):
            parser(data)
