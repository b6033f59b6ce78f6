from __future__ import annotations

import array
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scsi_doubles import (
    FailingDevice,
    HugeDevice,
    RamDisk,
    RecordingDevice,
    make_identity,
    run,
)
from scsi_strategies import cdbs

from vfdirect.core.block import AccessDenied, BlockError, BlockRangeError, MediumError
from vfdirect.core.scsi import sense as sn
from vfdirect.core.scsi.cdb import (
    Inquiry,
    ModeSense6,
    ModeSense10,
    Read10,
    Read16,
    ReadCapacity10,
    ReadCapacity16,
    ReportLuns,
    RequestSense,
    SynchronizeCache10,
    SynchronizeCache16,
    TestUnitReady,
    Write10,
    Write16,
)
from vfdirect.core.scsi.identity import BlockLimits
from vfdirect.core.scsi.lu import LogicalUnit
from vfdirect.core.scsi.opcodes import PageControl, Status
from vfdirect.core.scsi.sense import FieldPointer, Sense, SenseKey
from vfdirect.core.scsi.task import ScsiResult
from vfdirect.core.wwn import Wwn

U64 = 1 << 64


def make_lu(device: object | None = None, **identity: object) -> LogicalUnit:
    return LogicalUnit(device if device is not None else RamDisk(), make_identity(**identity))  # type: ignore[arg-type]


def sense_of(result: ScsiResult) -> Sense:
    assert result.status == Status.CHECK_CONDITION
    data = result.sense_data()
    assert data is not None
    return data.sense


def pointer_of(result: ScsiResult) -> FieldPointer | None:
    data = result.sense_data()
    assert data is not None
    return data.field_pointer


# --- INQUIRY -----------------------------------------------------------------------------

STANDARD_INQUIRY = bytes(
    [
        0x00,  # PERIPHERAL QUALIFIER 000b, PERIPHERAL DEVICE TYPE 00h (direct access block)
        0x00,  # RMB 0, LU_CONG 0
        0x06,  # VERSION: SPC-4
        0x12,  # NORMACA 0, HISUP 1, RESPONSE DATA FORMAT 2
        0x5B,  # ADDITIONAL LENGTH: 96 - 5 = 91
        0x00,  # SCCS ACC TPGS 3PC PROTECT: 0
        0x00,  # ENCSERV 0, MULTIP 0
        0x02,  # CMDQUE 1
    ]
)  # fmt: skip
STANDARD_INQUIRY += b"VFDIRECT"  # 8-15 T10 VENDOR IDENTIFICATION
STANDARD_INQUIRY += b"VDISK           "  # 16-31 PRODUCT IDENTIFICATION, space padded
STANDARD_INQUIRY += b"0001"  # 32-35 PRODUCT REVISION LEVEL
STANDARD_INQUIRY += bytes(20)  # 36-55 vendor specific
STANDARD_INQUIRY += bytes(2)  # 56 CLOCKING/QAS/IUS (SPI only), 57 reserved
STANDARD_INQUIRY += bytes.fromhex("00a0")  # 58-59 VERSION DESCRIPTOR 1: SAM-5
STANDARD_INQUIRY += bytes.fromhex("0460")  # 60-61 VERSION DESCRIPTOR 2: SPC-4
STANDARD_INQUIRY += bytes.fromhex("04c0")  # 62-63 VERSION DESCRIPTOR 3: SBC-3
STANDARD_INQUIRY += bytes(10)  # 64-73 VERSION DESCRIPTORS 4-8: none
STANDARD_INQUIRY += bytes(22)  # 74-95 reserved


def test_standard_inquiry_golden() -> None:
    assert len(STANDARD_INQUIRY) == 96
    result, data = run(make_lu().execute, Inquiry(allocation_length=255).encode(), data_in=255)
    assert result == ScsiResult(Status.GOOD, data_in_len=96, residual=255 - 96)
    assert data == STANDARD_INQUIRY


@pytest.mark.parametrize("alloc", [0, 5, 36, 96])
def test_inquiry_allocation_length_truncates(alloc: int) -> None:
    result, data = run(make_lu().execute, Inquiry(allocation_length=alloc).encode(), data_in=alloc)
    assert result.status == Status.GOOD
    assert data == STANDARD_INQUIRY[:alloc]
    assert result.residual == 0


