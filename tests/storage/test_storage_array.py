"""StorageArray: LUN files and block devices in a directory, metadata, dump/load."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from storage_helpers import LoopDevices

from vfdirect.core.array import LunKey, PhysicalLun, target_port_wwpn
from vfdirect.core.ids import LunNumber
from vfdirect.core.wwn import Wwn
from vfdirect.storage import (
    ArrayMetadataError,
    BackingKind,
    BlockDeviceBackend,
    FileBackend,
    LunExistsError,
    StorageArray,
    StorageError,
    UnknownLunError,
)

ARRAY = Wwn.naa5(0x1000)


@pytest.fixture
def array(tmp_path: Path) -> StorageArray:
    return StorageArray.create(tmp_path / "array", ARRAY)


def test_create_writes_metadata_and_default_port(array: StorageArray) -> None:
    meta = json.loads((array.directory / "array.json").read_text())
    assert meta == array.dump()
    assert meta["wwn"] == ARRAY.canonical()
    assert array.target_ports == (target_port_wwpn(ARRAY, 0),)
    assert array.target_ports[0].canonical() == "naa.50af1de100001000"
    assert array.lun_list() == ()


def test_create_refuses_an_existing_array(array: StorageArray) -> None:
    with pytest.raises(StorageError, match="already holds"):
        StorageArray.create(array.directory, Wwn.naa5(0x2000))


def test_explicit_target_ports(tmp_path: Path) -> None:
    ports = [Wwn.naa5(0x77), Wwn.naa5(0x78)]
    arr = StorageArray.create(tmp_path / "a", ARRAY, target_ports=ports)
    assert arr.target_ports == tuple(ports)
    with pytest.raises(ArrayMetadataError, match="unique"):
        StorageArray.create(tmp_path / "b", ARRAY, target_ports=[ports[0], ports[0]])
    arr2 = StorageArray.create(tmp_path / "c", ARRAY, port_count=3)
    assert len(set(arr2.target_ports)) == 3


def test_lun_create_is_sparse_and_reads_zeros(array: StorageArray) -> None:
    lun = array.lun_create(2048, 512)
    assert lun == PhysicalLun(LunKey(ARRAY, LunNumber(0)), 512, 2048)
    path = array.lun_path(0)
    assert path.stat().st_size == 2048 * 512
    assert path.stat().st_blocks == 0  # sparse: nothing allocated
    with array.lun_open(0) as dev:
        buf = bytearray(2048 * 512)
        dev.read_blocks(0, [memoryview(buf)])
        assert not any(buf)


def test_lun_numbers_and_listing(array: StorageArray) -> None:
    array.lun_create(8, 512)
    array.lun_create(8, 4096, lun=5)
    array.lun_create(8, 512)
    assert [lun.key.lun for lun in array.lun_list()] == [0, 1, 5]
    assert array.lun_get(5).block_size == 4096
    with pytest.raises(LunExistsError):
        array.lun_create(8, 512, lun=5)
    with pytest.raises(StorageError, match="LUN number"):
        array.lun_create(8, 512, lun=16384)
    with pytest.raises(StorageError, match="block size"):
        array.lun_create(8, 1024)
    with pytest.raises(UnknownLunError, match="no LUN 9"):
        array.lun_get(9)


def test_lun_delete_removes_the_file(array: StorageArray) -> None:
    array.lun_create(8, 512)
    path = array.lun_path(0)
    array.lun_delete(0)
    assert not path.exists()
    assert array.lun_list() == ()
    assert StorageArray.open(array.directory).lun_list() == ()
    with pytest.raises(UnknownLunError):
        array.lun_delete(0)


def test_open_and_reload_see_changes_of_another_instance(array: StorageArray) -> None:
    other = StorageArray.open(array.directory)
    assert other.dump() == array.dump()
    array.lun_create(16, 512)
    assert other.lun_list() == ()
    other.reload()
    assert other.lun_list() == array.lun_list()


def test_dump_load_round_trip(array: StorageArray) -> None:
    array.lun_create(16, 512)
    array.lun_create(4, 4096, lun=7)
    data = json.loads(json.dumps(array.dump()))
    again = StorageArray.load(data, array.directory)
    assert again.dump() == array.dump()
    assert again.lun_list() == array.lun_list()
    assert again.target_ports == array.target_ports


def test_lun_zero(array: StorageArray) -> None:
    array.lun_create(16, 512)
    with array.lun_open(0) as dev:
        dev.write_blocks(0, [memoryview(b"\xab" * 16 * 512)])
    array.lun_zero(0, 4, 8)
    with array.lun_open(0) as dev:
        buf = bytearray(16 * 512)
        dev.read_blocks(0, [memoryview(buf)])
    assert buf[: 4 * 512] == b"\xab" * 4 * 512
    assert buf[4 * 512 : 12 * 512] == bytes(8 * 512)
    assert buf[12 * 512 :] == b"\xab" * 4 * 512


def test_geometry_mismatch_is_reported(array: StorageArray) -> None:
    array.lun_create(16, 512)
    os.truncate(array.lun_path(0), 8 * 512)
    with pytest.raises(ArrayMetadataError, match="metadata says 16 blocks"):
        array.lun_open(0)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format="other"),
        lambda d: d.update(version=99),
        lambda d: d.update(wwn="nonsense"),
        lambda d: d.update(target_ports=[]),
        lambda d: d["luns"].append(dict(d["luns"][0])),
        lambda d: d["luns"][0].update(path="../escape.img"),
        lambda d: d["luns"][0].update(backing="tape"),
        lambda d: d["luns"][0].update(block_size=1000),
        lambda d: d["luns"][0].pop("num_blocks"),
        lambda d: d["luns"][0].update(array=Wwn.naa5(1).canonical()),
    ],
)
def test_bad_metadata_is_refused(
    array: StorageArray, mutate: Callable[[dict[str, Any]], object]
) -> None:
    array.lun_create(16, 512)
    data = json.loads(json.dumps(array.dump()))
    mutate(data)
    with pytest.raises(ArrayMetadataError):
        StorageArray.load(data, array.directory)


def test_open_without_metadata(tmp_path: Path) -> None:
    with pytest.raises(ArrayMetadataError, match="no storage array"):
        StorageArray.open(tmp_path)
    (tmp_path / "array.json").write_text("{not json")
    with pytest.raises(ArrayMetadataError):
        StorageArray.open(tmp_path)


def test_no_temporary_files_left_behind(array: StorageArray) -> None:
    array.lun_create(8, 512)
    array.lun_delete(0)
    assert sorted(p.name for p in array.directory.iterdir()) == ["array.json"]


def test_register_a_loop_device(array: StorageArray, loop_devices: LoopDevices) -> None:
    device = loop_devices.attach(64 * 4096, 4096)
    lun = array.lun_register_blockdev(device, lun=3)
    assert (lun.block_size, lun.num_blocks) == (4096, 64)
    entry = array.lun_entry(3)
    assert entry.backing is BackingKind.BLOCKDEV
    assert Path(entry.path) == Path(device).resolve()
    with pytest.raises(LunExistsError):
        array.lun_register_blockdev(device)
    with array.lun_open(3) as dev:
        assert isinstance(dev, BlockDeviceBackend)
        dev.write_blocks(63, [memoryview(b"z" * 4096)])
    assert StorageArray.open(array.directory).lun_get(3) == lun
    array.lun_delete(3)  # unregisters; the device stays
    assert Path(device).exists()


def test_register_refuses_a_regular_file(array: StorageArray, tmp_path: Path) -> None:
    FileBackend.create(tmp_path / "f.img", 512, 8).close()
    with pytest.raises(ValueError, match="not a block device"):
        array.lun_register_blockdev(tmp_path / "f.img")
    assert array.lun_list() == ()
