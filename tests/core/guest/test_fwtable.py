"""The firmware table (claim A8): round trips, each malformation's specific error, and
the fuzz invariant: decode, or raise FirmwareTableError, never anything else."""

from __future__ import annotations

import contextlib
import json
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.guest.fwtable import (
    FWTABLE_MAGIC,
    FWTABLE_MAX_BYTES,
    FirmwareTable,
    FirmwareTableError,
    FwDisk,
    FwTableFault,
    decode_fwtable,
    encode_fwtable,
)
from vfdirect.core.wwn import Wwn

VPORT = Wwn.naa5(0x6101)


def disk(target: int = 0, lun: int = 0, **kw: object) -> FwDisk:
    fields: dict[str, object] = {
        "wwpn": VPORT, "target": target, "lun": lun, "vdisk": f"vd-{target}-{lun}",
        "capacity_blocks": 2048, "block_size": 512, "serial": f"VFD{target:04d}{lun:04d}",
        "wwn": Wwn.naa5(0x7000 + lun)}
    fields.update(kw)
    return FwDisk(**fields)  # type: ignore[arg-type]


def table(**kw: object) -> FirmwareTable:
    fields: dict[str, object] = {"vm_name": "vm0", "vm_id": "4f1c", "vf_socket":
                                 "/run/vfdirect/host1/vf0.sock",
                                 "disks": (disk(0, 0), disk(0, 1), disk(2, 300)),
                                 "generation": 3}
    fields.update(kw)
    return FirmwareTable(**fields)  # type: ignore[arg-type]


def test_round_trip() -> None:
    t = table()
    page = encode_fwtable(t)
    assert page[:4] == struct.pack("<I", FWTABLE_MAGIC)
    back = decode_fwtable(page.ljust(FWTABLE_MAX_BYTES, b"\0"))
    assert back == t and back.generation == 3
    assert back.targets == (0, 2)
    assert back.disk_at(2, 300) == disk(2, 300) and back.disk_at(1, 0) is None
    assert FirmwareTable.load(t.dump(), generation=3) == t


def test_no_socket_and_no_disks() -> None:
    t = table(vf_socket=None, disks=())
    assert decode_fwtable(t.encode()) == t


def test_blank_page_is_empty_not_malformed() -> None:
    with pytest.raises(FirmwareTableError) as info:
        decode_fwtable(bytes(FWTABLE_MAX_BYTES))
    assert info.value.reason is FwTableFault.EMPTY