def test_vpd_supported_pages_golden() -> None:
    result, data = run(make_lu().execute, Inquiry(True, 0x00, 255).encode(), data_in=255)
    assert result.good
    # peripheral 00h, PAGE CODE 00h, PAGE LENGTH 4, pages 00h 80h 83h B0h ascending
    assert data == bytes([0x00, 0x00, 0x00, 0x04, 0x00, 0x80, 0x83, 0xB0])


def test_vpd_unit_serial_number_golden() -> None:
    result, data = run(make_lu().execute, Inquiry(True, 0x80, 255).encode(), data_in=255)
    assert result.good
    assert data == bytes([0x00, 0x80, 0x00, 0x06]) + b"SER123"


def test_vpd_device_identification_golden() -> None:
    lu = make_lu(target_port_wwn=Wwn(bytes.fromhex("50014051234567ff")), relative_target_port=1)
    result, data = run(lu.execute, Inquiry(True, 0x83, 255).encode(), data_in=255)
    assert result.good
    expected = bytes([0x00, 0x83, 0x00, 0x32])  # peripheral, PAGE CODE 83h, PAGE LENGTH 50
    # NAA designator of the LU: PROTOCOL 0 | CODE SET 1 (binary); PIV 0, ASSOCIATION 00b
    # (logical unit), TYPE 3 (NAA); reserved; LENGTH 8; the NAA 5 name.
    expected += bytes([0x01, 0x03, 0x00, 0x08]) + bytes.fromhex("5001405123456789")
    # T10 vendor ID designator: CODE SET 2 (ASCII); TYPE 1; LENGTH 14; vendor + serial.
    expected += bytes([0x02, 0x01, 0x00, 0x0E]) + b"VFDIRECT" + b"SER123"
    # Target port name: PROTOCOL 0 (FCP) | binary; PIV 1, ASSOCIATION 01b, TYPE 3 (NAA).
    expected += bytes([0x01, 0x93, 0x00, 0x08]) + bytes.fromhex("50014051234567ff")
    # Relative target port: PIV 1, ASSOCIATION 01b, TYPE 4; 2 reserved bytes + port 1.
    expected += bytes([0x01, 0x94, 0x00, 0x04, 0x00, 0x00, 0x00, 0x01])
    assert data == expected


def test_vpd_device_identification_minimal() -> None:
    result, data = run(make_lu().execute, Inquiry(True, 0x83, 255).encode(), data_in=255)
    assert result.good
    assert data[:4] == bytes([0x00, 0x83, 0x00, 12 + 18])
    assert data[4:16] == bytes([0x01, 0x03, 0x00, 0x08]) + bytes.fromhex("5001405123456789")


def test_vpd_block_limits_golden() -> None:
    limits = BlockLimits(
        max_transfer_blocks=128, optimal_granularity_blocks=8, optimal_transfer_blocks=64
    )
    result, data = run(
        make_lu(limits=limits).execute, Inquiry(True, 0xB0, 255).encode(), data_in=255
    )
    assert result.good
    expected = bytes([0x00, 0xB0, 0x00, 0x3C])  # PAGE LENGTH 3Ch
    expected += bytes([0x00])  # WSNZ 0
    expected += bytes([0x00])  # MAXIMUM COMPARE AND WRITE LENGTH 0
    expected += bytes([0x00, 0x08])  # OPTIMAL TRANSFER LENGTH GRANULARITY 8
    expected += bytes([0x00, 0x00, 0x00, 0x80])  # MAXIMUM TRANSFER LENGTH 128
    expected += bytes([0x00, 0x00, 0x00, 0x40])  # OPTIMAL TRANSFER LENGTH 64
    expected += bytes(48)  # prefetch, unmap, write same limits, reserved
    assert data == expected
    assert len(data) == 64


@pytest.mark.parametrize("page", [0x01, 0x81, 0x86, 0x89, 0xB1, 0xB2, 0xFF])
def test_unsupported_vpd_page(page: int) -> None:
    result, _ = run(make_lu().execute, Inquiry(True, page, 255).encode(), data_in=255)
    assert sense_of(result) == sn.INVALID_FIELD_IN_CDB
    assert pointer_of(result) == FieldPointer(2)
    assert result.data_in_len == 0


# --- READ CAPACITY -----------------------------------------------------------------------


def test_read_capacity_10_small() -> None:
    result, data = run(make_lu().execute, ReadCapacity10().encode(), data_in=8)
    assert result.good
    assert data == (63).to_bytes(4, "big") + (512).to_bytes(4, "big")
    # PMI set: same answer (no point of slower transfer).
    result, data2 = run(make_lu().execute, ReadCapacity10(lba=10, pmi=True).encode(), data_in=8)
    assert data2 == data


