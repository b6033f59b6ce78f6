"""The firmware table (claim A8): the virtual disk addresses the hypervisor communicates
to the VM, in page 0 of guest memory. Pure codec.

Rules of this module:

* the hypervisor writes the table before the VM boots (``encode``); the guest reads it at
  boot (``decode``). Like a Firecracker snapshot header, the record carries a magic, a
  format version, its length and a CRC-32, and :func:`decode_fwtable` checks all four
  before it trusts a single byte of the content;
* the page layout (little-endian)::

      +0x00 u32 magic 0x54574656 ("VFWT")   +0x04 u16 version (1)   +0x06 u16 header (32)
      +0x08 u32 content length              +0x0C u32 CRC-32 of the content
      +0x10 u64 generation (the hypervisor bumps it on every rewrite)
      +0x18 u64 reserved (0)
      +0x20 content: canonical JSON (UTF-8, sorted keys, no blanks), at most 4064 bytes

* the content names the VM (name and id), the VF's vhost-user socket (or ``null``: the
  VM is told another way, e.g. ``vm-run --socket``), and the disks as (vport WWPN,
  target id, LUN, vdisk id, capacity in blocks, block size, serial, WWN);
* malformed input raises :class:`FirmwareTableError`, whose ``reason``
  (:class:`FwTableFault`) says which check failed; nothing else escapes ``decode``
  (the fuzz test states it). A page of zeros is :attr:`FwTableFault.EMPTY`: no table.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from vfdirect.core.wwn import Wwn, WwnError

__all__ = [
    "FWTABLE_FORMAT",
    "FWTABLE_MAGIC",
    "FWTABLE_MAX_BYTES",
    "FWTABLE_VERSION",
    "FirmwareTable",
    "FirmwareTableError",
    "FwDisk",
    "FwTableFault",
    "decode_fwtable",
    "encode_fwtable",
]

FWTABLE_MAGIC = 0x54574656  # b"VFWT" in little-endian order
FWTABLE_VERSION = 1
FWTABLE_MAX_BYTES = 4096
FWTABLE_FORMAT = "vfdirect.fwtable"
_HEADER = struct.Struct("<IHHIIQQ")
HEADER_BYTES = _HEADER.size  # 32
MAX_CONTENT_BYTES = FWTABLE_MAX_BYTES - HEADER_BYTES
_MAX_NAME = 64
_MAX_SERIAL = 32
_MAX_PATH = 1024


class FwTableFault(Enum):
    """Which check of the firmware table failed."""

    EMPTY = "no firmware table (page is blank)"
    TRUNCATED = "fewer bytes than the header or the length needs"
    BAD_MAGIC = "wrong magic"
    BAD_VERSION = "unsupported version"
    BAD_HEADER = "bad header size or reserved field"
    BAD_LENGTH = "content length out of range"
    BAD_CRC = "content checksum mismatch"
    BAD_JSON = "content is not UTF-8 JSON"
    BAD_CONTENT = "content fields are invalid"


class FirmwareTableError(ValueError):
    """The firmware table is missing or malformed (``reason`` says how)."""

    def __init__(self, message: str, *, reason: FwTableFault) -> None:
        super().__init__(f"firmware table: {message}")
        self.reason = reason


def _bad(message: str) -> FirmwareTableError:
    return FirmwareTableError(message, reason=FwTableFault.BAD_CONTENT)


def _int(data: Mapping[str, Any], name: str, lo: int, hi: int) -> int:
    value = data.get(name)
    if type(value) is not int or not lo <= value <= hi:
        raise _bad(f"{name} must be an integer in {lo}..{hi}, not {value!r}")
    return value


def _text(data: Mapping[str, Any], name: str, max_len: int, *, empty: bool = False) -> str:
    value = data.get(name)
    if not isinstance(value, str) or len(value) > max_len or (not value and not empty):
        raise _bad(f"{name} must be a {'' if empty else 'non-empty '}string of at most "
                   f"{max_len} characters, not {value!r}")
    if not value.isprintable():
        raise _bad(f"{name} has unprintable characters")
    return value


def _wwn(data: Mapping[str, Any], name: str) -> Wwn:
    value = data.get(name)
    if not isinstance(value, str):
        raise _bad(f"{name} must be a WWN string, not {value!r}")
    try:
        return Wwn.parse(value)
    except WwnError as exc:
        raise _bad(f"{name}: {exc}") from None


@dataclass(frozen=True, slots=True)
class FwDisk:
    """One virtual disk as the VM must find it: its virtual disk address (claim A: vport
    WWPN, virtual target id, LUN) and what the disk is."""

    wwpn: Wwn
    target: int
    lun: int
    vdisk: str
    capacity_blocks: int
    block_size: int
    serial: str
    wwn: Wwn

    def __post_init__(self) -> None:
        if not isinstance(self.wwpn, Wwn) or not isinstance(self.wwn, Wwn):
            raise _bad("wwpn and wwn must be Wwn values")
        self.load(self.dump())  # one validation path: the loader's

    @property
    def address(self) -> tuple[int, int]:
        return (self.target, self.lun)

    def dump(self) -> dict[str, Any]:
        return {"wwpn": self.wwpn.canonical(), "target": self.target, "lun": self.lun,
                "vdisk": self.vdisk, "capacity_blocks": self.capacity_blocks,
                "block_size": self.block_size, "serial": self.serial,
                "wwn": self.wwn.canonical()}

    @classmethod
    def load(cls, data: Any) -> FwDisk:
        if not isinstance(data, Mapping):
            raise _bad(f"a disk must be an object, not {type(data).__name__}")
        extra = set(data) - {"wwpn", "target", "lun", "vdisk", "capacity_blocks",
                             "block_size", "serial", "wwn"}
        if extra:
            raise _bad(f"unknown disk fields {sorted(extra)}")
        block_size = _int(data, "block_size", 512, 65536)
        if block_size & (block_size - 1):
            raise _bad(f"block_size {block_size} is not a power of 2")
        disk = object.__new__(cls)
        for name, value in (("wwpn", _wwn(data, "wwpn")),
                            ("target", _int(data, "target", 0, 255)),
                            ("lun", _int(data, "lun", 0, 16383)),
                            ("vdisk", _text(data, "vdisk", _MAX_NAME)),
                            ("capacity_blocks", _int(data, "capacity_blocks", 1, (1 << 64) - 1)),
                            ("block_size", block_size),
                            ("serial", _text(data, "serial", _MAX_SERIAL, empty=True)),
                            ("wwn", _wwn(data, "wwn"))):
            object.__setattr__(disk, name, value)
        if not disk.serial.isascii():
            raise _bad("serial must be ASCII (SPC-4 VPD page 80h)")
        return disk


@dataclass(frozen=True, slots=True)
class FirmwareTable:
    """What the hypervisor tells the VM at boot (claim A8)."""

    vm_name: str
    vm_id: str
    vf_socket: str | None = None
    disks: tuple[FwDisk, ...] = field(default=())
    generation: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "disks", tuple(self.disks))
        if not all(isinstance(d, FwDisk) for d in self.disks):
            raise _bad("disks must be FwDisk values")
        self.load(self.dump(), generation=self.generation)

    @property
    def targets(self) -> tuple[int, ...]:
        """The virtual target ids named by the table, ascending."""
        return tuple(sorted({d.target for d in self.disks}))

    def disk_at(self, target: int, lun: int) -> FwDisk | None:
        for disk in self.disks:
            if disk.address == (target, lun):
                return disk
        return None

    def dump(self) -> dict[str, Any]:
        return {"format": FWTABLE_FORMAT, "vm": {"name": self.vm_name, "id": self.vm_id},
                "vf_socket": self.vf_socket, "disks": [d.dump() for d in self.disks]}

    @classmethod
    def load(cls, data: Any, *, generation: int = 0) -> FirmwareTable:
        """Rebuild from :meth:`dump` output; :class:`FirmwareTableError` if invalid."""
        if not isinstance(data, Mapping):
            raise _bad(f"content must be an object, not {type(data).__name__}")
        if data.get("format") != FWTABLE_FORMAT:
            raise _bad(f"format is {data.get('format')!r}, not {FWTABLE_FORMAT!r}")
        extra = set(data) - {"format", "vm", "vf_socket", "disks"}
        if extra:
            raise _bad(f"unknown fields {sorted(extra)}")
        vm = data.get("vm")
        if not isinstance(vm, Mapping) or set(vm) != {"name", "id"}:
            raise _bad("vm must be an object with exactly 'name' and 'id'")
        socket = data.get("vf_socket")
        if socket is not None:
            socket = _text(data, "vf_socket", _MAX_PATH)
        disks_raw = data.get("disks")
        if not isinstance(disks_raw, Sequence) or isinstance(disks_raw, str | bytes):
            raise _bad("disks must be a list")
        disks = tuple(FwDisk.load(d) for d in disks_raw)
        seen: set[tuple[int, int]] = set()
        for disk in disks:
            if disk.address in seen:
                raise _bad(f"two disks at target {disk.target} LUN {disk.lun}")
            seen.add(disk.address)
        if type(generation) is not int or not 0 <= generation < 1 << 64:
            raise _bad(f"generation {generation!r} is not a 64-bit integer")
        table = object.__new__(cls)
        for name, value in (("vm_name", _text(vm, "name", _MAX_NAME)),
                            ("vm_id", _text(vm, "id", _MAX_NAME)),
                            ("vf_socket", socket), ("disks", disks),
                            ("generation", generation)):
            object.__setattr__(table, name, value)
        return table

    def encode(self) -> bytes:
        return encode_fwtable(self)


def encode_fwtable(table: FirmwareTable) -> bytes:
    """The page-0 bytes (header + content; the caller zero-fills the rest of the page)."""
    content = json.dumps(table.dump(), sort_keys=True, separators=(",", ":"),
                         ensure_ascii=True).encode("ascii")
    if len(content) > MAX_CONTENT_BYTES:
        raise _bad(f"content of {len(content)} bytes exceeds {MAX_CONTENT_BYTES} "
                   "(too many disks for one page)")
    header = _HEADER.pack(FWTABLE_MAGIC, FWTABLE_VERSION, HEADER_BYTES, len(content),
                          zlib.crc32(content), table.generation, 0)
    return header + content


def decode_fwtable(data: bytes | bytearray | memoryview) -> FirmwareTable:
    """Check and decode page 0; :class:`FirmwareTableError` for anything malformed."""
    raw = bytes(data[:FWTABLE_MAX_BYTES])
    if len(raw) < HEADER_BYTES:
        if not any(raw):
            raise FirmwareTableError("blank", reason=FwTableFault.EMPTY)
        raise FirmwareTableError(f"{len(raw)} bytes, the header needs {HEADER_BYTES}",
                                 reason=FwTableFault.TRUNCATED)
    magic, version, header, length, crc, generation, reserved = _HEADER.unpack_from(raw)
    if magic != FWTABLE_MAGIC:
        if not any(raw):
            raise FirmwareTableError("page 0 is blank", reason=FwTableFault.EMPTY)
        raise FirmwareTableError(f"magic {magic:#010x} is not {FWTABLE_MAGIC:#010x}",
                                 reason=FwTableFault.BAD_MAGIC)
    if version != FWTABLE_VERSION:
        raise FirmwareTableError(f"version {version} is not {FWTABLE_VERSION}",
                                 reason=FwTableFault.BAD_VERSION)
    if header != HEADER_BYTES or reserved:
        raise FirmwareTableError(f"header size {header} / reserved {reserved:#x}",
                                 reason=FwTableFault.BAD_HEADER)
    if not 0 < length <= MAX_CONTENT_BYTES:
        raise FirmwareTableError(f"content length {length} not in 1..{MAX_CONTENT_BYTES}",
                                 reason=FwTableFault.BAD_LENGTH)
    if len(raw) < HEADER_BYTES + length:
        raise FirmwareTableError(f"content of {length} bytes, {len(raw) - HEADER_BYTES} "
                                 "present", reason=FwTableFault.TRUNCATED)
    content = raw[HEADER_BYTES:HEADER_BYTES + length]
    if zlib.crc32(content) != crc:
        raise FirmwareTableError("content CRC-32 mismatch", reason=FwTableFault.BAD_CRC)
    try:
        parsed = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FirmwareTableError(f"content is not JSON: {exc}",
                                 reason=FwTableFault.BAD_JSON) from None
    return FirmwareTable.load(parsed, generation=generation)
