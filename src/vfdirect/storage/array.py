"""A storage array: a WWN, target ports, and physical LUNs kept in one directory.

Rules of this module:

* the array's directory holds its metadata, ``array.json`` (the array's :meth:`dump`),
  and one sparse file per file-backed LUN (``lun-00000.img``); a LUN may instead be an
  existing block device, registered by path;
* metadata is replaced atomically (write, fsync, rename, fsync the directory), so a
  crash leaves the old or the new configuration, never half of one; several processes
  may open the same array (the SAN is shared): readers call :meth:`reload`;
* :meth:`dump` is location-free plain data (file LUNs are named relative to the array
  directory), and ``StorageArray.load(a.dump(), a.directory).dump() == a.dump()``;
* the array knows nothing of the fabric: the caller adds :attr:`target_ports` to a
  :class:`~vfdirect.core.fabric.Fabric` and masks LUNs there.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from vfdirect.core.array import (
    MAX_LUN,
    ArrayModelError,
    LunKey,
    PhysicalLun,
    dump_field,
    parse_wwn,
    target_port_wwpn,
)
from vfdirect.core.ids import LunNumber
from vfdirect.core.wwn import Wwn
from vfdirect.storage.backend import LunBackend
from vfdirect.storage.blockdev import BlockDeviceBackend
from vfdirect.storage.file import FileBackend

ARRAY_FORMAT = "vfdirect.storage-array"
ARRAY_VERSION = 1
METADATA_NAME = "array.json"


class StorageError(Exception):
    """A storage array operation was refused."""


class UnknownLunError(StorageError, KeyError):
    """No LUN with that number on the array."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LunExistsError(StorageError):
    """The LUN number (or the block device) is already in use on the array."""


class ArrayMetadataError(StorageError, ValueError):
    """The array's metadata is missing, malformed, or disagrees with its LUNs."""


class BackingKind(StrEnum):
    FILE = "file"
    BLOCKDEV = "blockdev"


@dataclass(frozen=True, slots=True)
class LunEntry:
    """A physical LUN and where its blocks live."""

    lun: PhysicalLun
    backing: BackingKind
    #: FILE: a file name inside the array directory; BLOCKDEV: the device's path.
    path: str

    def dump(self) -> dict[str, Any]:
        return {**self.lun.dump(), "backing": self.backing.value, "path": self.path}

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> LunEntry:
        err = ArrayMetadataError
        try:
            lun = PhysicalLun.load(data)
            backing = BackingKind(dump_field(data, "backing", str, err))
        except ValueError as exc:
            raise err(f"LUN entry: {exc}") from exc
        path = dump_field(data, "path", str, err)
        if backing is BackingKind.FILE and (not path or Path(path).name != path):
            raise err(f"file LUN path {path!r} must be a plain name inside the array directory")
        return cls(lun, backing, path)