@pytest.mark.parametrize(
    ("num_blocks", "returned"),
    [
        ((1 << 32) - 1, 0xFFFF_FFFE),  # last LBA fits: reported as is
        (1 << 32, 0xFFFF_FFFF),  # last LBA FFFFFFFFh: the "use READ CAPACITY(16)" value
        ((1 << 40), 0xFFFF_FFFF),
    ],
)
def test_read_capacity_10_large(num_blocks: int, returned: int) -> None:
    lu = make_lu(HugeDevice(4096, num_blocks))
    result, data = run(lu.execute, ReadCapacity10().encode(), data_in=8)
    assert result.good
    assert data == returned.to_bytes(4, "big") + (4096).to_bytes(4, "big")


def test_read_capacity_16_golden() -> None:
    lu = make_lu(HugeDevice(4096, 1 << 32), physical_block_exponent=3)
    result, data = run(lu.execute, ReadCapacity16(allocation_length=32).encode(), data_in=32)
    assert result.good
    expected = bytes.fromhex("00000000ffffffff")  # RETURNED LOGICAL BLOCK ADDRESS (last LBA)
    expected += bytes.fromhex("00001000")  # LOGICAL BLOCK LENGTH 4096
    expected += bytes([0x00])  # P_TYPE 0, PROT_EN 0
    expected += bytes([0x03])  # P_I_EXPONENT 0, LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT 3
    expected += bytes([0x00, 0x00])  # LBPME 0, LBPRZ 0, LOWEST ALIGNED LBA 0
    expected += bytes(16)  # reserved
    assert data == expected


@pytest.mark.parametrize("alloc", [0, 8, 12, 31])
def test_read_capacity_16_truncates(alloc: int) -> None:
    result, data = run(
        make_lu().execute, ReadCapacity16(allocation_length=alloc).encode(), data_in=alloc
    )
    assert result.good
    assert len(data) == alloc


def test_read_capacity_16_of_the_largest_device() -> None:
    lu = make_lu(HugeDevice(512, U64 - 1))
    _, data = run(lu.execute, ReadCapacity16().encode(), data_in=32)
    assert data[:8] == (U64 - 2).to_bytes(8, "big")


# --- READ / WRITE ------------------------------------------------------------------------


def rw(cls: type, lba: int, length: int, **flags: bool) -> bytes:
    return cls(lba=lba, transfer_length=length, **flags).encode()  # type: ignore[no-any-return]


@pytest.mark.parametrize("cls", [Read10, Read16, Write10, Write16])
@pytest.mark.parametrize(
    ("lba", "length", "ok"),
    [
        (0, 1, True),
        (63, 1, True),  # the last block
        (63, 2, False),  # one block past the end
        (64, 1, False),
        (64, 0, True),  # transfer length 0 at the capacity: LBA + 0 does not exceed it
        (65, 0, False),  # ... beyond it does
        (0, 64, True),
        (0, 65, False),
        (1 << 31, 1, False),
    ],
)
def test_range_boundaries(cls: type, lba: int, length: int, ok: bool) -> None:
    dev = RecordingDevice(RamDisk())
    lu = make_lu(dev)
    nbytes = length * 512
    if cls in (Read10, Read16):
        result, _ = run(lu.execute, rw(cls, lba, length), data_in=nbytes)
    else:
        result, _ = run(lu.execute, rw(cls, lba, length), data_out=b"\xab" * nbytes)
    if ok:
        assert result.good, result.sense_data()
        assert result.data_in_len + result.data_out_len == nbytes
        assert len(dev.calls) == (1 if length else 0)  # transfer length 0: no device call
    else:
        assert sense_of(result) == sn.LBA_OUT_OF_RANGE
        assert dev.calls == []


@pytest.mark.parametrize(
    ("lba", "length"),
    [
        (1 << 63, 1),
        (U64 - 1, 1),  # LBA + length wraps 2^64
        (U64 - 1, 0xFFFF_FFFF),
        (U64 - 2, 2),
        (U64 - 1, 0),
    ],
)
def test_range_near_2_64_on_small_device(lba: int, length: int) -> None:
    lu = make_lu(limits=BlockLimits())  # no transfer limit: the range check decides
    result, _ = run(lu.execute, rw(Read16, lba, length), data_in=length * 512 if length < 4 else 0)
    assert sense_of(result) == sn.LBA_OUT_OF_RANGE