def _patch(page: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(page)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _content_page(content: bytes) -> bytes:
    return struct.pack("<IHHIIQQ", FWTABLE_MAGIC, 1, 32, len(content), zlib.crc32(content),
                       0, 0) + content


@pytest.mark.parametrize(("mutate", "fault"), [
    (lambda p: _patch(p, 0, "<I", 0x12345678), FwTableFault.BAD_MAGIC),
    (lambda p: _patch(p, 4, "<H", 2), FwTableFault.BAD_VERSION),
    (lambda p: _patch(p, 6, "<H", 40), FwTableFault.BAD_HEADER),
    (lambda p: _patch(p, 0x18, "<Q", 1), FwTableFault.BAD_HEADER),
    (lambda p: _patch(p, 8, "<I", 0), FwTableFault.BAD_LENGTH),
    (lambda p: _patch(p, 8, "<I", 5000), FwTableFault.BAD_LENGTH),
    (lambda p: _patch(p, 12, "<I", 1), FwTableFault.BAD_CRC),
    (lambda p: p[:40], FwTableFault.TRUNCATED),
    (lambda p: p[:10], FwTableFault.TRUNCATED),
    (lambda p: p[:-1] + bytes([p[-1] ^ 1]), FwTableFault.BAD_CRC),
    (lambda p: _content_page(b"\xff\xfe"), FwTableFault.BAD_JSON),
    (lambda p: _content_page(b"[1, 2"), FwTableFault.BAD_JSON),
    (lambda p: _content_page(b"[]"), FwTableFault.BAD_CONTENT),
])
def test_each_malformation_has_its_reason(mutate: object, fault: FwTableFault) -> None:
    page = encode_fwtable(table())
    with pytest.raises(FirmwareTableError) as info:
        decode_fwtable(mutate(page))  # type: ignore[operator]
    assert info.value.reason is fault, info.value


def _with(**changes: object) -> dict[str, object]:
    doc = table().dump()
    for key, value in changes.items():
        if key.startswith("disk_"):
            doc["disks"][0][key[5:]] = value  # type: ignore[index]
        else:
            doc[key] = value
    return doc


@pytest.mark.parametrize("doc", [
    _with(format="other"),
    _with(extra=1),
    _with(vm={"name": "vm0"}),
    _with(vm={"name": "", "id": "x"}),
    _with(vf_socket=7),
    _with(disks={}),
    _with(disk_target=256),
    _with(disk_lun=16384),
    _with(disk_lun=True),
    _with(disk_block_size=1000),
    _with(disk_block_size=256),
    _with(disk_capacity_blocks=0),
    _with(disk_wwpn="not-a-wwn"),
    _with(disk_serial="séria"),
    _with(disk_vdisk=""),
    _with(disk_colour="red"),
])
def test_invalid_content_is_bad_content(doc: dict[str, object]) -> None:
    content = json.dumps(doc).encode()
    with pytest.raises(FirmwareTableError) as info:
        decode_fwtable(_content_page(content))
    assert info.value.reason is FwTableFault.BAD_CONTENT


def test_duplicate_address_is_refused() -> None:
    with pytest.raises(FirmwareTableError, match="two disks at target 0 LUN 0"):
        table(disks=(disk(0, 0), disk(0, 0, vdisk="other")))


def test_too_many_disks_for_a_page() -> None:
    many = tuple(disk(t, lun) for t in range(4) for lun in range(10))
    with pytest.raises(FirmwareTableError, match="exceeds"):
        encode_fwtable(table(disks=many))


names = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=20)
disks = st.builds(
    FwDisk, wwpn=st.integers(1, (1 << 36) - 1).map(Wwn.naa5), target=st.integers(0, 255),
    lun=st.integers(0, 16383), vdisk=names, capacity_blocks=st.integers(1, 1 << 40),
    block_size=st.sampled_from([512, 4096]), serial=names,
    wwn=st.integers(1, (1 << 36) - 1).map(Wwn.naa5))
tables = st.builds(
    FirmwareTable, vm_name=names, vm_id=names, vf_socket=st.none() | names,
    disks=st.lists(disks, max_size=8, unique_by=lambda d: d.address).map(tuple),
    generation=st.integers(0, (1 << 64) - 1))


@settings(max_examples=200, deadline=None)
@given(tables)
def test_round_trip_property(t: FirmwareTable) -> None:
    assert decode_fwtable(encode_fwtable(t)) == t


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 5))
def test_fuzz_decode_or_specific_error(data: bytes, how: int) -> None:
    """Raw bytes, bytes behind a valid header, or a valid page with bytes flipped."""
    if how == 1:
        data = _content_page(data)
    elif how == 2 and data:
        page = bytearray(encode_fwtable(table()))
        for i, b in enumerate(data[:8]):
            page[(b * 7 + i * 13) % len(page)] ^= b | 1
        data = bytes(page)
    try:
        decode_fwtable(data)
    except FirmwareTableError as exc:
        reason = exc.reason
    else:
        reason = None
    assert reason is None or isinstance(reason, FwTableFault)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | names,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        names, inner, max_size=4), max_leaves=20))
def test_fuzz_any_json_content(doc: object) -> None:
    content = json.dumps(doc).encode()[:4000]
    with contextlib.suppress(FirmwareTableError):
        decode_fwtable(_content_page(content))