class StorageArray:
    """One storage array. Create with :meth:`create`, reopen with :meth:`open`."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        wwn: Wwn,
        target_ports: Sequence[Wwn],
        luns: Mapping[int, LunEntry] | None = None,
    ) -> None:
        if not target_ports:
            raise ArrayMetadataError(f"array {wwn} needs at least one target port")
        if len(set(target_ports)) != len(target_ports) or wwn in target_ports:
            raise ArrayMetadataError(f"array {wwn}: target port names must be unique")
        self._directory = Path(directory)
        self._wwn = wwn
        self._target_ports = tuple(target_ports)
        self._luns: dict[int, LunEntry] = {}
        for number, entry in sorted((luns or {}).items()):
            if entry.lun.key != LunKey(wwn, LunNumber(number)):
                raise ArrayMetadataError(f"LUN entry {entry.lun.key} filed as {number}")
            self._luns[number] = entry

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        wwn: Wwn,
        *,
        target_ports: Sequence[Wwn] | None = None,
        port_count: int = 1,
    ) -> StorageArray:
        """A new, empty array in ``directory`` (created if missing, must hold no array).
        Without ``target_ports``, ports are named by :func:`target_port_wwpn`."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if (path / METADATA_NAME).exists():
            raise StorageError(f"{path} already holds a storage array")
        if target_ports is None:
            target_ports = [target_port_wwpn(wwn, i) for i in range(port_count)]
        array = cls(path, wwn, target_ports)
        array.save()
        return array

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> StorageArray:
        """The array whose metadata is in ``directory``."""
        return cls.load(cls._read_metadata(Path(directory)), directory)

    def reload(self) -> None:
        """Re-read the metadata (another process may have changed the LUNs)."""
        fresh = self.open(self._directory)
        if fresh.wwn != self._wwn:
            raise ArrayMetadataError(f"{self._directory} now holds array {fresh.wwn}")
        self._target_ports = fresh._target_ports
        self._luns = fresh._luns

    def save(self) -> None:
        """Atomically replace the metadata file with :meth:`dump`."""
        final = self._directory / METADATA_NAME
        tmp = self._directory / f".{METADATA_NAME}.{os.getpid()}.tmp"
        data = json.dumps(self.dump(), indent=2, sort_keys=True).encode() + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=True) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        dfd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- identity ----------------------------------------------------------------------

    @property
    def wwn(self) -> Wwn:
        return self._wwn

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def target_ports(self) -> tuple[Wwn, ...]:
        """The array's target port WWPNs (to be added to the fabric and zoned)."""
        return self._target_ports

    def key(self, lun: int) -> LunKey:
        return LunKey(self._wwn, LunNumber(lun))

    # -- LUNs --------------------------------------------------------------------------

    def lun_list(self) -> tuple[PhysicalLun, ...]:
        return tuple(e.lun for _, e in sorted(self._luns.items()))

    def lun_entry(self, lun: int) -> LunEntry:
        entry = self._luns.get(lun)
        if entry is None:
            raise UnknownLunError(f"array {self._wwn} has no LUN {lun}")
        return entry

    def lun_get(self, lun: int) -> PhysicalLun:
        return self.lun_entry(lun).lun

    def lun_path(self, lun: int) -> Path:
        entry = self.lun_entry(lun)
        if entry.backing is BackingKind.FILE:
            return self._directory / entry.path
        return Path(entry.path)

    def lun_create(
        self, num_blocks: int, block_size: int = 512, lun: int | None = None
    ) -> PhysicalLun:
        """A new sparse-file LUN: every block reads as zeros, so it may join a datastore
        with ``fresh=True``."""
        number = self._pick_number(lun)
        try:
            physical = PhysicalLun(self.key(number), block_size, num_blocks)
        except ArrayModelError as exc:
            raise StorageError(str(exc)) from exc
        name = f"lun-{number:05d}.img"
        FileBackend.create(self._directory / name, block_size, num_blocks).close()
        self._luns[number] = LunEntry(physical, BackingKind.FILE, name)
        try:
            self.save()
        except BaseException:
            del self._luns[number]
            (self._directory / name).unlink()
            raise
        return physical

    def lun_register_blockdev(
        self, device: str | os.PathLike[str], lun: int | None = None
    ) -> PhysicalLun:
        """Make an existing block device a LUN (its geometry is read from the device).
        Its content is unknown: it joins a datastore with ``fresh=False``."""
        path = str(Path(device).resolve())
        if any(e.backing is BackingKind.BLOCKDEV and e.path == path for e in self._luns.values()):
            raise LunExistsError(f"{path} is already a LUN of array {self._wwn}")
        number = self._pick_number(lun)
        with BlockDeviceBackend(path) as dev:
            physical = PhysicalLun(self.key(number), dev.block_size, dev.num_blocks)
        self._luns[number] = LunEntry(physical, BackingKind.BLOCKDEV, path)
        try:
            self.save()
        except BaseException:
            del self._luns[number]
            raise
        return physical

    def lun_delete(self, lun: int) -> None:
        """Forget a LUN; a file LUN's file is removed, a block device is left as is."""
        entry = self.lun_entry(lun)
        path = self.lun_path(lun)
        del self._luns[lun]
        self.save()
        if entry.backing is BackingKind.FILE:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def lun_open(self, lun: int) -> LunBackend:
        """Open the LUN's backend (the caller closes it); its geometry is checked against
        the metadata."""
        entry = self.lun_entry(lun)
        path = self.lun_path(lun)
        backend: FileBackend | BlockDeviceBackend
        if entry.backing is BackingKind.FILE:
            backend = FileBackend(path, entry.lun.block_size)
        else:
            backend = BlockDeviceBackend(path)
        if (backend.block_size, backend.num_blocks) != (entry.lun.block_size, entry.lun.num_blocks):
            found = f"{backend.num_blocks} blocks of {backend.block_size} bytes"
            backend.close()
            raise ArrayMetadataError(
                f"{entry.lun.key}: {path} holds {found}, the metadata says "
                f"{entry.lun.num_blocks} blocks of {entry.lun.block_size} bytes"
            )
        return backend

    def lun_zero(self, lun: int, start: int, count: int) -> None:
        """Zero blocks ``[start, start + count)`` of a LUN, durably."""
        backend = self.lun_open(lun)
        try:
            backend.zero_blocks(start, count)
        finally:
            backend.close()

    # -- dump/load ---------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        return {
            "format": ARRAY_FORMAT,
            "version": ARRAY_VERSION,
            "wwn": self._wwn.canonical(),
            "target_ports": [w.canonical() for w in self._target_ports],
            "luns": [e.dump() for _, e in sorted(self._luns.items())],
        }

    @classmethod
    def load(cls, data: Mapping[str, Any], directory: str | os.PathLike[str]) -> StorageArray:
        err = ArrayMetadataError
        if dump_field(data, "format", str, err) != ARRAY_FORMAT:
            raise err(f"not a {ARRAY_FORMAT} dump")
        if dump_field(data, "version", int, err) != ARRAY_VERSION:
            raise err(f"unsupported {ARRAY_FORMAT} version {data['version']}")
        wwn = parse_wwn(dump_field(data, "wwn", str, err), "array wwn", err)
        ports = [
            parse_wwn(p, "target port", err) for p in dump_field(data, "target_ports", list, err)
        ]
        luns: dict[int, LunEntry] = {}
        for item in dump_field(data, "luns", list, err):
            if not isinstance(item, Mapping):
                raise err(f"LUN entry {item!r} is not an object")
            entry = LunEntry.load(item)
            if entry.lun.key.lun in luns:
                raise err(f"LUN {entry.lun.key.lun} appears twice")
            luns[entry.lun.key.lun] = entry
        return cls(directory, wwn, ports, luns)

    # -- internals ---------------------------------------------------------------------

    @staticmethod
    def _read_metadata(directory: Path) -> dict[str, Any]:
        path = directory / METADATA_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ArrayMetadataError(f"{directory} holds no storage array") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArrayMetadataError(f"{path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ArrayMetadataError(f"{path}: not a JSON object")
        return data

    def _pick_number(self, lun: int | None) -> int:
        if lun is None:
            free = next((n for n in range(MAX_LUN + 1) if n not in self._luns), None)
            if free is None:
                raise StorageError(f"array {self._wwn} has no free LUN number")
            return free
        if isinstance(lun, bool) or not 0 <= lun <= MAX_LUN:
            raise StorageError(f"LUN number {lun!r} is not in 0..{MAX_LUN}")
        if lun in self._luns:
            raise LunExistsError(f"array {self._wwn} already has LUN {lun}")
        return lun