def test_range_near_2_64_on_largest_device() -> None:
    dev = HugeDevice(512, U64 - 1)  # LBAs 0 .. 2^64-2
    lu = make_lu(dev)
    result, _ = run(lu.execute, rw(Read16, U64 - 2, 1), data_in=512)
    assert result.good
    assert dev.calls == [("read", U64 - 2)]
    result, _ = run(lu.execute, rw(Write16, U64 - 2, 1), data_out=bytes(512))
    assert result.good
    result, _ = run(lu.execute, rw(Read16, U64 - 2, 2), data_in=1024)  # wraps 2^64
    assert sense_of(result) == sn.LBA_OUT_OF_RANGE
    result, _ = run(lu.execute, rw(Read16, U64 - 1, 0))  # LBA = capacity, nothing moved
    assert result.good


def test_transfer_length_over_block_limits() -> None:
    lu = make_lu(RamDisk(512, 1024), limits=BlockLimits(max_transfer_blocks=128))
    result, _ = run(lu.execute, rw(Read10, 0, 128), data_in=128 * 512)
    assert result.good
    result, _ = run(lu.execute, rw(Read10, 0, 129), data_in=129 * 512)
    assert sense_of(result) == sn.INVALID_FIELD_IN_CDB
    assert pointer_of(result) == FieldPointer(7)  # TRANSFER LENGTH of READ(10)
    result, _ = run(lu.execute, rw(Write16, 0, 129), data_out=bytes(129 * 512))
    assert pointer_of(result) == FieldPointer(10)  # TRANSFER LENGTH of WRITE(16)
    # The limit is checked before the range.
    result, _ = run(lu.execute, rw(Read16, 1 << 40, 200))
    assert sense_of(result) == sn.INVALID_FIELD_IN_CDB


def test_no_limit_when_max_transfer_is_zero() -> None:
    lu = make_lu(RamDisk(512, 1024), limits=BlockLimits(max_transfer_blocks=0))
    result, _ = run(lu.execute, rw(Read16, 0, 1024), data_in=1024 * 512)
    assert result.good


def test_write_then_read_scattered_buffers() -> None:
    disk = RamDisk()
    lu = make_lu(disk)
    payload = bytes((i * 7) & 0xFF for i in range(3 * 512))
    outs = [memoryview(payload)[:100], memoryview(payload)[100:612], memoryview(payload)[612:]]
    result = lu.execute(rw(Write10, 5, 3), outs, [])
    assert result == ScsiResult(Status.GOOD, data_out_len=1536)
    assert disk.data[5 * 512 : 8 * 512] == payload
    a, b, c = bytearray(1), bytearray(1000), bytearray(600)
    result = lu.execute(rw(Read16, 5, 3), [], [memoryview(a), memoryview(b), memoryview(c)])
    assert result == ScsiResult(Status.GOOD, data_in_len=1536, residual=65)
    assert (a + b + c)[:1536] == payload


def test_read_goes_straight_into_the_callers_buffers() -> None:
    dev = RecordingDevice(RamDisk())
    lu = make_lu(dev)
    a, b = bytearray(700), bytearray(700)
    result = lu.execute(rw(Read10, 0, 2), [], [memoryview(a), memoryview(b)])
    assert result.good
    (call,) = dev.calls
    assert call.nbytes == 1024
    assert call.exporters == [a, b]
    assert all(x is y for x, y in zip(call.exporters, [a, b], strict=True))


def test_write_comes_straight_from_the_callers_buffers() -> None:
    dev = RecordingDevice(RamDisk())
    lu = make_lu(dev)
    a = bytearray(b"\x01" * 2048)
    result = lu.execute(rw(Write16, 0, 2), [memoryview(a)], [])
    assert result == ScsiResult(Status.GOOD, data_out_len=1024, residual=1024)
    assert dev.calls[0].exporters[0] is a


def test_non_byte_memoryviews_are_accepted() -> None:
    disk = RamDisk()
    disk.data[:1024] = bytes(range(256)) * 4
    words = array.array("I", [0] * 256)  # 1024 bytes, format "I"
    result = make_lu(disk).execute(rw(Read10, 0, 2), [], [memoryview(words)])
    assert result.good
    assert words.tobytes() == bytes(disk.data[:1024])


@pytest.mark.parametrize("cls", [Write10, Write16])
def test_fua_reaches_the_device(cls: type) -> None:
    dev = RecordingDevice(RamDisk())
    lu = make_lu(dev)
    run(lu.execute, rw(cls, 1, 1, fua=True), data_out=bytes(512))
    run(lu.execute, rw(cls, 1, 1, dpo=True, fua_nv=True), data_out=bytes(512))
    assert [(c.op, c.fua) for c in dev.calls] == [("write", True), ("write", False)]


@pytest.mark.parametrize("cls", [Read10, Read16])
def test_read_fua_flushes_first_and_dpo_is_ignored(cls: type) -> None:
    dev = RecordingDevice(RamDisk())
    lu = make_lu(dev)
    run(lu.execute, rw(cls, 1, 1, fua=True), data_in=512)
    assert dev.ops() == ["flush", "read"]
    dev.calls.clear()
    run(lu.execute, rw(cls, 1, 1, dpo=True, fua_nv=True), data_in=512)
    assert dev.ops() == ["read"]


# --- overrun and residual ----------------------------------------------------------------


def test_read_with_too_small_buffers_is_an_overrun() -> None:
    dev = RecordingDevice(RamDisk())
    result, _ = run(make_lu(dev).execute, rw(Read10, 0, 2), data_in=1023)
    assert result.overrun
    assert result.data_in_len == 0
    assert result.residual == 1023
    assert sense_of(result) == sn.INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT
    assert dev.calls == []


def test_write_with_too_small_buffers_is_an_overrun() -> None:
    dev = RecordingDevice(RamDisk())
    result, _ = run(make_lu(dev).execute, rw(Write16, 0, 2), data_out=bytes(512))
    assert result.overrun
    assert dev.calls == []


def test_allocation_length_over_buffer_is_an_overrun() -> None:
    result, _ = run(make_lu().execute, Inquiry(allocation_length=36).encode(), data_in=10)
    assert result.overrun
    assert result.data_in_len == 0


def test_residual_for_larger_buffers_and_no_data_commands() -> None:
    result, _ = run(make_lu().execute, rw(Read10, 0, 1), data_in=600)
    assert (result.data_in_len, result.residual, result.overrun) == (512, 88, False)
    result, _ = run(make_lu().execute, TestUnitReady().encode(), data_in=100)
    assert result == ScsiResult(Status.GOOD, residual=100)


def test_cdb_errors_win_over_overrun() -> None:
    result, _ = run(make_lu().execute, rw(Read10, 64, 2), data_in=0)
    assert not result.overrun
    assert sense_of(result) == sn.LBA_OUT_OF_RANGE


# --- SYNCHRONIZE CACHE -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "ok"),
    [
        (SynchronizeCache10(), True),  # whole device
        (SynchronizeCache16(lba=10, num_blocks=54), True),  # up to the last block
        (SynchronizeCache10(lba=10, num_blocks=55), False),  # one past
        (SynchronizeCache16(lba=64, num_blocks=0), True),  # empty range at the capacity
        (SynchronizeCache10(lba=65, num_blocks=0), False),
        (SynchronizeCache16(lba=U64 - 1, num_blocks=2), False),  # wraps 2^64
        (SynchronizeCache10(immed=True, sync_nv=True, group_number=3), True),
    ],
)
def test_synchronize_cache(cmd: SynchronizeCache10 | SynchronizeCache16, ok: bool) -> None:
    dev = RecordingDevice(RamDisk())
    result, _ = run(make_lu(dev).execute, cmd.encode())
    if ok:
        assert result.good
        assert dev.ops() == ["flush"]
    else:
        assert sense_of(result) == sn.LBA_OUT_OF_RANGE
        assert dev.calls == []


# --- MODE SENSE --------------------------------------------------------------------------

CACHING_PAGE = bytes([0x08, 0x12, 0x04]) + bytes(17)  # PS 0, page 08h, length 12h, WCE=1
CONTROL_PAGE = bytes([0x0A, 0x0A, 0x00, 0x10]) + bytes(8)  # QUEUE ALGORITHM MODIFIER 1
SHORT_DESCRIPTOR = bytes.fromhex("0000004000000200")  # 64 blocks, reserved, 512 bytes


def test_mode_sense_6_all_pages_golden() -> None:
    result, data = run(make_lu().execute, ModeSense6(allocation_length=255).encode(), data_in=255)
    assert result.good
    header = bytes(
        [
            0x2B,  # MODE DATA LENGTH: 44 - 1
            0x00,  # MEDIUM TYPE
            0x10,  # DEVICE-SPECIFIC PARAMETER: WP 0, DPOFUA 1
            0x08,  # BLOCK DESCRIPTOR LENGTH
        ]
    )
    assert data == header + SHORT_DESCRIPTOR + CACHING_PAGE + CONTROL_PAGE


def test_mode_sense_6_truncation_keeps_full_length() -> None:
    result, data = run(make_lu().execute, ModeSense6(allocation_length=4).encode(), data_in=4)
    assert result.good
    assert data == bytes([0x2B, 0x00, 0x10, 0x08])
    result, data = run(make_lu().execute, ModeSense6(allocation_length=13).encode(), data_in=13)
    assert data[0] == 0x2B and len(data) == 13


def test_mode_sense_single_pages_and_dbd() -> None:
    execute = make_lu().execute
    _, data = run(execute, ModeSense6(dbd=True, page_code=0x08).encode(), data_in=255)
    assert data == bytes([0x17, 0x00, 0x10, 0x00]) + CACHING_PAGE
    _, data = run(
        execute, ModeSense6(dbd=True, page_code=0x0A, subpage_code=0xFF).encode(), data_in=255
    )
    assert data == bytes([0x0F, 0x00, 0x10, 0x00]) + CONTROL_PAGE
    _, data = run(
        execute, ModeSense6(dbd=True, page_code=0x3F, subpage_code=0xFF).encode(), data_in=255
    )
    assert data[4:] == CACHING_PAGE + CONTROL_PAGE


def test_mode_sense_10_long_lba_golden() -> None:
    result, data = run(
        make_lu().execute,
        ModeSense10(llbaa=True, page_code=0x08, allocation_length=512).encode(),
        data_in=512,
    )
    assert result.good
    header = bytes(
        [
            0x00, 0x2A,  # MODE DATA LENGTH: 8 + 16 + 20 - 2 = 42
            0x00,  # MEDIUM TYPE
            0x10,  # DEVICE-SPECIFIC PARAMETER: DPOFUA
            0x01,  # LONGLBA 1
            0x00,  # reserved
            0x00, 0x10,  # BLOCK DESCRIPTOR LENGTH 16
        ]
    )  # fmt: skip
    descriptor = (64).to_bytes(8, "big") + bytes(4) + (512).to_bytes(4, "big")
    assert data == header + descriptor + CACHING_PAGE


def test_mode_sense_10_short_descriptor_without_llbaa() -> None:
    _, data = run(
        make_lu().execute, ModeSense10(page_code=0x0A, allocation_length=512).encode(), data_in=512
    )
    assert data[:8] == bytes([0x00, 0x1A, 0x00, 0x10, 0x00, 0x00, 0x00, 0x08])
    assert data[8:16] == SHORT_DESCRIPTOR
    assert data[16:] == CONTROL_PAGE


def test_mode_sense_short_descriptor_saturates_for_huge_devices() -> None:
    lu = make_lu(HugeDevice(512, 1 << 33))
    _, data = run(lu.execute, ModeSense6(page_code=0x08).encode(), data_in=255)
    assert data[4:12] == bytes.fromhex("ffffffff00000200")
    _, data = run(
        lu.execute,
        ModeSense10(llbaa=True, page_code=0x08, allocation_length=512).encode(),
        data_in=512,
    )
    assert data[8:16] == (1 << 33).to_bytes(8, "big")


def test_mode_sense_page_controls() -> None:
    execute = make_lu().execute
    _, current = run(execute, ModeSense6().encode(), data_in=255)
    _, default = run(execute, ModeSense6(pc=PageControl.DEFAULT).encode(), data_in=255)
    assert default == current
    _, changeable = run(execute, ModeSense6(pc=PageControl.CHANGEABLE).encode(), data_in=255)
    # Same lengths, page headers kept, every parameter a zero mask.
    assert changeable[:4] == current[:4]
    assert changeable[4:12] == bytes(8)
    assert changeable[12:32] == bytes([0x08, 0x12]) + bytes(18)
    assert changeable[32:] == bytes([0x0A, 0x0A]) + bytes(10)
    result, _ = run(execute, ModeSense6(pc=PageControl.SAVED).encode(), data_in=255)
    assert sense_of(result) == sn.SAVING_PARAMETERS_NOT_SUPPORTED
    assert pointer_of(result) == FieldPointer(2, 7)


@pytest.mark.parametrize(("page", "subpage", "pointer"), [
    (0x00, 0x00, FieldPointer(2, 5)),
    (0x01, 0x00, FieldPointer(2, 5)),
    (0x1C, 0x00, FieldPointer(2, 5)),
    (0x08, 0x01, FieldPointer(3)),
    (0x3F, 0x10, FieldPointer(3)),
])  # fmt: skip
def test_mode_sense_unsupported_pages(page: int, subpage: int, pointer: FieldPointer) -> None:
    for cmd in (
        ModeSense6(page_code=page, subpage_code=subpage),
        ModeSense10(page_code=page, subpage_code=subpage),
    ):
        result, _ = run(make_lu().execute, cmd.encode(), data_in=1024)
        assert sense_of(result) == sn.INVALID_FIELD_IN_CDB
        assert pointer_of(result) == pointer


# --- REQUEST SENSE, TEST UNIT READY, unsupported commands --------------------------------


def test_request_sense_returns_no_sense() -> None:
    result, data = run(make_lu().execute, RequestSense(allocation_length=252).encode(), data_in=252)
    assert result.good
    assert data == bytes([0x70, 0, 0x00, 0, 0, 0, 0, 0x0A]) + bytes(10)
    result, data = run(make_lu().execute, RequestSense(allocation_length=8).encode(), data_in=8)
    assert data == bytes([0x70, 0, 0x00, 0, 0, 0, 0, 0x0A])  # length field not adjusted


def test_request_sense_descriptor_format_refused() -> None:
    # SPC-4 6.39 table 313: DESC=1 without descriptor-format support.
    result, data = run(
        make_lu().execute, RequestSense(desc=True, allocation_length=252).encode(), data_in=252
    )
    assert sense_of(result) == sn.INVALID_FIELD_IN_CDB
    assert pointer_of(result) == FieldPointer(1, 0)
    assert data == b""


def test_test_unit_ready() -> None:
    assert make_lu().execute(TestUnitReady().encode()) == ScsiResult(Status.GOOD)


@pytest.mark.parametrize(
    "cdb",
    [
        bytes([0x08, 0, 0, 0, 1, 0]),  # READ(6)
        bytes([0x0A, 0, 0, 0, 1, 0]),  # WRITE(6)
        bytes([0x15, 0x10, 0, 0, 0, 0]),  # MODE SELECT(6)
        bytes([0xA3, 0x0C]) + bytes(10),  # REPORT SUPPORTED OPERATION CODES
        bytes([0x42]) + bytes(9),  # UNMAP
        ReportLuns().encode(),  # a target command, not an LU one
        b"",
        bytes([0x28, 0, 0, 0]),  # READ(10) cut short
    ],
)
def test_unsupported_commands(cdb: bytes) -> None:
    result = make_lu().execute(cdb)
    assert sense_of(result) == sn.INVALID_COMMAND_OPERATION_CODE


# --- device failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "cdb", "expected"),
    [
        (
            FailingDevice(on_read=MediumError("eio", write=False)),
            rw(Read10, 0, 1),
            sn.UNRECOVERED_READ_ERROR,
        ),
        (
            FailingDevice(on_write=MediumError("eio", write=True)),
            rw(Write10, 0, 1),
            sn.WRITE_ERROR,
        ),
        (
            FailingDevice(on_flush=MediumError("eio", write=True)),
            SynchronizeCache10().encode(),
            sn.WRITE_ERROR,
        ),
        (
            FailingDevice(on_read=AccessDenied("masked")),
            rw(Read16, 0, 1),
            sn.ACCESS_DENIED_NO_ACCESS_RIGHTS,
        ),
        (
            FailingDevice(on_write=AccessDenied("masked")),
            rw(Write16, 0, 1),
            sn.ACCESS_DENIED_NO_ACCESS_RIGHTS,
        ),
        (
            FailingDevice(on_read=BlockError("link down")),
            rw(Read10, 0, 1),
            sn.LOGICAL_UNIT_COMMUNICATION_FAILURE,
        ),
    ],
)
def test_block_errors_become_sense(device: FailingDevice, cdb: bytes, expected: Sense) -> None:
    lu = make_lu(device)
    result = lu.execute(cdb, [memoryview(bytes(512))], [memoryview(bytearray(512))])
    assert sense_of(result) == expected
    assert result.data_in_len == result.data_out_len == 0
    assert lu.internal_errors == 0


def test_medium_error_sense_key() -> None:
    result = make_lu(FailingDevice(on_read=MediumError("eio", write=False))).execute(
        rw(Read10, 0, 1), [], [memoryview(bytearray(512))]
    )
    assert sense_of(result).key is SenseKey.MEDIUM_ERROR


def test_unexpected_exception_is_hardware_error_and_reported() -> None:
    seen: list[BaseException] = []
    boom = RuntimeError("bug")
    lu = LogicalUnit(FailingDevice(on_read=boom), make_identity(), on_internal_error=seen.append)
    result = lu.execute(rw(Read10, 0, 1), [], [memoryview(bytearray(512))])
    assert sense_of(result) == sn.INTERNAL_TARGET_FAILURE
    assert sense_of(result).key is SenseKey.HARDWARE_ERROR
    assert lu.internal_errors == 1
    assert seen == [boom]


def test_block_range_error_is_a_bug() -> None:
    lu = make_lu(FailingDevice(on_write=BlockRangeError("beyond")))
    result = lu.execute(rw(Write10, 0, 1), [memoryview(bytes(512))], [])
    assert sense_of(result) == sn.INTERNAL_TARGET_FAILURE
    assert lu.internal_errors == 1


def test_failing_error_callback_does_not_raise() -> None:
    def bad_callback(exc: BaseException) -> None:
        raise ValueError("logger broke")

    lu = LogicalUnit(
        FailingDevice(on_flush=KeyError("x")), make_identity(), on_internal_error=bad_callback
    )
    result = lu.execute(SynchronizeCache16().encode())
    assert sense_of(result) == sn.INTERNAL_TARGET_FAILURE
    assert lu.internal_errors == 1


def test_read_only_data_in_buffer_is_an_internal_error_not_a_raise() -> None:
    lu = make_lu()
    result = lu.execute(Inquiry().encode(), [], [memoryview(bytes(36))])
    assert sense_of(result) == sn.INTERNAL_TARGET_FAILURE


def test_construction_checks() -> None:
    with pytest.raises(ValueError):
        LogicalUnit(RamDisk(block_size=0), make_identity())
    with pytest.raises(ValueError):
        LogicalUnit(HugeDevice(1 << 24, 1), make_identity())
    with pytest.raises(TypeError):
        LogicalUnit(RamDisk(), "identity")  # type: ignore[arg-type]
    lu = make_lu()
    assert lu.identity.serial == "SER123"
    assert lu.device.block_size == 512


# --- never raises ------------------------------------------------------------------------

small_io = st.builds(
    lambda cls, lba, n, fua: cls(lba=lba, transfer_length=n, fua=fua).encode(),
    st.sampled_from([Read10, Read16, Write10, Write16]),
    st.integers(0, 70),
    st.integers(0, 20),
    st.booleans(),
)


@settings(max_examples=500, deadline=None)
@given(
    cdb=st.one_of(cdbs, small_io),
    in_sizes=st.lists(st.integers(0, 3000), max_size=3),
    out_size=st.integers(0, 6000),
)
def test_execute_never_raises(cdb: bytes, in_sizes: list[int], out_size: int) -> None:
    lu = LogicalUnit(RamDisk(512, 64), make_identity(limits=BlockLimits(max_transfer_blocks=16)))
    ins = [memoryview(bytearray(n)) for n in in_sizes]
    outs = [memoryview(bytes(out_size))] if out_size else []
    result = lu.execute(cdb, outs, ins)
    assert isinstance(result, ScsiResult)
    total = sum(in_sizes) + out_size
    assert 0 <= result.data_in_len <= sum(in_sizes)
    assert 0 <= result.data_out_len <= out_size
    assert result.residual == total - result.data_in_len - result.data_out_len
    if result.good:
        assert result.sense == b""
    else:
        assert len(result.sense) == 18
        decoded = result.sense_data()
        assert decoded is not None
        assert decoded.sense.key == SenseKey.ILLEGAL_REQUEST  # a sane device never fails
    assert lu.internal_errors == 0  # no CDB reaches an unexpected exception


def test_partial_binds_like_a_transport() -> None:
    execute = partial(make_lu().execute)
    result, data = run(execute, Inquiry(allocation_length=36).encode(), data_in=36)
    assert result.good and data == STANDARD_INQUIRY[:36]
